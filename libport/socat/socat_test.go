package socat

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/drivertest"
	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
)

func TestMain(m *testing.M) {
	drivertest.Serve(map[string]drivertest.Factory{
		"socat": func(args []string) (libport.Driver, error) { return New(args[0]) },
	})
	testenv.Main(m)
}

// listener is a listening socat the driver started.
type listener struct {
	pid     int
	cmdline string
}

// listeners finds the socat processes parent started, by their command lines.
func listeners(t *testing.T, parent int) []listener {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []listener
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		i := strings.LastIndexByte(string(st), ')')
		f := strings.Fields(string(st[i+1:]))
		if ppid, _ := strconv.Atoi(f[1]); ppid != parent || !strings.Contains(string(st), "(socat)") || f[0] == "Z" {
			continue
		}
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		out = append(out, listener{pid: pid, cmdline: strings.ReplaceAll(string(cmd), "\x00", " ")})
	}
	return out
}

// listenerFor returns the socat listening on port.
func listenerFor(t *testing.T, parent, port int) listener {
	t.Helper()
	for _, l := range listeners(t, parent) {
		if strings.Contains(l.cmdline, fmt.Sprintf("-LISTEN:%d,", port)) {
			return l
		}
	}
	t.Fatalf("no socat listening on %d among %v", port, listeners(t, parent))
	return listener{}
}

// session lists every process (zombies too) in session sid.
func session(sid int) []string {
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		if state, s, ok := statFields(st); ok && s == sid {
			out = append(out, fmt.Sprintf("%d(%c)", pid, state))
		}
	}
	return out
}

