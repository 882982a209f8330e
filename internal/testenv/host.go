package testenv

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// Peer is a test "host": a network namespace joined to the test's own
// namespace by a veth pair, so that its connections arrive from a
// non-loopback address. Addresses come from the documentation ranges.
type Peer struct {
	Path      string // the peer's netns, bind-mounted under /run/netns
	LocalIP4  net.IP // our end of the veth
	PeerIP4   net.IP // the peer's end: the source address our listeners see
	LocalIP6  net.IP
	PeerIP6   net.IP
	Interface string // our end's name
}

// peerNets are the /24s peers are carved from, as /30s, one per live peer
// machine-wide (tests of several packages run at once). A /24 the machine
// already uses (some test machines sit on 192.0.2.0/24) is skipped.
var peerNets = []string{"198.51.100.", "203.0.113.", "192.0.2."}

const peerLockDir = "/run/portkit-testenv"

// NewPeer makes a Peer and removes it at cleanup. Needs root.
func NewPeer(t testing.TB) *Peer {
	t.Helper()
	RequireRoot(t)
	RequireBinary(t, "ip")
	idx := allocPeer(t)
	net4 := peerNets[idx/64]
	base := (idx % 64) * 4
	p := &Peer{
		LocalIP4:  net.ParseIP(net4 + strconv.Itoa(base+1)),
		PeerIP4:   net.ParseIP(net4 + strconv.Itoa(base+2)),
		LocalIP6:  net.ParseIP(fmt.Sprintf("fd00:706b:%x::1", idx)),
		PeerIP6:   net.ParseIP(fmt.Sprintf("fd00:706b:%x::2", idx)),
		Interface: fmt.Sprintf("pkt%d", idx),
	}
	name := fmt.Sprintf("portkit-peer%d", idx)
	p.Path = "/run/netns/" + name
	peerIf := p.Interface + "p"
	ipRun(t, "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	ipRun(t, "link", "add", p.Interface, "type", "veth", "peer", "name", peerIf)
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", p.Interface).Run() })
	ipRun(t, "link", "set", peerIf, "netns", name)
	ipRun(t, "addr", "add", p.LocalIP4.String()+"/30", "dev", p.Interface)
	ipRun(t, "addr", "add", p.LocalIP6.String()+"/64", "dev", p.Interface, "nodad")
	ipRun(t, "link", "set", p.Interface, "up")
	ipRun(t, "-n", name, "addr", "add", p.PeerIP4.String()+"/30", "dev", peerIf)
	ipRun(t, "-n", name, "addr", "add", p.PeerIP6.String()+"/64", "dev", peerIf, "nodad")
	ipRun(t, "-n", name, "link", "set", peerIf, "up")
	ipRun(t, "-n", name, "link", "set", "lo", "up")
	ipRun(t, "-n", name, "route", "add", "default", "via", p.LocalIP4.String())
	ipRun(t, "-n", name, "-6", "route", "add", "default", "via", p.LocalIP6.String())
	return p
}

// Dial connects from inside the peer.
func (p *Peer) Dial(network, addr string) (net.Conn, error) {
	var c net.Conn
	err := Do(p.Path, func() (err error) { c, err = net.Dial(network, addr); return })
	return c, err
}

// ListenPacket opens a packet socket inside the peer.
func (p *Peer) ListenPacket(network, addr string) (net.PacketConn, error) {
	var c net.PacketConn
	err := Do(p.Path, func() (err error) { c, err = net.ListenPacket(network, addr); return })
	return c, err
}

func ipRun(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// allocPeer claims a free peer index with an O_EXCL lock file naming our PID;
// a lock whose process is gone is taken over.
func allocPeer(t testing.TB) int {
	t.Helper()
	if err := os.MkdirAll(peerLockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for idx := 0; idx < 64*len(peerNets); idx++ {
		if netInUse(peerNets[idx/64]) {
			continue
		}
		lock := filepath.Join(peerLockDir, "peer"+strconv.Itoa(idx))
		f, err := os.OpenFile(lock, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
		if err != nil {
			data, rerr := os.ReadFile(lock)
			pid, _ := strconv.Atoi(strings.TrimSpace(string(data)))
			if rerr == nil && pid > 0 && syscall.Kill(pid, 0) != nil {
				// Stale: its owner died without cleaning up; clear what it left.
				_ = exec.Command("ip", "netns", "del", fmt.Sprintf("portkit-peer%d", idx)).Run()
				_ = exec.Command("ip", "link", "del", fmt.Sprintf("pkt%d", idx)).Run()
				_ = os.Remove(lock)
				idx--
			}
			continue
		}
		fmt.Fprintf(f, "%d\n", os.Getpid())
		f.Close()
		t.Cleanup(func() { os.Remove(lock) })
		return idx
	}
	t.Fatal("no free test peer subnet")
	return 0
}

// netInUse reports whether an interface other than a test peer's has an
// address in prefix+"0/24".
func netInUse(prefix string) bool {
	_, want, _ := net.ParseCIDR(prefix + "0/24")
	ifaces, _ := net.Interfaces()
	for _, ifc := range ifaces {
		if strings.HasPrefix(ifc.Name, "pkt") {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && want.Contains(ipn.IP) {
				return true
			}
		}
	}
	return false
}
