// Package forwarder runs one attachment's forwarder: the process that stays
// in the parent's namespaces, owns the port listeners (through a port
// driver), the port table and the API socket, and optionally the network
// process (slirp4netns or pasta) of the child netns, so that one process
// tree per attachment starts and stops as one.
//
// Run serves in the calling process (portkit daemon). Spawn starts a
// detached forwarder for callers that must return at once and must not be
// waited on (CNI plugins, the OCI hook): a small supervisor that restarts
// the forwarder, with its port table restored from the state directory, if
// it dies. Stop ends either kind, idempotently.
package forwarder

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/api"
	"github.com/portkit/portkit/libport/netns"
	"github.com/portkit/portkit/libport/network"
	"github.com/portkit/portkit/libport/state"
)

// Config is what one forwarder serves. Its JSON form is the state
// directory's config.json.
type Config struct {
	StateDir   string          `json:"stateDir"`            // holds api.sock and the rest; made 0700 if missing
	PortDriver string          `json:"portDriver"`          // none, builtin, slirp4netns, implicit, socat
	NetnsPath  string          `json:"netnsPath,omitempty"` // the child netns; default /proc/ChildPID/ns/net
	ChildPID   int             `json:"childPID,omitempty"`  // a process in the child netns (RootlessKit's child_pid)
	Network    *network.Config `json:"network,omitempty"`   // start this network process for the child; nil: none
	Ports      []libport.Spec  `json:"ports,omitempty"`     // published at start
	Builtin    BuiltinOptions  `json:"builtin"`             // builtin driver tuning

	// ChildIP is the child's address where the network was started by
	// someone else (e.g. the usernet CNI plugin): the slirp4netns driver
	// forwards to it and /v1/info reports it. Default: from Network.
	ChildIP string `json:"childIP,omitempty"`
	// SlirpAPISocket is the API socket of a slirp4netns started by someone
	// else, for the slirp4netns port driver. Default: the one this forwarder
	// starts (StateDir/slirp4netns.sock).
	SlirpAPISocket string `json:"slirp4netnsAPISocket,omitempty"`
}

// slirpSocketName is where a slirp4netns started by the forwarder listens.
const slirpSocketName = "slirp4netns.sock"

// PortDrivers lists the names Config.PortDriver accepts.
var PortDrivers = []string{"none", "builtin", "slirp4netns", "implicit", "socat"}

// netnsPath is the child netns the config names, if any.
func (c *Config) netnsPath() string {
	if c.NetnsPath != "" {
		return c.NetnsPath
	}
	if c.ChildPID > 0 {
		return "/proc/" + strconv.Itoa(c.ChildPID) + "/ns/net"
	}
	return ""
}

// Validate checks c without touching anything.
func (c *Config) Validate() error {
	if c.StateDir == "" {
		return errors.New("forwarder: no state directory: give --state-dir DIR")
	}
	if !validDriver(c.PortDriver) {
		return fmt.Errorf("forwarder: unknown port driver %q: want one of %s", c.PortDriver, strings.Join(PortDrivers, ", "))
	}
	if c.ChildPID < 0 {
		return fmt.Errorf("forwarder: child PID %d is not a PID", c.ChildPID)
	}
	if c.PortDriver == "builtin" || c.PortDriver == "socat" {
		if c.netnsPath() == "" {
			return fmt.Errorf("forwarder: the %s port driver needs the child netns: give --netns PATH or --child-pid PID", c.PortDriver)
		}
	}
	if c.PortDriver == "implicit" && (c.Network == nil || c.Network.Backend != "pasta") {
		return errors.New("forwarder: the implicit port driver needs the pasta network started by this forwarder (pasta takes its ports at start)")
	}
	if c.ChildIP != "" && net.ParseIP(c.ChildIP) == nil {
		return fmt.Errorf("forwarder: child IP %q is not an IP address", c.ChildIP)
	}
	if c.Network != nil {
		n := c.networkConfig(nil)
		n.Default()
		if err := n.Validate(); err != nil {
			return fmt.Errorf("forwarder: network: %w", err)
		}
	}
	// Only specs of one transport and parent port can conflict: compare
	// within those groups, so a range of 65,535 ports is checked in linear
	// time rather than in billions of comparisons.
	type portKey struct {
		transport string
		port      int
	}
	seen := map[portKey][]libport.Spec{}
	for _, s := range c.Ports {
		if err := s.Validate(); err != nil {
			return fmt.Errorf("forwarder: port %s: %w", s, err)
		}
		k := portKey{s.Transport(), s.ParentPort}
		for _, o := range seen[k] {
			if libport.Conflicts(s, o) {
				return fmt.Errorf("forwarder: port %s conflicts with port %s", s, o)
			}
		}
		seen[k] = append(seen[k], s)
	}
	return nil
}