// TestPublishWithSocatAsUnprivilegedUser runs the driver, socat and nsenter
// as the test user against a child netns that user owns.
func TestPublishWithSocatAsUnprivilegedUser(t *testing.T) {
	testenv.RequireBinary(t, "socat")
	u := testenv.Unprivileged(t)
	ns := testenv.ChildNetns(t, u)
	drivertest.ServeTCP(t, testenv.Listen(t, ns.Path, "tcp4", "127.0.0.1:8080"))
	drivertest.ServeTCP(t, testenv.Listen(t, ns.Path, "tcp6", "[::1]:8080"))
	udpSeen := drivertest.ServeUDP(t, testenv.ListenPacket(t, ns.Path, "udp4", "127.0.0.1:5353"))

	drv := drivertest.Start(t, u, "socat", ns.Path)
	table := libport.NewTable(drv)
	ctx := context.Background()
	if info := drv.Info(); info.Driver != "socat" || len(info.Protos) != 6 || info.DisallowLoopbackChildIP {
		t.Fatalf("Info() = %+v", info)
	}

	tcp4, udp4, dual, tcp6 := drivertest.FreePort(t), drivertest.FreePort(t), drivertest.FreePort(t), drivertest.FreePort(t)
	var ids []int
	for _, spec := range []libport.Spec{
		{Proto: "tcp4", ParentIP: "127.0.0.1", ParentPort: tcp4, ChildPort: 8080},
		{Proto: "udp4", ParentIP: "127.0.0.1", ParentPort: udp4, ChildPort: 5353},
		{Proto: "tcp", ParentPort: dual, ChildPort: 8080},
		{Proto: "tcp6", ParentIP: "::1", ParentPort: tcp6, ChildPort: 8080},
	} {
		st, err := table.Add(ctx, spec)
		if err != nil {
			t.Fatalf("add %s: %v", spec, err)
		}
		ids = append(ids, st.ID)
	}
	if got := listeners(t, drv.PID()); len(got) != 4 {
		t.Fatalf("want 4 listening socats, have %v", got)
	}

	peer := testenv.NewPeer(t)
	for _, tc := range []struct {
		name, network, addr, want string
		dial                      func(string, string) (net.Conn, error)
	}{
		{"tcp4 from 127.0.0.1", "tcp4", fmt.Sprintf("127.0.0.1:%d", tcp4), "127.0.0.1", net.Dial},
		{"dual-stack tcp from 127.0.0.1", "tcp4", fmt.Sprintf("127.0.0.1:%d", dual), "127.0.0.1", net.Dial},
		{"dual-stack tcp from ::1", "tcp6", fmt.Sprintf("[::1]:%d", dual), "127.0.0.1", net.Dial},
		{"dual-stack tcp from a peer", "tcp4", fmt.Sprintf("%s:%d", peer.LocalIP4, dual), "127.0.0.1", peer.Dial},
		{"tcp6 from ::1", "tcp6", fmt.Sprintf("[::1]:%d", tcp6), "::1", net.Dial},
	} {
		seen, err := drivertest.TCPRoundTrip(tc.dial, tc.network, tc.addr)
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
		} else if seen != tc.want {
			t.Errorf("%s: seen as %s, want %s (socat connects from the child's loopback)", tc.name, seen, tc.want)
		}
	}
	uc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	udpAddr := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: udp4}
	for i := 0; i < 3; i++ { // several datagrams of one flow keep their boundaries
		if seen, err := drivertest.UDPRoundTrip(uc, udpAddr); err != nil || seen != "127.0.0.1" {
			t.Fatalf("udp datagram %d: seen %q, %v", i, seen, err)
		}
	}

	// A listener that dies is restarted, and its port works again.
	l := listenerFor(t, drv.PID(), udp4)
	killedUDP := l.pid
	if err := syscall.Kill(l.pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var again []listener
		for _, x := range listeners(t, drv.PID()) {
			if strings.Contains(x.cmdline, fmt.Sprintf("-LISTEN:%d,", udp4)) && x.pid != l.pid {
				again = append(again, x)
			}
		}
		if len(again) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("socat for udp port %d not restarted within 5s", udp4)
		}
		time.Sleep(20 * time.Millisecond)
	}
	uc2, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer uc2.Close()
	if seen, err := drivertest.UDPRoundTrip(uc2, udpAddr); err != nil || seen != "127.0.0.1" {
		t.Fatalf("udp after restart: seen %q, %v", seen, err)
	}
	for len(udpSeen) > 0 {
		<-udpSeen
	}

	// Remove kills the listener and the connections it serves.
	l = listenerFor(t, drv.PID(), tcp4)
	open, err := net.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", tcp4))
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	if _, err := fmt.Fprintf(open, "hold\n"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	_ = open.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := open.Read(buf); err != nil {
		t.Fatal(err)
	}
	if got := session(l.pid); len(got) < 2 {
		t.Fatalf("want the listener and a connection process in session %d, have %v", l.pid, got)
	}
	if err := table.Remove(ctx, ids[0]); err != nil {
		t.Fatalf("remove: %v", err)
	}
	if got := session(l.pid); len(got) != 0 {
		t.Fatalf("after remove, session %d still has %v", l.pid, got)
	}
	if _, err := net.Dial("tcp4", fmt.Sprintf("127.0.0.1:%d", tcp4)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial removed port: %v, want connection refused", err)
	}
	_ = open.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := open.Read(buf); err == nil {
		t.Errorf("connection through the removed port still open")
	}

	// Close leaves no socat, not even a zombie, including the connection
	// processes of the restarted UDP listener's predecessor.
	var sids []int
	for _, x := range listeners(t, drv.PID()) {
		sids = append(sids, x.pid)
	}
	sids = append(sids, l.pid)
	if err := table.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if got := listeners(t, drv.PID()); len(got) != 0 {
		t.Fatalf("after Close: %v", got)
	}
	for _, sid := range sids {
		if got := session(sid); len(got) != 0 {
			t.Errorf("after Close, session %d still has %v", sid, got)
		}
	}
	// The UDP flow process of the listener killed above was orphaned when
	// its listener died; Close killed it, but only init can reap it (and
	// PID 1 on these machines never does): no live process may remain.
	for _, p := range session(killedUDP) {
		if !strings.HasSuffix(p, "(Z)") {
			t.Errorf("after Close, the killed listener's session %d still has %v", killedUDP, session(killedUDP))
		}
	}
	t.Logf("killed listener's session after Close: %v", session(killedUDP))
}

