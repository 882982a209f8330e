// Package slirp4netns publishes ports through a running slirp4netns's API
// socket (add_hostfwd, list_hostfwd, remove_hostfwd): slirp4netns itself
// listens on the host and delivers into the child over its tap device.
//
// What this costs and keeps, as slirp4netns 1.2.0 does it:
//   - IPv4 only. slirp4netns's API takes IPv4 host and guest addresses, so
//     tcp6/udp6 and IPv6 addresses are refused, and plain tcp/udp on 0.0.0.0
//     (which other drivers serve dual-stack) listens on IPv4 only here.
//   - Connections arrive on the child's tap address (10.0.2.100 by default),
//     never on its loopback, so a loopback child IP is refused.
//   - The child sees a loopback client as the gateway, 10.0.2.2, and a
//     client on another address with that address (slirp4netns connects from
//     the client's address inside its virtual network).
package slirp4netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/portkit/portkit/libport"
)

// DefaultChildIP is the address slirp4netns --configure gives the child's tap
// device (RootlessKit's childIP for slirp4netns).
const DefaultChildIP = "10.0.2.100"

// Timeout bounds each API call when the caller's context has no earlier deadline.
const Timeout = 5 * time.Second

// Protos are the protocols slirp4netns can forward.
var Protos = []string{"tcp", "tcp4", "udp", "udp4"}

// Driver publishes ports through one slirp4netns instance.
type Driver struct {
	socket  string
	childIP string

	// mu serializes API calls (slirp4netns serves one connection at a time)
	// and guards ports and closed.
	mu     sync.Mutex
	ports  map[int]hostfwd // our ID → the forward slirp4netns holds, with its ID
	closed bool
}

// New returns a driver for the slirp4netns listening on apiSocket (its
// --api-socket) whose child has address childIP on its tap device; empty
// means DefaultChildIP. It does not contact slirp4netns yet.
func New(apiSocket string, childIP string) (*Driver, error) {
	if apiSocket == "" {
		return nil, errors.New("slirp4netns port driver: no API socket path: start slirp4netns with --api-socket PATH and pass PATH")
	}
	if childIP == "" {
		childIP = DefaultChildIP
	}
	ip, err := childAddr(childIP)
	if err != nil {
		return nil, fmt.Errorf("slirp4netns port driver: %w", err)
	}
	return &Driver{socket: apiSocket, childIP: ip, ports: map[int]hostfwd{}}, nil
}

// Info names the driver; slirp4netns cannot reach the child's loopback.
func (d *Driver) Info() libport.DriverInfo {
	return libport.DriverInfo{Driver: "slirp4netns", Protos: append([]string(nil), Protos...), DisallowLoopbackChildIP: true}
}

// Add asks slirp4netns to forward spec.
func (d *Driver) Add(ctx context.Context, id int, spec libport.Spec) error {
	fwd, err := d.forward(spec)
	if err != nil {
		return fmt.Errorf("port spec %s: %w", spec, err)
	}
	ctx, cancel := withTimeout(ctx)
	defer cancel()

	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("port spec %s: slirp4netns port driver is closed", spec)
	}
	if _, dup := d.ports[id]; dup {
		return fmt.Errorf("port spec %s: id %d is already forwarded", spec, id)
	}
	reply, err := call(ctx, d.socket, request{Execute: "add_hostfwd", Arguments: fwd})
	if err != nil {
		// The request may have reached slirp4netns before the failure:
		// take back whatever it added so nothing is left behind.
		d.undoAdd(fwd)
		return fmt.Errorf("port spec %s: %w", spec, err)
	}
	slirpID, err := parseAddReply(reply)
	if err != nil {
		var apiErr *APIError
		if errors.As(err, &apiErr) {
			return fmt.Errorf("port spec %s: %w%s", spec, err, bindHint(fwd))
		}
		d.undoAdd(fwd)
		return fmt.Errorf("port spec %s: %w", spec, err)
	}
	fwd.ID = slirpID
	d.ports[id] = fwd
	return nil
}

// forward maps spec to slirp4netns's arguments, refusing what it cannot do.
func (d *Driver) forward(spec libport.Spec) (hostfwd, error) {
	if err := spec.Validate(); err != nil {
		return hostfwd{}, err
	}
	if spec.Family() == 6 {
		return hostfwd{}, fmt.Errorf("slirp4netns cannot forward IPv6 (%s): use %s with an IPv4 address, or --port-driver=builtin for IPv6", spec.Proto, spec.Transport())
	}
	host := "0.0.0.0"
	if spec.ParentIP != "" {
		ip := net.ParseIP(spec.ParentIP)
		if ip.To4() == nil {
			return hostfwd{}, fmt.Errorf("slirp4netns cannot forward IPv6: parent IP %s is IPv6 and slirp4netns listens on IPv4 only (plain %s on 0.0.0.0 is IPv4-only with this driver); use an IPv4 parent IP or --port-driver=builtin", spec.ParentIP, spec.Transport())
		}
		host = ip.To4().String()
	}
	guest := d.childIP
	if spec.ChildIP != "" {
		var err error
		if guest, err = childAddr(spec.ChildIP); err != nil {
			return hostfwd{}, err
		}
	}
	return hostfwd{Proto: spec.Transport(), HostAddr: host, HostPort: spec.ParentPort, GuestAddr: guest, GuestPort: spec.ChildPort}, nil
}

