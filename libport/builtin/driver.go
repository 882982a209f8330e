// Package builtin is portkit's fast port driver: listeners in the parent
// (host) network namespace, and for every client a socket made in the child
// netns through a netns.SocketSource, with the bytes moved between the two by
// splice(2) through a bounded set of pipes. TCP keeps the client's source
// address by default (IP_TRANSPARENT + SO_MARK + a fwmark rule in the child);
// UDP may keep it too (opt-in, see SourceIP).
//
// Which side a file runs on:
//   - driver.go       both: the port table of the driver, defaults, errors
//   - parent_tcp.go   parent: TCP listeners, accept, per-connection lifecycle
//   - parent_udp.go   parent: UDP listeners, the flow table, batched I/O
//   - child_dial.go   child: sockets made in the child netns, connected there
//   - child_routing.go child: the routing rules and sysctl source IP needs
//   - child_netlink.go child: a minimal rtnetlink client on a child socket
//   - loop.go         both: the event loops that carry TCP and UDP (epoll, one thread each)
//   - copy.go, pipes.go, mmsg.go: the copy engine (no namespace of its own)
package builtin

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/netns"
)

// SourceIP says for which transports the service in the child sees the
// client's own address instead of the child's loopback. The zero value is the
// default: TCP on, UDP off.
type SourceIP struct {
	// DisableTCP dials TCP connections from the child's loopback address.
	DisableTCP bool
	// UDP keeps the client's address for UDP too. It adds a routing rule per
	// child port that delivers every datagram the child sends from that port
	// locally (see the README), so it is opt-in.
	UDP bool
}

// TCP reports whether TCP connections keep the client's address.
func (s SourceIP) TCP() bool { return !s.DisableTCP }

// String is the form ParseSourceIP reads: "tcp", "tcp,udp", "udp", "none".
func (s SourceIP) String() string {
	var parts []string
	if s.TCP() {
		parts = append(parts, "tcp")
	}
	if s.UDP {
		parts = append(parts, "udp")
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ",")
}

// ParseSourceIP reads a comma-separated list of the transports that keep the
// client's address: "tcp", "udp", or "none". The empty string is the default
// (TCP only); "udp" alone means UDP only.
func ParseSourceIP(text string) (SourceIP, error) {
	if text == "" {
		return SourceIP{}, nil
	}
	var tcp, udp, none bool
	for _, w := range strings.Split(text, ",") {
		switch strings.TrimSpace(w) {
		case "tcp":
			tcp = true
		case "udp":
			udp = true
		case "none":
			none = true
		default:
			return SourceIP{}, fmt.Errorf("source IP %q: unknown word %q: want a list of tcp, udp, or none", text, w)
		}
	}
	if none && (tcp || udp) {
		return SourceIP{}, fmt.Errorf("source IP %q: none cannot be combined with tcp or udp", text)
	}
	return SourceIP{DisableTCP: !tcp, UDP: udp}, nil
}

// Options tunes a Driver. The zero value is ready to use.
type Options struct {
	// SourceIP picks the transports that keep the client's address.
	SourceIP SourceIP
	// UDPIdleTimeout ends a UDP flow nobody used for this long (default 60 s).
	UDPIdleTimeout time.Duration
	// UDPMaxFlows bounds the flows of one UDP port; the least recently used
	// flow is ended to make room (default 4096).
	UDPMaxFlows int
	// Logf receives events worth a line in the log, such as source IP being
	// unavailable. The default is the standard logger.
	Logf func(format string, args ...any)
}

const (
	defaultUDPIdleTimeout = 60 * time.Second
	defaultUDPMaxFlows    = 4096
)

// Driver is the builtin port driver. It implements libport.Driver.
type Driver struct {
	src     netns.SocketSource
	opts    Options
	routing *routing
	loops   loopSet     // the event loops, started with the first port
	noGSO   atomic.Bool // the kernel refused UDP GSO: send datagrams one by one

	mu     sync.Mutex
	ports  map[int]port
	closed bool
}

// port is one published port, TCP or UDP.
type port interface {
	// close stops the listener at once, closes every connection or flow of
	// the port and waits for its goroutines.
	close()
}

var _ libport.Driver = (*Driver)(nil)

// New returns a driver that makes its child-side sockets with src. The caller
// keeps owning src and closes it after Close.
func New(src netns.SocketSource, opts Options) (*Driver, error) {
	if src == nil {
		return nil, errors.New("builtin: no socket source for the child netns: open one with netns.Open")
	}
	if opts.UDPIdleTimeout < 0 {
		return nil, fmt.Errorf("builtin: UDP idle timeout %v is negative", opts.UDPIdleTimeout)
	}
	if opts.UDPMaxFlows < 0 {
		return nil, fmt.Errorf("builtin: UDP flow limit %d is negative", opts.UDPMaxFlows)
	}
	if opts.UDPIdleTimeout == 0 {
		opts.UDPIdleTimeout = defaultUDPIdleTimeout
	}
	if opts.UDPMaxFlows == 0 {
		opts.UDPMaxFlows = defaultUDPMaxFlows
	}
	if opts.Logf == nil {
		opts.Logf = log.Printf
	}
	raiseNofile(opts.Logf)
	pipes.setLogf(opts.Logf)
	return &Driver{
		src:     src,
		opts:    opts,
		routing: newRouting(src, opts.Logf),
		ports:   map[int]port{},
	}, nil
}

// raiseNofile lifts the soft RLIMIT_NOFILE to the hard limit: every proxied
// TCP connection costs two fds and every UDP flow one.
func raiseNofile(logf func(string, ...any)) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil || lim.Cur >= lim.Max {
		return
	}
	lim.Cur = lim.Max
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		logf("builtin: raising the open files limit to %d: %v (connections beyond the current limit will fail)", lim.Max, err)
	}
}