func validDriver(name string) bool {
	for _, d := range PortDrivers {
		if d == name {
			return true
		}
	}
	return false
}

// networkConfig is c.Network completed from the rest of c: the netns, the
// slirp4netns API socket, and pasta's ports (restored, when not nil).
func (c *Config) networkConfig(restored []libport.Spec) network.Config {
	n := *c.Network
	if n.NetnsPath == "" {
		n.NetnsPath = c.netnsPath()
	}
	if n.Backend == "slirp4netns" && c.PortDriver == "slirp4netns" && n.APISocket == "" && c.SlirpAPISocket == "" {
		n.APISocket = filepath.Join(c.StateDir, slirpSocketName)
	}
	if n.Backend == "pasta" && c.PortDriver == "implicit" {
		if restored != nil {
			n.Ports = restored
		} else {
			n.Ports = c.implicitPorts()
		}
	}
	return n
}

// implicitPorts are the ports pasta starts with under the implicit driver:
// those given to the network and those given to the forwarder, once each.
func (c *Config) implicitPorts() []libport.Spec {
	var out []libport.Spec
	seen := map[libport.Spec]bool{}
	var net []libport.Spec
	if c.Network != nil {
		net = c.Network.Ports
	}
	for _, list := range [][]libport.Spec{net, c.Ports} {
		for _, s := range list {
			if !seen[s] {
				seen[s] = true
				out = append(out, s)
			}
		}
	}
	return out
}

// runOptions are what a supervised forwarder does differently.
type runOptions struct {
	lock    *state.Lock // held already (inherited from the supervisor's caller)
	restore bool        // publish the ports in ports.json instead of cfg.Ports
	logf    func(string, ...any)
}

// Run serves cfg until ctx is done: it takes the state directory's lock,
// starts the network (if any), builds the port driver, publishes cfg.Ports,
// serves the API on StateDir/api.sock, and calls ready (if not nil) once
// all of that works. On return everything it started is stopped and every
// file it wrote is removed. An error before ready leaves nothing behind.
func Run(ctx context.Context, cfg Config, ready func()) error {
	return run(ctx, cfg, ready, runOptions{logf: log.Printf})
}

// forwarder is one running Run.
type forwarder struct {
	cfg  Config
	opts runOptions
	dir  *state.Dir
	lock *state.Lock

	createdDir bool
	net        *network.Network
	netCfg     network.Config // what the network was started with
	source     netns.SocketSource
	driver     libport.Driver
	table      *libport.Table
	persist    *persistDriver
	written    []string // state files to remove at the end
}

