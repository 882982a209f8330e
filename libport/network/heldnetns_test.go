package network

import (
	"fmt"
	"os"
	"testing"

	"github.com/portkit/portkit/internal/testenv"
)

// TestStartOnNetnsHeldByDescriptor starts each backend on a netns named by
// /proc/PID/fd/N of a process in the parent's user namespace that holds it
// open (as the OCI hook's netns receiver does for rootless crun). pasta
// joins the child's user namespace before it opens the netns, and from
// there such a path is EACCES, so Start must hand it a descriptor.
func TestStartOnNetnsHeldByDescriptor(t *testing.T) {
	for _, backend := range Backends {
		t.Run(backend, func(t *testing.T) {
			requireNetworkTools(t, backend)
			u := testenv.Unprivileged(t)
			ns := testenv.ChildNetns(t, u)
			f, err := os.Open(ns.Path)
			if err != nil {
				t.Fatal(err)
			}
			holder := u.Cmd("sleep", "60")
			holder.ExtraFiles = []*os.File{f} // fd 3
			testenv.Start(t, holder)
			f.Close()
			path := fmt.Sprintf("/proc/%d/fd/3", holder.Process.Pid)
			a := startAgent(t, u, Config{Backend: backend, NetnsPath: path})
			pid := a.report.PID
			a.stop(t)
			if processAlive(pid) {
				t.Fatalf("%s (pid %d) alive after Stop", backend, pid)
			}
		})
	}
}