// Info names the driver as RootlessKit does.
func (d *Driver) Info() libport.DriverInfo {
	return libport.DriverInfo{Driver: "builtin", Protos: append([]string(nil), libport.Protos...)}
}

// Add listens on the parent side of spec and forwards to its child side.
func (d *Driver) Add(ctx context.Context, id int, spec libport.Spec) error {
	if err := spec.Validate(); err != nil {
		return fmt.Errorf("builtin: port spec %s: %w", spec, err)
	}
	child, err := childAddr(spec)
	if err != nil {
		return fmt.Errorf("builtin: port spec %s: %w", spec, err)
	}
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return fmt.Errorf("builtin: port spec %s: %w", spec, net.ErrClosed)
	}
	if _, ok := d.ports[id]; ok {
		d.mu.Unlock()
		return fmt.Errorf("builtin: port id %d is already in use", id)
	}
	d.mu.Unlock()

	var p port
	switch spec.Transport() {
	case "tcp":
		p, err = d.addTCP(spec, child)
	case "udp":
		p, err = d.addUDP(spec, child)
	default:
		err = fmt.Errorf("unsupported protocol %q", spec.Proto)
	}
	if err != nil {
		return fmt.Errorf("builtin: port spec %s: %w", spec, err)
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		p.close()
		return fmt.Errorf("builtin: port spec %s: %w", spec, net.ErrClosed)
	}
	d.ports[id] = p
	return nil
}

// Remove closes the listener of id at once, then every connection and flow
// it carried.
func (d *Driver) Remove(ctx context.Context, id int) error {
	d.mu.Lock()
	p, ok := d.ports[id]
	delete(d.ports, id)
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("unknown id: %d", id)
	}
	p.close()
	return nil
}

// Close removes every port. The socket source stays open: it belongs to the caller.
func (d *Driver) Close() error {
	d.mu.Lock()
	ports := d.ports
	d.ports = map[int]port{}
	d.closed = true
	d.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range ports {
		wg.Add(1)
		go func() { defer wg.Done(); p.close() }()
	}
	wg.Wait()
	d.loops.stop()
	return d.routing.close()
}

// childAddr is where connections for spec go inside the child, following
// RootlessKit: an explicit child IP wins; otherwise a specific, non-loopback
// parent IP that is not the host's gateway-facing address is used as is (the
// child may own it too); otherwise the loopback address of the family.
func childAddr(spec libport.Spec) (netip.AddrPort, error) {
	port := uint16(spec.ChildPort)
	if spec.ChildIP != "" {
		ip, err := netip.ParseAddr(spec.ChildIP)
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("child IP %q: %w", spec.ChildIP, err)
		}
		return netip.AddrPortFrom(ip.Unmap(), port), nil
	}
	loop := netip.AddrFrom4([4]byte{127, 0, 0, 1})
	if spec.Family() == 6 {
		loop = netip.IPv6Loopback()
	}
	if spec.ParentIP == "" {
		return netip.AddrPortFrom(loop, port), nil
	}
	ip, err := netip.ParseAddr(spec.ParentIP)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("parent IP %q: %w", spec.ParentIP, err)
	}
	ip = ip.Unmap()
	if ip.Is6() {
		loop = netip.IPv6Loopback()
	}
	if ip.IsUnspecified() || ip.IsLoopback() || ip == hostGatewayIP() {
		return netip.AddrPortFrom(loop, port), nil
	}
	return netip.AddrPortFrom(ip, port), nil
}

// hostGatewayIP is RootlessKit's "host gateway IP": the first non-loopback
// IPv4 address of the parent netns. A port published on it goes to the
// child's loopback rather than to that address inside the child.
func hostGatewayIP() netip.Addr {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return netip.Addr{}
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && !n.IP.IsLoopback() {
			if ip4 := n.IP.To4(); ip4 != nil {
				return netip.AddrFrom4([4]byte(ip4))
			}
		}
	}
	return netip.Addr{}
}

// listenNetwork is the network and address a parent listener for spec uses.
// Plain tcp/udp on an empty or unspecified address listens dual-stack (Go
// opens [::] for those).
func listenNetwork(spec libport.Spec) (network, addr string) {
	return spec.Proto, net.JoinHostPort(spec.ParentIP, strconv.Itoa(spec.ParentPort))
}

// privilegedPortError explains how to publish a port below
// net.ipv4.ip_unprivileged_port_start without running as root.
type privilegedPortError struct {
	network, addr string
	start         int
	err           error
}

func (e *privilegedPortError) Error() string {
	bin, err := os.Executable()
	if err != nil {
		bin = os.Args[0]
	}
	return fmt.Sprintf("listen %s %s: permission denied: ports below %d need `sysctl net.ipv4.ip_unprivileged_port_start=0` or `setcap cap_net_bind_service=ep %s`",
		e.network, e.addr, e.start, bin)
}

func (e *privilegedPortError) Unwrap() error { return e.err }

// annotateListenError turns EACCES on a privileged port into an error that
// names both fixes.
func annotateListenError(err error, network, addr string, parentPort int) error {
	if !errors.Is(err, syscall.EACCES) && !errors.Is(err, syscall.EPERM) {
		return err
	}
	start := 1024
	if b, rerr := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start"); rerr == nil {
		if n, perr := strconv.Atoi(strings.TrimSpace(string(b))); perr == nil {
			start = n
		}
	}
	if parentPort >= start {
		return err
	}
	return &privilegedPortError{network: network, addr: addr, start: start, err: err}
}