func run(ctx context.Context, cfg Config, ready func(), opts runOptions) (err error) {
	if opts.logf == nil {
		opts.logf = log.Printf
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	f := &forwarder{cfg: cfg, opts: opts}
	defer func() {
		if err != nil {
			f.teardown()
		}
	}()
	if err := f.openState(); err != nil {
		return err
	}
	if err := f.startNetwork(ctx); err != nil {
		return err
	}
	if err := f.startDriver(); err != nil {
		return err
	}
	if err := f.publish(ctx); err != nil {
		return err
	}

	// The API socket appears only once the network and every port are up:
	// clients (and our tests, and nerdctl-style launch scripts) take its
	// existence as "ready".
	sock := f.dir.Join(state.APISocket)
	l, err := api.Listen(sock)
	if err != nil {
		return fmt.Errorf("forwarder: %w", err)
	}
	f.written = append(f.written, state.APISocket)
	srvCtx, stopServing := context.WithCancel(context.Background())
	defer stopServing()
	served := make(chan error, 1)
	go func() { served <- api.ServeListener(srvCtx, l, api.NewServer(f.table, f.info)) }()

	if ready != nil {
		ready()
	}
	var netDone <-chan struct{}
	if f.net != nil {
		netDone = f.net.Done()
	}
	childGone, stopWatch := watchChild(f.cfg.ChildPID, f.opts.logf)
	defer stopWatch()
	select {
	case <-ctx.Done():
		stopServing()
		<-served
		return f.teardown()
	case <-childGone:
		// The container is gone: nothing is left to forward to. A clean exit
		// tells a supervisor not to restart us.
		f.opts.logf("child process %d exited: stopping", f.cfg.ChildPID)
		stopServing()
		<-served
		return f.teardown()
	case err := <-served:
		f.teardown()
		return fmt.Errorf("forwarder: %w", err)
	case <-netDone:
		stopServing()
		<-served
		netErr := f.net.Err() // read before teardown, which drops f.net
		f.teardown()
		return fmt.Errorf("forwarder: %w", netErr)
	}
}

// openState opens (or creates) the state directory, takes its lock and
// records who serves it.
func (f *forwarder) openState() error {
	if _, err := os.Lstat(f.cfg.StateDir); errors.Is(err, os.ErrNotExist) {
		f.createdDir = true
	}
	dir, err := state.Create(f.cfg.StateDir)
	if err != nil {
		return err
	}
	f.dir = dir
	if f.opts.lock != nil {
		f.lock = f.opts.lock
	} else {
		l, err := dir.Lock()
		if err != nil {
			if errors.Is(err, state.ErrLocked) {
				who := ""
				if p, perr := dir.ReadProcess(state.ForwarderFile); perr == nil && p.Alive() {
					who = fmt.Sprintf(" (forwarder pid %d)", p.PID)
				}
				return fmt.Errorf("state dir %s is already served by another forwarder%s: stop it first or choose another --state-dir", dir.Path(), who)
			}
			return err
		}
		f.lock = l
		// Our own run: config.json describes us (a supervisor wrote it already).
		if err := dir.WriteJSON(state.ConfigFile, f.cfg); err != nil {
			return err
		}
		f.written = append(f.written, state.ConfigFile)
		if !f.opts.restore {
			_ = dir.Remove(state.PortsFile) // left by a killed forwarder: not ours to restore
		}
	}
	self, err := state.Self()
	if err != nil {
		return err
	}
	f.written = append(f.written, state.ForwarderFile)
	if err := dir.WriteProcess(state.ForwarderFile, self); err != nil {
		return err
	}
	if f.cfg.ChildPID > 0 {
		f.written = append(f.written, state.ChildPIDFile)
		if err := dir.WritePID(state.ChildPIDFile, f.cfg.ChildPID); err != nil {
			return err
		}
	}
	return nil
}

func (f *forwarder) startNetwork(ctx context.Context) error {
	if f.cfg.Network == nil {
		return nil
	}
	var ports []libport.Spec
	if f.opts.restore {
		// The network process of the forwarder we replace dies with it
		// (Pdeathsig), but may not be gone yet: its tap device would clash.
		if old, err := f.dir.ReadProcess(state.NetworkPID); err == nil {
			if err := old.Stop(time.Second); err != nil {
				f.opts.logf("forwarder: stopping the previous network process: %v", err)
			}
		}
		saved, err := f.readPorts()
		if err == nil {
			for _, s := range saved.Ports {
				ports = append(ports, s.Spec)
			}
		}
	}
	ncfg := f.cfg.networkConfig(ports)
	if ncfg.APISocket != "" && filepath.Dir(ncfg.APISocket) == f.dir.Path() {
		// slirp4netns cannot bind over the socket a killed one left.
		name := filepath.Base(ncfg.APISocket)
		if err := f.dir.Remove(name); err != nil {
			return err
		}
		f.written = append(f.written, name)
	}
	f.netCfg = ncfg
	n, err := network.Start(ctx, ncfg)
	if err != nil {
		return fmt.Errorf("forwarder: %w", err)
	}
	f.net = n
	if p, err := state.ProcessOf(n.PID); err == nil {
		f.written = append(f.written, state.NetworkPID)
		if err := f.dir.WriteProcess(state.NetworkPID, p); err != nil {
			return err
		}
	}
	return nil
}

// childIP is the child's address as far as the forwarder knows it.
func (f *forwarder) childIP() net.IP {
	if f.cfg.ChildIP != "" {
		return net.ParseIP(f.cfg.ChildIP)
	}
	if f.net != nil && f.net.IP.IP != nil {
		return f.net.IP.IP
	}
	return nil
}

func (f *forwarder) publish(ctx context.Context) error {
	f.persist = newPersistDriver(f.driver, f.dir, f.opts.logf)
	f.table = libport.NewTable(f.persist)
	if f.opts.lock == nil {
		// A supervised forwarder keeps ports.json for its successor; the
		// supervisor removes the directory when the attachment stops.
		f.written = append(f.written, state.PortsFile)
	}
	if f.opts.restore {
		saved, err := f.readPorts()
		if err == nil {
			f.persist.setNext(saved.NextID)
			if err := f.table.Restore(ctx, saved.NextID, saved.Ports); err != nil {
				f.opts.logf("forwarder: restoring ports: %v", err)
			}
			return f.persist.save()
		}
		if !errors.Is(err, os.ErrNotExist) {
			f.opts.logf("forwarder: cannot restore the port table: %v; publishing the configured ports", err)
		}
	}
	ports := f.cfg.Ports
	if f.cfg.PortDriver == "implicit" {
		ports = f.cfg.implicitPorts() // what pasta forwards, listed in the table
	}
	for _, spec := range ports {
		if _, err := f.table.Add(ctx, spec); err != nil {
			return fmt.Errorf("forwarder: publish %s: %w", spec, err)
		}
	}
	return f.persist.save()
}

func (f *forwarder) readPorts() (portsFile, error) {
	var p portsFile
	err := f.dir.ReadJSON(state.PortsFile, &p)
	return p, err
}

// info answers GET /v1/info; the API server fills in the port driver.
func (f *forwarder) info() api.Info {
	nd := &api.NetworkDriverInfo{ChildIP: f.childIP()}
	switch {
	case f.net != nil:
		nd.Driver = f.net.Backend
		if f.net.DNS != nil {
			nd.DNS = []net.IP{f.net.DNS}
		}
	case f.cfg.netnsPath() == "":
		nd.Driver = "host"
	default:
		nd.Driver = "none"
	}
	return api.Info{StateDir: f.cfg.StateDir, ChildPID: f.cfg.ChildPID, NetworkDriver: nd}
}

// teardown stops everything f started, in reverse order, and removes the
// files it wrote. It returns the first error that matters.
func (f *forwarder) teardown() error {
	var errs []error
	if f.table != nil {
		if err := f.table.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close port driver %s: %w", f.cfg.PortDriver, err))
		}
		f.table = nil
	} else if f.driver != nil {
		if err := f.driver.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close port driver %s: %w", f.cfg.PortDriver, err))
		}
	}
	f.driver = nil
	if f.source != nil {
		if err := f.source.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close child netns socket source: %w", err))
		}
		f.source = nil
	}
	if f.net != nil {
		if err := f.net.Stop(); err != nil {
			errs = append(errs, err)
		}
		f.net = nil
	}
	if f.dir != nil {
		for _, name := range f.written {
			if err := f.dir.Remove(name); err != nil {
				errs = append(errs, err)
			}
		}
		f.written = nil
		if f.opts.lock == nil && f.lock != nil {
			// Our own lock: unlink it before letting go, so a waiter never
			// holds a lock on a file nobody else can see (state.Lock checks).
			_ = f.dir.Remove(state.LockFile)
		}
		if f.createdDir {
			_ = os.Remove(f.dir.Path()) // only if empty: never someone's files
		}
		f.dir.Close()
		f.dir = nil
	}
	if f.opts.lock == nil && f.lock != nil {
		f.lock.Release()
	}
	f.lock = nil
	return errors.Join(errs...)
}

// watchChild returns a channel closed when process pid exits (never, for
// pid 0 or one that cannot be watched), and a function that stops watching.
func watchChild(pid int, logf func(string, ...any)) (<-chan struct{}, func()) {
	gone := make(chan struct{})
	if pid <= 0 {
		return gone, func() {}
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		logf("cannot watch child process %d (%v): the forwarder stops only when told to", pid, err)
		return gone, func() {}
	}
	// An eventfd wakes the poll when we stop watching first.
	stop, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(pidfd)
		return gone, func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer unix.Close(pidfd)
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}, {Fd: int32(stop), Events: unix.POLLIN}}
		for {
			if _, err := unix.Poll(fds, -1); err == unix.EINTR {
				continue
			}
			break
		}
		if fds[0].Revents != 0 {
			close(gone)
		}
	}()
	var once sync.Once
	return gone, func() {
		once.Do(func() {
			_, _ = unix.Write(stop, []byte{1, 0, 0, 0, 0, 0, 0, 0})
			<-done
			unix.Close(stop)
		})
	}
}
