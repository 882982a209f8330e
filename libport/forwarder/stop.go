package forwarder

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/portkit/portkit/libport/state"
)

// Stop ends the forwarder serving stateDir (spawned or not) and removes the
// directory. It is idempotent: a missing directory, or one whose processes
// are already gone, is fine. A recorded PID is signalled only while it still
// names the recorded process (PID and start time), so a PID reused by
// another process is never hit.
func Stop(stateDir string) error {
	d, err := state.Open(stateDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stop forwarder: %w", err)
	}
	defer d.Close()

	deadline := time.Now().Add(2 * stopGrace)
	for {
		// The supervisor stops its forwarder; the forwarder stops its
		// network process; whatever survives its parent is stopped here.
		for _, name := range []string{state.SupervisorPID, state.ForwarderFile, state.NetworkPID} {
			p, err := d.ReadProcess(name)
			if err != nil {
				continue // missing, or removed by its owner as it stopped
			}
			if err := p.Stop(stopGrace); err != nil {
				return fmt.Errorf("stop forwarder in %s: %s: %w", stateDir, name, err)
			}
		}
		if !d.IsLocked() {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("stop forwarder: %s is still locked by a process it does not record: find it with `fuser %s`", stateDir, d.Join(state.LockFile))
		}
		// Locked with no live process recorded: a forwarder between taking
		// the lock and writing its pid file. Look again.
		time.Sleep(20 * time.Millisecond)
	}
	return d.RemoveAll()
}

// Check reports whether the forwarder serving stateDir is up: its process
// (and network process, if it started one) alive and its API socket
// answering. The error names what is down; while a supervisor restarts a
// dead forwarder, Check says so.
func Check(stateDir string) error {
	d, err := state.Open(stateDir)
	if err != nil {
		return fmt.Errorf("check forwarder: %w", err)
	}
	defer d.Close()
	fwd, err := d.ReadProcess(state.ForwarderFile)
	if err != nil || !fwd.Alive() {
		what := "no forwarder is recorded"
		if err == nil {
			what = fmt.Sprintf("the forwarder (pid %d) is not running", fwd.PID)
		}
		if sup, serr := d.ReadProcess(state.SupervisorPID); serr == nil && sup.Alive() {
			what += fmt.Sprintf("; its supervisor (pid %d) is restarting it", sup.PID)
		}
		return fmt.Errorf("check %s: %s", stateDir, what)
	}
	if p, err := d.ReadProcess(state.NetworkPID); err == nil && !p.Alive() {
		name := "network process"
		var cfg Config
		if d.ReadJSON(state.ConfigFile, &cfg) == nil && cfg.Network != nil {
			name = cfg.Network.Backend
		}
		return fmt.Errorf("check %s: %s (pid %d) is not running", stateDir, name, p.PID)
	}
	c, err := net.DialTimeout("unix", d.Join(state.APISocket), 2*time.Second)
	if err != nil {
		return fmt.Errorf("check %s: the API socket does not answer: %w", stateDir, err)
	}
	c.Close()
	return nil
}
