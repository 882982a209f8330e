package forwarder

import (
	"context"
	"fmt"
	"sort"
	"sync"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/state"
)

// portsFile is the form of ports.json: the port table, rewritten after each
// change, from which a restarted forwarder restores its ports.
type portsFile struct {
	NextID int              `json:"nextID"` // the next ID the table would assign; IDs are never reused
	Ports  []libport.Status `json:"ports"`  // ordered by ID
}

// persistDriver wraps the port driver and rewrites ports.json after every
// successful Add and Remove, so the file always matches what is published.
// The table calls the driver with (id, spec), which is all the file needs.
type persistDriver struct {
	libport.Driver
	dir  *state.Dir
	logf func(string, ...any)

	mu    sync.Mutex
	ports map[int]libport.Spec
	next  int
}

func newPersistDriver(d libport.Driver, dir *state.Dir, logf func(string, ...any)) *persistDriver {
	return &persistDriver{Driver: d, dir: dir, logf: logf, ports: map[int]libport.Spec{}, next: 1}
}

func (p *persistDriver) setNext(next int) {
	p.mu.Lock()
	if next > p.next {
		p.next = next
	}
	p.mu.Unlock()
}

// Add publishes through the driver and records the port. If the record
// cannot be written (disk full, read-only), the port is withdrawn again and
// the add fails: a port the state directory does not know would be lost at
// the next restart.
func (p *persistDriver) Add(ctx context.Context, id int, spec libport.Spec) error {
	p.mu.Lock()
	if id >= p.next {
		p.next = id + 1
	}
	p.mu.Unlock()
	if err := p.Driver.Add(ctx, id, spec); err != nil {
		return err
	}
	p.mu.Lock()
	p.ports[id] = spec
	err := p.saveLocked()
	if err != nil {
		delete(p.ports, id)
	}
	p.mu.Unlock()
	if err != nil {
		if rerr := p.Driver.Remove(ctx, id); rerr != nil {
			p.logf("forwarder: withdrawing port %d (%s) after a failed save: %v", id, spec, rerr)
		}
		return fmt.Errorf("port %s: record it in the state directory: %w", spec, err)
	}
	return nil
}

// Remove withdraws the port; the table has already dropped it, so it is
// dropped from the record too even if the driver complains.
func (p *persistDriver) Remove(ctx context.Context, id int) error {
	err := p.Driver.Remove(ctx, id)
	p.mu.Lock()
	delete(p.ports, id)
	if serr := p.saveLocked(); serr != nil {
		p.logf("forwarder: recording the removal of port %d: %v", id, serr)
	}
	p.mu.Unlock()
	return err
}

func (p *persistDriver) save() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.saveLocked()
}

func (p *persistDriver) saveLocked() error {
	f := portsFile{NextID: p.next, Ports: make([]libport.Status, 0, len(p.ports))}
	for id, spec := range p.ports {
		f.Ports = append(f.Ports, libport.Status{ID: id, Spec: spec})
	}
	sort.Slice(f.Ports, func(i, j int) bool { return f.Ports[i].ID < f.Ports[j].ID })
	return p.dir.WriteJSON(state.PortsFile, f)
}
