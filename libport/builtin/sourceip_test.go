package builtin

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
)

// whoami answers every TCP connection with the address the service sees.
func whoami(c net.Conn) {
	defer c.Close()
	io.WriteString(c, c.RemoteAddr().String())
}

func askWho(t *testing.T, dial func(network, addr string) (net.Conn, error), network, addr string) netip.AddrPort {
	t.Helper()
	c, err := dial(network, addr)
	if err != nil {
		t.Fatalf("dial %s %s: %v", network, addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read from %s: %v", addr, err)
	}
	ap, err := netip.ParseAddrPort(string(b))
	if err != nil {
		t.Fatalf("service answered %q: %v", b, err)
	}
	return ap
}

func TestTCPSourceIPKept(t *testing.T) {
	d, n := setup(t, Options{})
	peer := testenv.NewPeer(t)
	l4 := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	serve(l4, whoami)
	l6 := testenv.Listen(t, n.Path, "tcp6", "[::1]:0")
	serve(l6, whoami)
	dual, _ := publish(t, d, libport.Spec{Proto: "tcp", ChildPort: childPort(l4.Addr())})
	v4, _ := publish(t, d, libport.Spec{Proto: "tcp4", ChildPort: childPort(l4.Addr())})
	v6, _ := publish(t, d, libport.Spec{Proto: "tcp6", ChildPort: childPort(l6.Addr())})

	cases := []struct {
		name, network, host string
		port                int
		want                net.IP
	}{
		{"tcp4", "tcp4", peer.LocalIP4.String(), v4.ParentPort, peer.PeerIP4},
		{"tcp6", "tcp6", peer.LocalIP6.String(), v6.ParentPort, peer.PeerIP6},
		{"tcp dual-stack, IPv4 client", "tcp4", peer.LocalIP4.String(), dual.ParentPort, peer.PeerIP4},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for i := 0; i < 3; i++ { // reuse of the routing set-up, and of ports
				got := askWho(t, peer.Dial, c.network, hostPort(c.host, c.port))
				if !net.IP(got.Addr().AsSlice()).Equal(c.want) {
					t.Fatalf("service saw %s, want the peer's %s", got, c.want)
				}
			}
		})
	}
	t.Run("loopback client", func(t *testing.T) {
		got := askWho(t, net.Dial, "tcp4", hostPort("127.0.0.1", v4.ParentPort))
		if got.Addr() != netip.MustParseAddr("127.0.0.1") {
			t.Fatalf("service saw %s for a loopback client", got)
		}
		got = askWho(t, net.Dial, "tcp6", hostPort("::1", v6.ParentPort))
		if got.Addr() != netip.IPv6Loopback() {
			t.Fatalf("service saw %s for a loopback client", got)
		}
	})
	t.Run("echo both ways", func(t *testing.T) {
		l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
		serve(l, echo)
		spec, _ := publish(t, d, libport.Spec{Proto: "tcp4", ChildPort: childPort(l.Addr())})
		c, err := peer.Dial("tcp4", hostPort(peer.LocalIP4.String(), spec.ParentPort))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		msg := strings.Repeat("0123456789", 100000)
		go io.WriteString(c, msg)
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
			t.Fatalf("1 MB echo through a transparent connection: %v", err)
		}
	})
}

func TestTCPSourceIPOff(t *testing.T) {
	d, n := setup(t, Options{SourceIP: SourceIP{DisableTCP: true}})
	peer := testenv.NewPeer(t)
	l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	serve(l, whoami)
	spec, _ := publish(t, d, libport.Spec{Proto: "tcp4", ChildPort: childPort(l.Addr())})
	got := askWho(t, peer.Dial, "tcp4", hostPort(peer.LocalIP4.String(), spec.ParentPort))
	if got.Addr() != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("with source IP off the service saw %s, want 127.0.0.1", got)
	}
}

