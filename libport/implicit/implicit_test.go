package implicit

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/drivertest"
	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// startPasta attaches a real pasta, rootless as u, to ns with the given
// ports, as libport/network does for --net=pasta, and waits until it is ready.
func startPasta(t *testing.T, u *testenv.User, ns *testenv.Netns, ports []libport.Spec) {
	t.Helper()
	testenv.RequireBinary(t, "pasta")
	pidFile := filepath.Join(u.Dir(t), "pasta.pid")
	args := []string{"--foreground", "--quiet", "--pid=" + pidFile, "--config-net", "--ns-ifname=tap0",
		"--mtu=65520", "--address=10.0.2.100", "--netmask=24", "--gateway=10.0.2.2", "--ipv4-only",
		"--tcp-ns=none", "--udp-ns=none"}
	for _, s := range ports {
		arg := strconv.Itoa(s.ParentPort) + ":" + strconv.Itoa(s.ChildPort)
		if s.ParentIP != "" {
			arg = s.ParentIP + "/" + arg
		}
		args = append(args, "--"+s.Transport()+"-ports="+arg)
	}
	args = append(args, fmt.Sprintf("--userns=/proc/%d/ns/user", ns.PID), "--netns="+ns.Path)
	cmd := u.Cmd("pasta", args...)
	log := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = log, log
	testenv.Start(t, cmd)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if b, err := os.ReadFile(pidFile); err == nil && strings.HasSuffix(string(b), "\n") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pasta %s not ready after 10s:\n%s", strings.Join(args, " "), log)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestPastaPortsThroughImplicitDriver: pasta, rootless, forwards the ports it
// was started with; the driver lists exactly those and refuses the rest.
func TestPastaPortsThroughImplicitDriver(t *testing.T) {
	u := testenv.Unprivileged(t)
	ns := testenv.ChildNetns(t, u)
	tcpPort, udpPort := drivertest.FreePort(t), drivertest.FreePort(t)
	started := []libport.Spec{
		{Proto: "tcp", ParentPort: tcpPort, ChildPort: 8080},
		{Proto: "udp", ParentPort: udpPort, ChildPort: 5353},
	}
	drivertest.ServeTCP(t, testenv.Listen(t, ns.Path, "tcp4", "0.0.0.0:8080"))
	udpSeen := drivertest.ServeUDP(t, testenv.ListenPacket(t, ns.Path, "udp4", "0.0.0.0:5353"))
	startPasta(t, u, ns, started)

	drv := New(started)
	table := libport.NewTable(drv)
	ctx := context.Background()
	if info := drv.Info(); info.Driver != "implicit" || strings.Join(info.Protos, " ") != "tcp tcp4 tcp6 udp udp4 udp6" {
		t.Fatalf("Info() = %+v", info)
	}
	var ids []int
	for _, s := range started {
		st, err := table.Add(ctx, s)
		if err != nil {
			t.Fatalf("add %s that pasta was started with: %v", s, err)
		}
		ids = append(ids, st.ID)
	}
	other := libport.Spec{Proto: "tcp", ParentPort: drivertest.FreePort(t), ChildPort: 8080}
	_, err := table.Add(ctx, other)
	const want = "pasta in this version cannot change ports at runtime; pass the port at start (-p) or use --port-driver=builtin with --net=pasta"
	if err == nil || !strings.Contains(err.Error(), want) || !errors.Is(err, ErrFixedPorts) {
		t.Fatalf("add %s pasta does not forward: %v", other, err)
	}
	t.Logf("refused: %v", err)
	if got := len(table.List()); got != 2 {
		t.Fatalf("table lists %d ports, want 2", got)
	}

	// Loopback clients are spliced by pasta and seen as 127.0.0.1.
	seen, err := drivertest.TCPRoundTrip(net.Dial, "tcp4", fmt.Sprintf("127.0.0.1:%d", tcpPort))
	if err != nil {
		t.Fatalf("tcp via 127.0.0.1: %v", err)
	}
	if seen != "127.0.0.1" {
		t.Errorf("tcp from 127.0.0.1 seen as %s, want 127.0.0.1", seen)
	}
	lc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lc.Close()
	// pasta 2023-03-09 delivers a loopback client's datagram (seen as
	// 127.0.0.1) but loses the reply: strace shows it sending the reply
	// on fd 0 (ENOTSOCK). Accept either that or a fixed pasta.
	seen, err = drivertest.UDPRoundTrip(lc, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: udpPort})
	switch {
	case err == nil && seen != "127.0.0.1":
		t.Errorf("udp from 127.0.0.1 seen as %s, want 127.0.0.1", seen)
	case err != nil:
		select {
		case got := <-udpSeen:
			if got != "127.0.0.1" {
				t.Errorf("udp from 127.0.0.1 seen as %s, want 127.0.0.1", got)
			}
			t.Logf("udp via 127.0.0.1: the server got the datagram from %s but pasta lost the reply (known bug of this pasta build): %v", got, err)
		default:
			t.Errorf("udp via 127.0.0.1: the server never got the datagram: %v", err)
		}
	}
	drain(udpSeen)

	// Other clients come through pasta's tap device with their own address.
	peer := testenv.NewPeer(t)
	seenTCP, err := drivertest.TCPRoundTrip(peer.Dial, "tcp4", fmt.Sprintf("%s:%d", peer.LocalIP4, tcpPort))
	if err != nil {
		t.Fatalf("tcp from peer: %v", err)
	}
	pc, err := peer.ListenPacket("udp4", peer.PeerIP4.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	seenUDP, err := drivertest.UDPRoundTrip(pc, &net.UDPAddr{IP: peer.LocalIP4, Port: udpPort})
	if err != nil {
		t.Fatalf("udp from peer: %v", err)
	}
	t.Logf("source addresses: 127.0.0.1 → 127.0.0.1; peer %s → tcp %s, udp %s", peer.PeerIP4, seenTCP, seenUDP)
	if seenTCP != peer.PeerIP4.String() || seenUDP != peer.PeerIP4.String() {
		t.Errorf("peer %s seen as tcp %s, udp %s; want its own address", peer.PeerIP4, seenTCP, seenUDP)
	}

	// Remove cannot stop pasta: it says so, and the port does keep working.
	err = table.Remove(ctx, ids[0])
	if err == nil || !errors.Is(err, ErrFixedPorts) || !strings.Contains(err.Error(), "stays forwarded") {
		t.Fatalf("remove: %v", err)
	}
	if _, err := drivertest.TCPRoundTrip(net.Dial, "tcp4", fmt.Sprintf("127.0.0.1:%d", tcpPort)); err != nil {
		t.Fatalf("after the refused remove the port should still forward: %v", err)
	}
	// The table still lists it, since pasta still forwards it.
	if list := table.List(); len(list) == 0 || list[0].ID != ids[0] {
		t.Fatalf("after the refused remove the list should still show port %d: %v", ids[0], list)
	}
	if err := table.Close(); err != nil {
		t.Fatal(err)
	}
}

func drain(c <-chan string) {
	for {
		select {
		case <-c:
		default:
			return
		}
	}
}

func TestImplicitMatchesSpecsByMeaning(t *testing.T) {
	started := []libport.Spec{
		{Proto: "tcp", ParentPort: 8080, ChildPort: 80},
		{Proto: "udp6", ParentIP: "fd00:0::1", ParentPort: 53, ChildPort: 53},
	}
	ctx := context.Background()
	for _, tc := range []struct {
		spec libport.Spec
		ok   bool
	}{
		{libport.Spec{Proto: "tcp", ParentPort: 8080, ChildPort: 80}, true},
		{libport.Spec{Proto: "tcp", ParentIP: "0.0.0.0", ParentPort: 8080, ChildPort: 80}, true},
		{libport.Spec{Proto: "udp6", ParentIP: "fd00::1", ParentPort: 53, ChildPort: 53}, true},
		{libport.Spec{Proto: "tcp4", ParentPort: 8080, ChildPort: 80}, false},
		{libport.Spec{Proto: "tcp", ParentIP: "127.0.0.1", ParentPort: 8080, ChildPort: 80}, false},
		{libport.Spec{Proto: "tcp", ParentPort: 8080, ChildPort: 81}, false},
		{libport.Spec{Proto: "tcp", ParentPort: 8080, ChildIP: "10.0.2.100", ChildPort: 80}, false},
		{libport.Spec{Proto: "udp6", ParentPort: 53, ChildPort: 53}, false},
	} {
		d := New(started)
		err := d.Add(ctx, 1, tc.spec)
		if (err == nil) != tc.ok {
			t.Errorf("Add(%s) = %v, want ok=%v", tc.spec, err, tc.ok)
		}
		if !tc.ok && !errors.Is(err, ErrFixedPorts) {
			t.Errorf("Add(%s) = %v, want ErrFixedPorts", tc.spec, err)
		}
	}

	d := New(started)
	if err := d.Add(ctx, 1, started[0]); err != nil {
		t.Fatal(err)
	}
	if err := d.Add(ctx, 2, libport.Spec{Proto: "tcp", ParentIP: "0.0.0.0", ParentPort: 8080, ChildPort: 80}); err == nil || !strings.Contains(err.Error(), "already published as id 1") {
		t.Errorf("second add of the same forwarding: %v", err)
	}
	if err := d.Remove(ctx, 7); err == nil || err.Error() != "unknown id: 7" {
		t.Errorf("remove unknown: %v", err)
	}
	if err := New(nil).Add(ctx, 1, started[0]); err == nil || !strings.Contains(err.Error(), "pasta forwards no ports") {
		t.Errorf("add with no started ports: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Add(ctx, 3, started[1]); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("add after close: %v", err)
	}
}
