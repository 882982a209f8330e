package slirp4netns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/drivertest"
	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
)

func TestMain(m *testing.M) {
	drivertest.Serve(map[string]drivertest.Factory{
		"slirp4netns": func(args []string) (libport.Driver, error) { return New(args[0], args[1]) },
	})
	testenv.Main(m)
}

// slirp is a real slirp4netns, run as the test user, attached to a child netns.
type slirp struct {
	ns     *testenv.Netns
	socket string
	cmd    *exec.Cmd
}

// startSlirp4netns attaches slirp4netns (rootless, as u) to a new child
// netns the way RootlessKit and libport/network do, and waits until it is ready.
func startSlirp4netns(t *testing.T, u *testenv.User) *slirp {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "slirp4netns")
	ns := testenv.ChildNetns(t, u)
	socket := filepath.Join(u.Dir(t), "slirp4netns.sock")
	readyR, readyW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer readyR.Close()
	cmd := u.Cmd("slirp4netns", "--configure", "--mtu=65520", "--api-socket", socket, "--ready-fd=3",
		"--netns-type=path", fmt.Sprintf("--userns-path=/proc/%d/ns/user", ns.PID), ns.Path, "tap0")
	cmd.ExtraFiles = []*os.File{readyW}
	log := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = log, log
	testenv.Start(t, cmd)
	readyW.Close()
	_ = readyR.SetReadDeadline(time.Now().Add(10 * time.Second))
	b := make([]byte, 1)
	if _, err := readyR.Read(b); err != nil || b[0] != '1' {
		t.Fatalf("slirp4netns not ready: %v (%q)\n%s", err, b, log)
	}
	return &slirp{ns: ns, socket: socket, cmd: cmd}
}

// list asks slirp4netns itself (not our driver) what it forwards.
func (s *slirp) list(t *testing.T) []hostfwd {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reply, err := call(ctx, s.socket, request{Execute: "list_hostfwd"})
	if err != nil {
		t.Fatal(err)
	}
	list, err := parseListReply(reply)
	if err != nil {
		t.Fatal(err)
	}
	return list
}

// TestPublishThroughSlirp4netnsAsUnprivilegedUser drives a rootless
// slirp4netns through the driver running as the same unprivileged user.
func TestPublishThroughSlirp4netnsAsUnprivilegedUser(t *testing.T) {
	u := testenv.Unprivileged(t)
	s := startSlirp4netns(t, u)
	drv := drivertest.Start(t, u, "slirp4netns", s.socket, "")
	table := libport.NewTable(drv)
	ctx := context.Background()

	if info := drv.Info(); info.Driver != "slirp4netns" || !info.DisallowLoopbackChildIP ||
		strings.Join(info.Protos, " ") != "tcp tcp4 udp udp4" {
		t.Fatalf("Info() = %+v", info)
	}

	tl := testenv.Listen(t, s.ns.Path, "tcp4", "0.0.0.0:0")
	drivertest.ServeTCP(t, tl)
	uc := testenv.ListenPacket(t, s.ns.Path, "udp4", "0.0.0.0:0")
	drivertest.ServeUDP(t, uc)
	childTCP := tl.Addr().(*net.TCPAddr).Port
	childUDP := uc.LocalAddr().(*net.UDPAddr).Port

	tcpPort, udpPort := drivertest.FreePort(t), drivertest.FreePort(t)
	tcpSt, err := table.Add(ctx, libport.Spec{Proto: "tcp", ParentPort: tcpPort, ChildPort: childTCP})
	if err != nil {
		t.Fatalf("add tcp: %v", err)
	}
	udpSt, err := table.Add(ctx, libport.Spec{Proto: "udp4", ParentIP: "0.0.0.0", ParentPort: udpPort, ChildPort: childUDP})
	if err != nil {
		t.Fatalf("add udp: %v", err)
	}

	// slirp4netns holds exactly what we asked, addressed to its guest address.
	want := []string{
		fmt.Sprintf("0.0.0.0:%d:10.0.2.100:%d/tcp", tcpPort, childTCP),
		fmt.Sprintf("0.0.0.0:%d:10.0.2.100:%d/udp", udpPort, childUDP),
	}
	got := s.list(t)
	if len(got) != 2 {
		t.Fatalf("slirp4netns lists %v, want %v", got, want)
	}
	for i, f := range got {
		f.ID = 0
		if f.String() != want[i] {
			t.Errorf("slirp4netns entry %d = %s, want %s", i, f, want[i])
		}
	}

	// A loopback client is seen as slirp4netns's gateway.
	seen, err := drivertest.TCPRoundTrip(net.Dial, "tcp4", fmt.Sprintf("127.0.0.1:%d", tcpPort))
	if err != nil {
		t.Fatalf("tcp via 127.0.0.1: %v", err)
	}
	if seen != "10.0.2.2" {
		t.Errorf("tcp from 127.0.0.1 seen as %s, want 10.0.2.2 (slirp4netns's gateway)", seen)
	}
	lc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lc.Close()
	seen, err = drivertest.UDPRoundTrip(lc, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: udpPort})
	if err != nil {
		t.Fatalf("udp via 127.0.0.1: %v", err)
	}
	if seen != "10.0.2.2" {
		t.Errorf("udp from 127.0.0.1 seen as %s, want 10.0.2.2", seen)
	}

	// A client on another address keeps its address.
	peer := testenv.NewPeer(t)
	seen, err = drivertest.TCPRoundTrip(peer.Dial, "tcp4", fmt.Sprintf("%s:%d", peer.LocalIP4, tcpPort))
	if err != nil {
		t.Fatalf("tcp from peer: %v", err)
	}
	if seen != peer.PeerIP4.String() {
		t.Errorf("tcp from peer %s seen as %s", peer.PeerIP4, seen)
	}
	pc, err := peer.ListenPacket("udp4", peer.PeerIP4.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	seen, err = drivertest.UDPRoundTrip(pc, &net.UDPAddr{IP: peer.LocalIP4, Port: udpPort})
	if err != nil {
		t.Fatalf("udp from peer: %v", err)
	}
	if seen != peer.PeerIP4.String() {
		t.Errorf("udp from peer %s seen as %s", peer.PeerIP4, seen)
	}
	t.Logf("source addresses: 127.0.0.1 → 10.0.2.2, peer %s → itself (TCP and UDP)", peer.PeerIP4)

	// Removal closes slirp4netns's listeners: the ports are free again.
	if err := table.Remove(ctx, tcpSt.ID); err != nil {
		t.Fatalf("remove tcp: %v", err)
	}
	if err := table.Remove(ctx, udpSt.ID); err != nil {
		t.Fatalf("remove udp: %v", err)
	}
	if got := s.list(t); len(got) != 0 {
		t.Fatalf("after remove slirp4netns still lists %v", got)
	}
	if _, err := net.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", tcpPort)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial removed tcp port: %v, want connection refused", err)
	}
	if c, err := net.ListenPacket("udp4", fmt.Sprintf("0.0.0.0:%d", udpPort)); err != nil {
		t.Errorf("removed udp port is still bound: %v", err)
	} else {
		c.Close()
	}
	if err := drv.Remove(ctx, tcpSt.ID); err == nil || !strings.Contains(err.Error(), "unknown id") {
		t.Errorf("second remove: %v, want unknown id", err)
	}
}

