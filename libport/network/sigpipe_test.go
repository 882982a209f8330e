package network

import (
	"os"
	"os/signal"
	"syscall"
	"testing"

	"github.com/portkit/portkit/internal/testenv"
)

// ignoreSIGPIPEEnv makes the agent ignore SIGPIPE before Start, as the
// forwarder does (its name lacks the PORTKIT_ prefix testenv filters out).
const ignoreSIGPIPEEnv = "NETWORK_TEST_IGNORE_SIGPIPE"

func init() {
	if os.Getenv(ignoreSIGPIPEEnv) == "1" {
		signal.Ignore(syscall.SIGPIPE)
	}
}

// TestStartWhileIgnoringSIGPIPE starts each backend from a process that
// ignores SIGPIPE: Debian 12's pasta fails with "Couldn't install signal
// handlers" if it inherits that, so Start must not pass it on.
func TestStartWhileIgnoringSIGPIPE(t *testing.T) {
	t.Setenv(ignoreSIGPIPEEnv, "1")
	for _, backend := range Backends {
		t.Run(backend, func(t *testing.T) {
			requireNetworkTools(t, backend)
			u := testenv.Unprivileged(t)
			ns := testenv.ChildNetns(t, u)
			a := startAgent(t, u, Config{Backend: backend, NetnsPath: ns.Path})
			pid := a.report.PID
			a.stop(t)
			if processAlive(pid) {
				t.Fatalf("%s (pid %d) alive after Stop", backend, pid)
			}
		})
	}
}
