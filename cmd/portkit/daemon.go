package main

// `portkit daemon`: a forwarder in the foreground. It serves RootlessKit's
// API on STATE_DIR/api.sock and publishes ports into an existing child
// netns (given by path or by a PID inside it) until SIGTERM or SIGINT.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/builtin"
	"github.com/portkit/portkit/libport/forwarder"
	"github.com/portkit/portkit/libport/network"
)

const daemonUsage = `Usage: portkit daemon --state-dir DIR [flags]

Serves RootlessKit's REST API v1 on DIR/api.sock (socket 0600, DIR 0700) and
publishes ports into the child network namespace given by --netns or
--child-pid, through the port driver --port-driver names. Ports come from
-p at start and from add-ports (portkit or rootlessctl) later. Runs until
SIGTERM or SIGINT, then withdraws every port and removes its files.

Examples:
  portkit daemon --state-dir /run/user/1000/pk --port-driver builtin --child-pid 4242 -p 8080:80/tcp
  portkit daemon --state-dir /run/user/1000/pk --port-driver slirp4netns --net slirp4netns --netns /proc/4242/ns/net

Flags:
`

func init() {
	commands["daemon"] = command{
		summary: "serve RootlessKit's API and publish ports into an existing child netns",
		run:     exitWith(daemonMain),
	}
}

// daemonFlags are the parsed flags of `portkit daemon`.
type daemonFlags struct {
	cfg     forwarder.Config
	net     string
	netCfg  network.Config
	ports   portSpecs
	srcIP   string
	timeout time.Duration
}

// portSpecs is a repeatable -p flag; each value may be a range.
type portSpecs []libport.Spec

func (p *portSpecs) String() string { return fmt.Sprint(len(*p)) }
func (p *portSpecs) Set(v string) error {
	specs, err := libport.ParseSpec(v)
	if err != nil {
		return err
	}
	*p = append(*p, specs...)
	return nil
}

func parseDaemonFlags(args []string, stderr io.Writer) (*daemonFlags, error) {
	var d daemonFlags
	fs := flag.NewFlagSet("portkit daemon", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, daemonUsage)
		fs.PrintDefaults()
	}
	fs.StringVar(&d.cfg.StateDir, "state-dir", os.Getenv("PORTKIT_STATE_DIR"), "state `directory`: api.sock and the forwarder's files (default $PORTKIT_STATE_DIR)")
	fs.StringVar(&d.cfg.PortDriver, "port-driver", "none", "port `driver`: "+strings.Join(forwarder.PortDrivers, ", "))
	fs.StringVar(&d.cfg.NetnsPath, "netns", "", "the child network namespace `path` (/proc/PID/ns/net, a bind mount, a CNI_NETNS path)")
	fs.IntVar(&d.cfg.ChildPID, "child-pid", 0, "a `PID` in the child network namespace (written to child_pid, as RootlessKit does)")
	fs.StringVar(&d.cfg.ChildIP, "child-ip", "", "the child's `address`, where its network was set up by someone else")
	fs.Var(&d.ports, "p", "publish `SPEC` ([parentIP:]parentPort:[childIP:]childPort/proto; ranges allowed), repeatable")
	fs.Var(&d.ports, "publish", "same as -p")
	fs.StringVar(&d.net, "net", "none", "start a network for the child: slirp4netns, pasta or none")
	fs.IntVar(&d.netCfg.MTU, "mtu", 0, "MTU of the child's interface with --net (default 65520)")
	fs.StringVar(&d.netCfg.CIDR, "cidr", "", "IPv4 network of the child with --net (default 10.0.2.0/24)")
	fs.BoolVar(&d.netCfg.IPv6, "ipv6", false, "give the child IPv6 too with --net")
	fs.BoolVar(&d.netCfg.DisableHostLoopback, "disable-host-loopback", false, "with --net, the child may not reach the parent's loopback")
	fs.StringVar(&d.srcIP, "source-ip", "tcp", "builtin driver: transports that keep the client's source address: tcp, tcp,udp, udp or none")
	fs.DurationVar(&d.cfg.Builtin.UDPIdleTimeout, "udp-idle-timeout", 0, "builtin driver: end a UDP flow idle this long (default 60s)")
	fs.IntVar(&d.cfg.Builtin.UDPMaxFlows, "udp-max-flows", 0, "builtin driver: most UDP flows per port (default 4096)")
	fs.DurationVar(&d.timeout, "shutdown-timeout", 10*time.Second, "how long shutdown may take before the daemon exits anyway")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q: portkit daemon takes flags only (see --help)", fs.Arg(0))
	}
	if d.cfg.StateDir == "" {
		return nil, errors.New("no state directory: give --state-dir DIR (or set PORTKIT_STATE_DIR)")
	}
	if d.cfg.NetnsPath != "" && d.cfg.ChildPID != 0 {
		return nil, errors.New("--netns and --child-pid both name the child: give one")
	}
	switch d.net {
	case "none", "":
	case "slirp4netns", "pasta":
		n := d.netCfg
		n.Backend = d.net
		d.cfg.Network = &n
	default:
		return nil, fmt.Errorf("--net=%s: want slirp4netns, pasta or none", d.net)
	}
	if err := parseSourceIP(d.srcIP, &d.cfg.Builtin); err != nil {
		return nil, err
	}
	d.cfg.Ports = d.ports
	if err := d.cfg.Validate(); err != nil {
		return nil, err
	}
	return &d, nil
}

func parseSourceIP(text string, o *forwarder.BuiltinOptions) error {
	src, err := builtin.ParseSourceIP(text)
	if err != nil {
		return fmt.Errorf("--source-ip: %w", err)
	}
	o.SourceIP = src
	return nil
}

func daemonMain(args []string) int {
	d, err := parseDaemonFlags(args, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		return 1
	}
	logger := log.New(os.Stderr, "portkit daemon: ", log.LstdFlags)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	done := make(chan error, 1)
	go func() {
		done <- forwarder.Run(ctx, d.cfg, func() {
			logger.Printf("serving %s/api.sock (port driver %s, %d ports)", d.cfg.StateDir, d.cfg.PortDriver, len(d.cfg.Ports))
		})
	}()
	select {
	case err = <-done:
	case <-ctx.Done():
		select {
		case err = <-done:
		case <-time.After(d.timeout):
			err = fmt.Errorf("shutdown did not finish within %v", d.timeout)
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		return 1
	}
	return 0
}