// TestSlirp4netnsRefusesWhatItCannotForward checks that each refusal names
// its reason and leaves slirp4netns untouched.
func TestSlirp4netnsRefusesWhatItCannotForward(t *testing.T) {
	u := testenv.Unprivileged(t)
	s := startSlirp4netns(t, u)
	drv := drivertest.Start(t, u, "slirp4netns", s.socket, "")
	ctx := context.Background()

	held, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldPort := held.Addr().(*net.TCPAddr).Port
	port := drivertest.FreePort(t)

	for _, tc := range []struct {
		spec libport.Spec
		want []string
	}{
		{libport.Spec{Proto: "tcp6", ParentPort: port, ChildPort: 80}, []string{"cannot forward IPv6", "tcp6", "builtin"}},
		{libport.Spec{Proto: "udp6", ParentPort: port, ChildPort: 80}, []string{"cannot forward IPv6", "udp6"}},
		{libport.Spec{Proto: "tcp", ParentIP: "::1", ParentPort: port, ChildPort: 80}, []string{"cannot forward IPv6", "::1", "IPv4 only"}},
		{libport.Spec{Proto: "tcp", ParentIP: "::", ParentPort: port, ChildPort: 80}, []string{"IPv4-only with this driver"}},
		{libport.Spec{Proto: "tcp", ParentPort: port, ChildIP: "127.0.0.1", ChildPort: 80}, []string{"loopback", "cannot reach"}},
		{libport.Spec{Proto: "tcp", ParentPort: port, ChildIP: "fd00::100", ChildPort: 80}, []string{"cannot forward IPv6"}},
		{libport.Spec{Proto: "sctp", ParentPort: port, ChildPort: 80}, []string{"unknown protocol"}},
		// slirp4netns's own refusal is quoted, with the reason it keeps to itself.
		{libport.Spec{Proto: "tcp", ParentIP: "127.0.0.1", ParentPort: heldPort, ChildPort: 80},
			[]string{`"bad request: add_hostfwd: slirp_add_hostfwd failed"`, "address already in use"}},
	} {
		err := drv.Add(ctx, 1, tc.spec)
		if err == nil {
			t.Errorf("Add(%s) succeeded", tc.spec)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("Add(%s) = %q, want it to mention %q", tc.spec, err, w)
			}
		}
		t.Logf("Add(%s): %v", tc.spec, err)
	}
	if got := s.list(t); len(got) != 0 {
		t.Fatalf("refused adds left forwards in slirp4netns: %v", got)
	}

	// Close removes what the driver added; the driver refuses work after.
	for i, p := range []int{drivertest.FreePort(t), drivertest.FreePort(t)} {
		if err := drv.Add(ctx, 10+i, libport.Spec{Proto: "tcp4", ParentIP: "127.0.0.1", ParentPort: p, ChildPort: 80}); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.list(t); len(got) != 2 {
		t.Fatalf("slirp4netns lists %v, want 2 forwards", got)
	}
	if err := drv.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if got := s.list(t); len(got) != 0 {
		t.Fatalf("after Close slirp4netns still lists %v", got)
	}
	if err := drv.Add(ctx, 20, libport.Spec{Proto: "tcp", ParentPort: port, ChildPort: 80}); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("Add after Close: %v", err)
	}
}

