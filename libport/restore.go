package libport

import (
	"context"
	"errors"
	"fmt"
)

// Restore re-publishes ports under the IDs they had (a forwarder restarted
// after a crash, its table read back from the state directory), so clients
// that remember an ID can still remove it, and makes new IDs start at next
// or above so none is reused. A port that fails validation, conflicts, or
// that the driver refuses is left out; the errors are joined.
func (t *Table) Restore(ctx context.Context, next int, ports []Status) error {
	var errs []error
	for _, st := range ports {
		if err := t.restoreOne(ctx, st); err != nil {
			errs = append(errs, fmt.Errorf("restore port %d (%s): %w", st.ID, st.Spec, err))
		}
	}
	t.mu.Lock()
	if next > t.nextID {
		t.nextID = next
	}
	t.mu.Unlock()
	return errors.Join(errs...)
}

func (t *Table) restoreOne(ctx context.Context, st Status) error {
	if st.ID < 1 {
		return fmt.Errorf("id %d is not a port ID", st.ID)
	}
	if err := st.Spec.Validate(); err != nil {
		return err
	}
	t.mu.Lock()
	for _, m := range []map[int]Spec{t.ports, t.pending} {
		if _, taken := m[st.ID]; taken {
			t.mu.Unlock()
			return fmt.Errorf("id %d is taken", st.ID)
		}
		for id, other := range m {
			if Conflicts(st.Spec, other) {
				t.mu.Unlock()
				return fmt.Errorf("conflicts with port %d (%s)", id, other)
			}
		}
	}
	if st.ID >= t.nextID {
		t.nextID = st.ID + 1
	}
	t.pending[st.ID] = st.Spec
	t.mu.Unlock()

	err := t.driver.Add(ctx, st.ID, st.Spec)

	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.pending, st.ID)
	if err != nil {
		return err
	}
	t.ports[st.ID] = st.Spec
	return nil
}