// childAddr checks an address slirp4netns can deliver to inside the child.
func childAddr(text string) (string, error) {
	ip := net.ParseIP(text)
	switch {
	case ip == nil:
		return "", fmt.Errorf("child IP %q is not an IP address", text)
	case ip.To4() == nil:
		return "", fmt.Errorf("slirp4netns cannot forward IPv6: child IP %s is IPv6; use the child's IPv4 tap address (default %s)", text, DefaultChildIP)
	case ip.IsLoopback():
		return "", fmt.Errorf("child IP %s is loopback: slirp4netns delivers to the child's tap device and cannot reach its loopback; omit the child IP or use the tap address (default %s)", text, DefaultChildIP)
	case ip.IsUnspecified():
		return "", fmt.Errorf("child IP %s is unspecified: name the child's tap address (default %s)", text, DefaultChildIP)
	}
	return ip.To4().String(), nil
}

// bindHint explains slirp4netns's bare "slirp_add_hostfwd failed" (it keeps
// errno to itself) by trying the same bind: the usual causes are a port in
// use, a privileged port, or a parent IP the host does not have.
func bindHint(f hostfwd) string {
	addr := net.JoinHostPort(f.HostAddr, fmt.Sprint(f.HostPort))
	var err error
	if f.Proto == "udp" {
		var c net.PacketConn
		if c, err = net.ListenPacket("udp4", addr); err == nil {
			c.Close()
		}
	} else {
		var l net.Listener
		if l, err = net.Listen("tcp4", addr); err == nil {
			l.Close()
		}
	}
	switch {
	case err == nil:
		return ""
	case errors.Is(err, syscall.EACCES):
		return fmt.Sprintf(" (binding %s/%s here fails too: %v: ports below 1024 need `sysctl net.ipv4.ip_unprivileged_port_start=%d`)", addr, f.Proto, err, f.HostPort)
	default:
		return fmt.Sprintf(" (binding %s/%s here fails too: %v)", addr, f.Proto, err)
	}
}

// undoAdd removes a forward that an interrupted add_hostfwd may have made.
// Called with d.mu held; best effort, on its own short deadline.
func (d *Driver) undoAdd(f hostfwd) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	reply, err := call(ctx, d.socket, request{Execute: "list_hostfwd"})
	if err != nil {
		return
	}
	list, err := parseListReply(reply)
	if err != nil {
		return
	}
	for _, e := range list {
		if e.same(f) && !d.owns(e.ID) {
			_, _ = call(ctx, d.socket, request{Execute: "remove_hostfwd", Arguments: map[string]int{"id": e.ID}})
		}
	}
}

func (d *Driver) owns(slirpID int) bool {
	for _, f := range d.ports {
		if f.ID == slirpID {
			return true
		}
	}
	return false
}

// Remove asks slirp4netns to stop forwarding id. A forward slirp4netns no
// longer holds (it was restarted) counts as removed.
func (d *Driver) Remove(ctx context.Context, id int) error {
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	d.mu.Lock()
	defer d.mu.Unlock()
	f, ok := d.ports[id]
	if !ok {
		return fmt.Errorf("unknown id: %d", id)
	}
	if err := d.remove(ctx, f); err != nil {
		return fmt.Errorf("remove port %d (%s): %w", id, f, err)
	}
	delete(d.ports, id)
	return nil
}

// remove deletes f from slirp4netns after checking that slirp4netns's entry
// under f.ID is still f: IDs restart at 1 when slirp4netns restarts, and a
// blind remove_hostfwd could take down someone else's forward.
func (d *Driver) remove(ctx context.Context, f hostfwd) error {
	reply, err := call(ctx, d.socket, request{Execute: "list_hostfwd"})
	if err != nil {
		return err
	}
	list, err := parseListReply(reply)
	if err != nil {
		return err
	}
	for _, e := range list {
		if e.ID == f.ID {
			if !e.same(f) {
				return nil
			}
			reply, err := call(ctx, d.socket, request{Execute: "remove_hostfwd", Arguments: map[string]int{"id": f.ID}})
			if err != nil {
				return err
			}
			return parseRemoveReply(reply)
		}
	}
	return nil
}

// Close removes every forward this driver added. When slirp4netns is gone
// its forwards went with it, so an unreachable API socket is not an error.
func (d *Driver) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	ids := make([]int, 0, len(d.ports))
	for id := range d.ports {
		ids = append(ids, id)
	}
	sort.Ints(ids)
	var errs []error
	for _, id := range ids {
		ctx, cancel := context.WithTimeout(context.Background(), Timeout)
		err := d.remove(ctx, d.ports[id])
		cancel()
		if err != nil && !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED) {
			errs = append(errs, fmt.Errorf("remove port %d (%s): %w", id, d.ports[id], err))
		}
		delete(d.ports, id)
	}
	return errors.Join(errs...)
}

// Forwards lists what slirp4netns itself forwards right now (all of it, not
// only this driver's), for checks and diagnostics.
func (d *Driver) Forwards(ctx context.Context) ([]string, error) {
	ctx, cancel := withTimeout(ctx)
	defer cancel()
	d.mu.Lock()
	defer d.mu.Unlock()
	reply, err := call(ctx, d.socket, request{Execute: "list_hostfwd"})
	if err != nil {
		return nil, err
	}
	list, err := parseListReply(reply)
	if err != nil {
		return nil, err
	}
	out := make([]string, len(list))
	for i, f := range list {
		out[i] = f.String()
	}
	return out, nil
}

// String formats f like a port spec, with slirp4netns's ID.
func (f hostfwd) String() string {
	s := fmt.Sprintf("%s:%d:%s:%d/%s", f.HostAddr, f.HostPort, f.GuestAddr, f.GuestPort, f.Proto)
	if f.ID != 0 {
		s += fmt.Sprintf(" (slirp4netns id %d)", f.ID)
	}
	return s
}

func withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < Timeout {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, Timeout)
}
