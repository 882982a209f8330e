package libport

import (
	"context"
	"fmt"
	"sort"
	"sync"
)

// Table is the port table of one forwarder: it validates specs, refuses
// conflicts before the driver touches a socket, and assigns IDs from 1 that
// are never reused. It is safe for concurrent use.
type Table struct {
	driver Driver

	mu     sync.Mutex
	nextID int
	ports  map[int]Spec
	// pending holds specs whose driver Add is under way, so a concurrent
	// conflicting Add is refused instead of racing to the listener.
	pending map[int]Spec
}

// NewTable returns an empty table over d.
func NewTable(d Driver) *Table {
	return &Table{driver: d, nextID: 1, ports: map[int]Spec{}, pending: map[int]Spec{}}
}

// Driver returns the driver the table forwards through.
func (t *Table) Driver() Driver { return t.driver }

// Add validates spec, reserves an ID, and asks the driver to forward it.
// When the driver fails the ID stays burnt and no entry remains.
func (t *Table) Add(ctx context.Context, spec Spec) (Status, error) {
	if err := spec.Validate(); err != nil {
		return Status{}, fmt.Errorf("port spec %s: %w", spec, err)
	}
	t.mu.Lock()
	for _, m := range []map[int]Spec{t.ports, t.pending} {
		for id, other := range m {
			if Conflicts(spec, other) {
				t.mu.Unlock()
				return Status{}, fmt.Errorf("port spec %s conflicts with port %d (%s)", spec, id, other)
			}
		}
	}
	id := t.nextID
	t.nextID++
	t.pending[id] = spec
	t.mu.Unlock()

	err := t.driver.Add(ctx, id, spec)

	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.pending, id)
	if err != nil {
		return Status{}, err
	}
	t.ports[id] = spec
	return Status{ID: id, Spec: spec}, nil
}

// Remove stops forwarding id. When the driver refuses (pasta cannot drop a
// port it was started with), the entry stays: the list shows what is forwarded.
func (t *Table) Remove(ctx context.Context, id int) error {
	t.mu.Lock()
	spec, ok := t.ports[id]
	if ok {
		// Pending while the driver works: a second Remove says unknown id,
		// and a conflicting Add is still refused.
		delete(t.ports, id)
		t.pending[id] = spec
	}
	t.mu.Unlock()
	if !ok {
		return fmt.Errorf("unknown id: %d", id)
	}
	err := t.driver.Remove(ctx, id)
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.pending, id)
	if err != nil {
		t.ports[id] = spec
	}
	return err
}

// List returns the published ports ordered by ID.
func (t *Table) List() []Status {
	t.mu.Lock()
	defer t.mu.Unlock()
	list := make([]Status, 0, len(t.ports))
	for id, spec := range t.ports {
		list = append(list, Status{ID: id, Spec: spec})
	}
	sort.Slice(list, func(i, j int) bool { return list[i].ID < list[j].ID })
	return list
}

// Close removes every port and closes the driver.
func (t *Table) Close() error {
	t.mu.Lock()
	t.ports = map[int]Spec{}
	t.mu.Unlock()
	return t.driver.Close()
}
