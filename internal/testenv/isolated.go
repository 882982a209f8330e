package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// IsolatedHost is a network namespace that stands in for the host when a
// test makes a backend send traffic "to the outside" (e.g. pasta with
// --no-map-gw forwards the gateway address to the real network). Its only
// uplink is a veth to a dead-end namespace that forwards nothing, so such
// traffic never leaves the machine.
type IsolatedHost struct {
	Path string // the host stand-in's netns, bind-mounted under /run/netns
}

// NewIsolatedHost makes an IsolatedHost (with loopback up, an address and a
// default route, which pasta needs to find a template interface) and
// removes it at cleanup. Needs root.
func NewIsolatedHost(t testing.TB) *IsolatedHost {
	t.Helper()
	RequireRoot(t)
	RequireBinary(t, "ip")
	RequireBinary(t, "nsenter")
	id := fmt.Sprintf("%d-%d", os.Getpid(), isolatedSeq())
	host, end := "portkit-iso-h"+id, "portkit-iso-d"+id
	for _, ns := range []string{host, end} {
		ipRun(t, "netns", "add", ns)
		ns := ns
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	}
	// Both ends live in the test's own namespaces, so these addresses
	// cannot clash with the machine's or with other tests' peers.
	ipRun(t, "-n", host, "link", "add", "uplink", "type", "veth", "peer", "name", "deadend", "netns", end)
	ipRun(t, "-n", host, "addr", "add", "198.51.100.1/30", "dev", "uplink")
	ipRun(t, "-n", host, "link", "set", "uplink", "up")
	ipRun(t, "-n", host, "link", "set", "lo", "up")
	ipRun(t, "-n", host, "route", "add", "default", "via", "198.51.100.2")
	ipRun(t, "-n", end, "addr", "add", "198.51.100.2/30", "dev", "deadend")
	ipRun(t, "-n", end, "link", "set", "deadend", "up")
	return &IsolatedHost{Path: "/run/netns/" + host}
}

var isolatedCount struct{ n int }

func isolatedSeq() int {
	bins.Lock()
	defer bins.Unlock()
	isolatedCount.n++
	return isolatedCount.n
}

// Cmd returns a command that runs as u inside the host stand-in's netns
// (nsenter as root, then drops to u's uid and gid).
func (h *IsolatedHost) Cmd(u *User, name string, args ...string) *exec.Cmd {
	full := append([]string{"--net=" + h.Path, "-S", strconv.Itoa(u.UID), "-G", strconv.Itoa(u.GID), "--", name}, args...)
	cmd := exec.Command("nsenter", full...)
	cmd.Env = u.Env()
	return cmd
}