// TestRemoveLeavesOthersForwardAlone: when slirp4netns's entry under our ID
// is not ours any more (slirp4netns restarted and reused the ID), Remove must
// not take it down.
func TestRemoveLeavesOthersForwardAlone(t *testing.T) {
	u := testenv.Unprivileged(t)
	s := startSlirp4netns(t, u)
	d, err := New(s.socket, "")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	p1, p2 := drivertest.FreePort(t), drivertest.FreePort(t)
	if err := d.Add(ctx, 1, libport.Spec{Proto: "tcp", ParentIP: "127.0.0.1", ParentPort: p1, ChildPort: 80}); err != nil {
		t.Fatal(err)
	}
	// Someone else removes ours and adds theirs; theirs gets the next ID,
	// so make ours look like it had that ID.
	if _, err := call(ctx, s.socket, request{Execute: "remove_hostfwd", Arguments: map[string]int{"id": d.ports[1].ID}}); err != nil {
		t.Fatal(err)
	}
	reply, err := call(ctx, s.socket, request{Execute: "add_hostfwd", Arguments: hostfwd{Proto: "tcp", HostAddr: "127.0.0.1", HostPort: p2, GuestAddr: DefaultChildIP, GuestPort: 81}})
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := parseAddReply(reply)
	if err != nil {
		t.Fatal(err)
	}
	f := d.ports[1]
	f.ID = theirs
	d.ports[1] = f
	if err := d.Remove(ctx, 1); err != nil {
		t.Fatalf("remove: %v", err)
	}
	if got := s.list(t); len(got) != 1 || got[0].ID != theirs {
		t.Fatalf("slirp4netns lists %v, want only the other forward (id %d)", got, theirs)
	}
}

// TestAPISocketTimeout: a slirp4netns that accepts but never answers must
// not hang Add; the error says what was waited for.
func TestAPISocketTimeout(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "mute.sock")
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	d, err := New(socket, "")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = d.Add(ctx, 1, libport.Spec{Proto: "tcp", ParentPort: 8080, ChildPort: 80})
	if err == nil || !strings.Contains(err.Error(), "deadline exceeded") || !strings.Contains(err.Error(), socket) {
		t.Fatalf("Add against a mute socket: %v", err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Fatalf("Add took %v; the deadline was 300ms (plus its 1s clean-up)", took)
	}

	// No socket at all: say where we looked and what to start.
	d, _ = New(filepath.Join(t.TempDir(), "absent.sock"), "")
	err = d.Add(context.Background(), 1, libport.Spec{Proto: "tcp", ParentPort: 8080, ChildPort: 80})
	if err == nil || !strings.Contains(err.Error(), "--api-socket") {
		t.Fatalf("Add without slirp4netns: %v", err)
	}
}

func TestNewRefusesBadChildIP(t *testing.T) {
	for _, ip := range []string{"127.0.0.1", "::1", "fd00::100", "0.0.0.0", "nope"} {
		if _, err := New("/x.sock", ip); err == nil {
			t.Errorf("New(childIP %q) succeeded", ip)
		}
	}
	if _, err := New("", ""); err == nil || !strings.Contains(err.Error(), "--api-socket") {
		t.Errorf("New without socket: %v", err)
	}
	d, err := New("/x.sock", "10.0.2.50")
	if err != nil {
		t.Fatal(err)
	}
	f, err := d.forward(libport.Spec{Proto: "udp", ParentPort: 53, ChildPort: 5353})
	if err != nil || f.GuestAddr != "10.0.2.50" || f.HostAddr != "0.0.0.0" || f.Proto != "udp" {
		t.Fatalf("forward = %+v, %v", f, err)
	}
}

// TestConcurrentAddsAndCloseAfterSlirp4netnsDied: adds from many goroutines
// all land with distinct slirp4netns IDs; once slirp4netns is gone (and its
// forwards with it) Close has nothing to complain about.
func TestConcurrentAddsAndCloseAfterSlirp4netnsDied(t *testing.T) {
	u := testenv.Unprivileged(t)
	s := startSlirp4netns(t, u)
	d, err := New(s.socket, "")
	if err != nil {
		t.Fatal(err)
	}
	const n = 20
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		port := drivertest.FreePort(t)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = d.Add(context.Background(), i+1, libport.Spec{Proto: "udp", ParentIP: "127.0.0.1", ParentPort: port, ChildPort: 53})
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	for _, f := range s.list(t) {
		seen[f.ID] = true
	}
	if len(seen) != n {
		t.Fatalf("slirp4netns holds %d forwards, want %d", len(seen), n)
	}
	_ = s.cmd.Process.Kill()
	_, _ = s.cmd.Process.Wait()
	if err := d.Close(); err != nil {
		t.Fatalf("Close after slirp4netns died: %v", err)
	}
}