// TestTCPSourceIPFallsBack: when the child cannot be configured (a child
// whose /proc/sys is read-only refuses the sysctl; the real source is
// wrapped to refuse it here), connections still work, from the child's own
// address, and the log says so once.
func TestTCPSourceIPFallsBack(t *testing.T) {
	testenv.RequireRoot(t)
	u := testenv.Unprivileged(t)
	n := testenv.ChildNetns(t, u)
	src := &failingSysctl{setnsSource(t, n.Path)}
	var logged []string
	d, err := New(src, Options{Logf: func(f string, a ...any) { logged = append(logged, fmt.Sprintf(f, a...)) }})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	peer := testenv.NewPeer(t)
	l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	serve(l, whoami)
	spec, _ := publish(t, d, libport.Spec{Proto: "tcp4", ChildPort: childPort(l.Addr())})
	for i := 0; i < 3; i++ {
		got := askWho(t, peer.Dial, "tcp4", hostPort(peer.LocalIP4.String(), spec.ParentPort))
		if got.Addr() != netip.MustParseAddr("127.0.0.1") {
			t.Fatalf("service saw %s, want 127.0.0.1 after the fallback", got)
		}
	}
	if len(logged) != 1 || !strings.Contains(logged[0], "TCP source IP is off") {
		t.Fatalf("log: %q, want one line saying TCP source IP is off", logged)
	}
}

func TestUDPSourceIPKept(t *testing.T) {
	d, n := setup(t, Options{SourceIP: SourceIP{UDP: true}})
	peer := testenv.NewPeer(t)
	s4 := testenv.ListenPacket(t, n.Path, "udp4", "0.0.0.0:0")
	serveUDP(s4)
	s6 := testenv.ListenPacket(t, n.Path, "udp6", "[::]:0")
	serveUDP(s6)
	v4, id4 := publish(t, d, libport.Spec{Proto: "udp4", ChildPort: childPort(s4.LocalAddr())})
	v6, _ := publish(t, d, libport.Spec{Proto: "udp6", ChildPort: childPort(s6.LocalAddr())})
	cases := []struct {
		network, local string
		to             net.IP
		port           int
		want           net.IP
	}{
		{"udp4", peer.PeerIP4.String(), peer.LocalIP4, v4.ParentPort, peer.PeerIP4},
		{"udp6", peer.PeerIP6.String(), peer.LocalIP6, v6.ParentPort, peer.PeerIP6},
	}
	for _, c := range cases {
		t.Run(c.network, func(t *testing.T) {
			for i := 0; i < 20; i++ { // distinct client ports, distinct flows
				pc, err := peer.ListenPacket(c.network, hostPort(c.local, 0))
				if err != nil {
					t.Fatal(err)
				}
				got, err := udpAsk(pc, &net.UDPAddr{IP: c.to, Port: c.port}, "who")
				local := pc.LocalAddr().String()
				pc.Close()
				if err != nil {
					t.Fatal(err)
				}
				if want := "reply to " + local + ": who"; got != want {
					t.Fatalf("got %q, want %q", got, want)
				}
			}
		})
	}
	// The per-port rule goes with the port.
	rulesBefore := n.Run(t, testenv.Unprivileged(t), "ip", "-4", "rule")
	if !strings.Contains(rulesBefore, fmt.Sprintf("sport %d", v4.ChildPort)) {
		t.Fatalf("no UDP rule for child port %d in:\n%s", v4.ChildPort, rulesBefore)
	}
	if err := d.Remove(t.Context(), id4); err != nil {
		t.Fatal(err)
	}
	if rules := n.Run(t, testenv.Unprivileged(t), "ip", "-4", "rule"); strings.Contains(rules, fmt.Sprintf("sport %d", v4.ChildPort)) {
		t.Fatalf("the UDP rule for child port %d outlived its port:\n%s", v4.ChildPort, rules)
	}
}

func TestUDPSourceIPOffByDefault(t *testing.T) {
	d, n := setup(t, Options{})
	peer := testenv.NewPeer(t)
	s := testenv.ListenPacket(t, n.Path, "udp4", "127.0.0.1:0")
	serveUDP(s)
	spec, _ := publish(t, d, libport.Spec{Proto: "udp4", ChildPort: childPort(s.LocalAddr())})
	pc, err := peer.ListenPacket("udp4", hostPort(peer.PeerIP4.String(), 0))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	got, err := udpAsk(pc, &net.UDPAddr{IP: peer.LocalIP4, Port: spec.ParentPort}, "who")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(got, "reply to 127.0.0.1:") {
		t.Fatalf("without UDP source IP the service saw %q", got)
	}
	if rules := n.Run(t, testenv.Unprivileged(t), "ip", "-4", "rule"); strings.Contains(rules, "ipproto udp") {
		t.Fatalf("a UDP rule exists without UDP source IP:\n%s", rules)
	}
}
