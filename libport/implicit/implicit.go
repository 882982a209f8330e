// Package implicit is the port driver for --net=pasta: pasta forwards the
// ports it was started with (-t/-u) by itself, and the build Debian 12 ships
// (passt 2023-03-09) cannot change them while it runs (no pesto, no API).
// So this driver forwards nothing: Add accepts exactly the specs pasta was
// started with, which lets the forwarder list them in its port table, and
// refuses every other.
//
// What pasta keeps: a loopback client is spliced and seen as 127.0.0.1 in the
// child; other clients come through pasta's tap device.
package implicit

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"

	"github.com/portkit/portkit/libport"
)

// ErrFixedPorts is what Add and Remove wrap when asked for a change pasta
// cannot make at runtime.
var ErrFixedPorts = errors.New("pasta in this version cannot change ports at runtime; pass the port at start (-p) or use --port-driver=builtin with --net=pasta")

// Driver reports the ports pasta forwards.
type Driver struct {
	started []libport.Spec

	mu     sync.Mutex
	active map[int]libport.Spec // ID → spec, for specs currently in the table
	closed bool
}

// New returns a driver for a pasta started with these port specs.
func New(started []libport.Spec) *Driver {
	return &Driver{started: append([]libport.Spec(nil), started...), active: map[int]libport.Spec{}}
}

// Started is the specs pasta was started with, for seeding the port table.
func (d *Driver) Started() []libport.Spec { return append([]libport.Spec(nil), d.started...) }

// Info names the driver; pasta forwards both families and both transports.
func (d *Driver) Info() libport.DriverInfo {
	return libport.DriverInfo{Driver: "implicit", Protos: append([]string(nil), libport.Protos...)}
}

// Add accepts spec when pasta was started with it; pasta is already forwarding it.
func (d *Driver) Add(_ context.Context, id int, spec libport.Spec) error {
	if err := spec.Validate(); err != nil {
		return fmt.Errorf("port spec %s: %w", spec, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("port spec %s: implicit port driver is closed", spec)
	}
	if !d.wasStarted(spec) {
		return fmt.Errorf("port spec %s: %w (pasta forwards %s)", spec, ErrFixedPorts, d.startedList())
	}
	for other, s := range d.active {
		if same(s, spec) {
			return fmt.Errorf("port spec %s is already published as id %d", spec, other)
		}
	}
	if _, dup := d.active[id]; dup {
		return fmt.Errorf("port spec %s: id %d is already published", spec, id)
	}
	d.active[id] = spec
	return nil
}

// Remove cannot stop pasta forwarding: the port stays forwarded until pasta
// stops. The ID is released, so adding the spec again lists it again.
func (d *Driver) Remove(_ context.Context, id int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	spec, ok := d.active[id]
	if !ok {
		return fmt.Errorf("unknown id: %d", id)
	}
	// The entry stays: the port table keeps listing what pasta forwards.
	return fmt.Errorf("port %d (%s) stays forwarded until pasta stops: %w", id, spec, ErrFixedPorts)
}

// Close releases the driver; stopping pasta (and its ports) is the network's job.
func (d *Driver) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	d.active = map[int]libport.Spec{}
	return nil
}

func (d *Driver) wasStarted(spec libport.Spec) bool {
	for _, s := range d.started {
		if same(s, spec) {
			return true
		}
	}
	return false
}

func (d *Driver) startedList() string {
	if len(d.started) == 0 {
		return "no ports"
	}
	names := make([]string, len(d.started))
	for i, s := range d.started {
		names[i] = s.String()
	}
	return strings.Join(names, ", ")
}

// same compares specs as the forwarding they describe: an unspecified parent
// address is the same as none, and addresses compare by value.
func same(a, b libport.Spec) bool {
	return a.Proto == b.Proto && a.ParentPort == b.ParentPort && a.ChildPort == b.ChildPort &&
		canonicalIP(a.ParentIP) == canonicalIP(b.ParentIP) && canonicalIP(a.ChildIP) == canonicalIP(b.ChildIP)
}

func canonicalIP(text string) string {
	ip := net.ParseIP(text)
	switch {
	case ip == nil:
		return text
	case ip.IsUnspecified():
		return ""
	}
	return ip.String()
}