// TestSocatErrorsAreClear: a taken port, and missing socat or nsenter.
func TestSocatErrorsAreClear(t *testing.T) {
	testenv.RequireBinary(t, "socat")
	u := testenv.Unprivileged(t)
	ns := testenv.ChildNetns(t, u)
	drv := drivertest.Start(t, u, "socat", ns.Path)
	held, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	port := held.Addr().(*net.TCPAddr).Port
	err = drv.Add(context.Background(), 1, libport.Spec{Proto: "tcp4", ParentIP: "127.0.0.1", ParentPort: port, ChildPort: 80})
	if err == nil || !strings.Contains(err.Error(), "Address already in use") {
		t.Fatalf("add on a taken port: %v", err)
	}
	t.Logf("taken port: %v", err)
	if got := listeners(t, drv.PID()); len(got) != 0 {
		t.Fatalf("failed add left %v", got)
	}

	socatPath := testenv.RequireBinary(t, "socat")
	onlySocat := t.TempDir()
	if err := os.Symlink(socatPath, filepath.Join(onlySocat, "socat")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, want string }{
		{t.TempDir(), "socat is not installed"},
		{onlySocat, "nsenter is not installed"},
	} {
		t.Setenv("PATH", tc.path)
		if _, err := New(ns.Path); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New with PATH=%s: %v, want %q", tc.path, err, tc.want)
		}
	}
}

func TestSocatRefusesBadNetnsPath(t *testing.T) {
	testenv.RequireBinary(t, "socat")
	testenv.RequireBinary(t, "nsenter")
	for _, path := range []string{"", "/run/netns/a b", `/run/netns/"x"`, "/run/netns/x,y"} {
		if _, err := New(path); err == nil || !strings.Contains(err.Error(), "EXEC") {
			t.Errorf("New(%q): %v", path, err)
		}
	}
	if _, err := New("/etc/hostname"); err == nil || !strings.Contains(err.Error(), "NS_GET_USERNS") {
		t.Errorf("New(not a netns): %v", err)
	}
}

func TestSocatCommandLines(t *testing.T) {
	d := &Driver{netnsPath: "/proc/42/ns/net", socat: "/usr/bin/socat", nsenter: "/usr/bin/nsenter"}
	for _, tc := range []struct {
		spec libport.Spec
		want string
	}{
		{libport.Spec{Proto: "tcp", ParentPort: 80, ChildPort: 8080},
			`-d -d TCP6-LISTEN:80,bind=[::],ipv6only=0,reuseaddr,fork EXEC:"/usr/bin/nsenter --preserve-credentials --net=/proc/42/ns/net /usr/bin/socat STDIO TCP4:127.0.0.1:8080",nofork`},
		{libport.Spec{Proto: "udp4", ParentIP: "127.0.0.1", ParentPort: 53, ChildIP: "10.0.2.100", ChildPort: 5353},
			`-d -d UDP4-LISTEN:53,bind=127.0.0.1,reuseaddr,fork EXEC:"/usr/bin/nsenter --preserve-credentials --net=/proc/42/ns/net /usr/bin/socat -T 60 STDIO UDP4:10.0.2.100:5353",nofork`},
		{libport.Spec{Proto: "tcp6", ParentPort: 80, ChildPort: 80},
			`-d -d TCP6-LISTEN:80,bind=[::],ipv6only=1,reuseaddr,fork EXEC:"/usr/bin/nsenter --preserve-credentials --net=/proc/42/ns/net /usr/bin/socat STDIO TCP6:[::1]:80",nofork`},
		{libport.Spec{Proto: "tcp", ParentIP: "::1", ParentPort: 80, ChildPort: 80},
			`-d -d TCP6-LISTEN:80,bind=[::1],ipv6only=1,reuseaddr,fork EXEC:"/usr/bin/nsenter --preserve-credentials --net=/proc/42/ns/net /usr/bin/socat STDIO TCP6:[::1]:80",nofork`},
	} {
		args, err := d.socatArgs(tc.spec)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(args, " "); got != tc.want {
			t.Errorf("%s:\n got %s\nwant %s", tc.spec, got, tc.want)
		}
	}
}
