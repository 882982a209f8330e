package builtin

// The rootless path: the test binary re-executed as the unprivileged user is
// the forwarder (helper socket source, listeners in the host netns), as
// `portkit daemon` runs it. The same binary also serves as a small
// request/reply server and client for the measurements in measure_test.go.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/netns"
)

// roleEnv makes the test binary play a part instead of running tests.
const roleEnv = "PORTKIT_BUILTIN_TEST_ROLE"

// runRole runs the part named by roleEnv, if any, and exits.
func runRole() {
	role := os.Getenv(roleEnv)
	if role == "" {
		return
	}
	os.Unsetenv(roleEnv)
	var err error
	switch role {
	case "forwarder":
		err = roleForwarder(os.Args[1:])
	case "rr-server":
		err = roleRRServer(os.Args[1:])
	case "rr-client":
		err = roleRRClient(os.Args[1:])
	default:
		err = fmt.Errorf("unknown role %q", role)
	}
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// roleForwarder: NETNS SOURCE SOURCEIP SPEC... — publishes the specs, prints
// "ready", and runs until stdin closes.
func roleForwarder(args []string) error {
	if len(args) < 3 {
		return fmt.Errorf("usage: NETNS helper|open SOURCEIP SPEC...")
	}
	if n, _ := strconv.Atoi(os.Getenv("PORTKIT_FORWARDER_GOMAXPROCS")); n > 0 {
		runtime.GOMAXPROCS(n)
	}
	var src netns.SocketSource
	var err error
	switch args[1] {
	case "helper":
		src, err = netns.NewHelperSource(args[0])
	default:
		src, err = netns.Open(args[0])
	}
	if err != nil {
		return err
	}
	defer src.Close()
	sip, err := ParseSourceIP(args[2])
	if err != nil {
		return err
	}
	d, err := New(src, Options{SourceIP: sip, Logf: func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }})
	if err != nil {
		return err
	}
	defer d.Close()
	for i, text := range args[3:] {
		specs, err := libport.ParseSpec(text)
		if err != nil {
			return err
		}
		if err := d.Add(context.Background(), i+1, specs[0]); err != nil {
			return err
		}
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	return nil
}

// roleRRServer: NETWORK ADDR — answers each connection's request with a
// reply of the same size and closes; prints the port it listens on.
func roleRRServer(args []string) error {
	if strings.HasPrefix(args[0], "udp") {
		return roleUDPEchoServer(args)
	}
	l, err := net.Listen(args[0], args[1])
	if err != nil {
		return err
	}
	fmt.Println(l.Addr().(*net.TCPAddr).Port)
	go func() { io.Copy(io.Discard, os.Stdin); os.Exit(0) }()
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			buf := make([]byte, 64)
			n, err := c.Read(buf)
			if err == nil {
				c.Write(buf[:n])
			}
		}()
	}
}

// roleUDPEchoServer: udp NETWORK ADDR — echoes every datagram; prints the
// port it listens on.
func roleUDPEchoServer(args []string) error {
	c, err := net.ListenPacket(args[0], args[1])
	if err != nil {
		return err
	}
	fmt.Println(c.LocalAddr().(*net.UDPAddr).Port)
	go func() { io.Copy(io.Discard, os.Stdin); os.Exit(0) }()
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return err
		}
		c.WriteTo(buf[:n], from)
	}
}

// roleUDPRRClient: udp:ADDR DURATION — one 64-byte datagram, wait for its
// echo, again for DURATION; Errors counts requests without a reply in 200 ms.
func roleUDPRRClient(args []string) error {
	dur, err := time.ParseDuration(args[1])
	if err != nil {
		return err
	}
	c, err := net.Dial("udp", strings.TrimPrefix(args[0], "udp:"))
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 64)
	var lat []time.Duration
	errs := 0
	start := time.Now()
	deadline := start.Add(dur)
	for time.Now().Before(deadline) {
		t0 := time.Now()
		_ = c.SetDeadline(t0.Add(200 * time.Millisecond))
		if _, err := c.Write(buf); err != nil {
			return err
		}
		if _, err := c.Read(buf); err != nil {
			errs++
			time.Sleep(time.Millisecond)
			continue
		}
		lat = append(lat, time.Since(t0))
	}
	el := time.Since(start)
	slices.Sort(lat)
	r := rrResult{Conns: len(lat), Seconds: el.Seconds(), Errors: errs}
	if len(lat) > 0 {
		r.P50us = float64(lat[len(lat)/2].Microseconds())
		r.P99us = float64(lat[len(lat)*99/100].Microseconds())
	}
	return json.NewEncoder(os.Stdout).Encode(r)
}

// rrResult is what roleRRClient reports.
type rrResult struct {
	Conns   int
	Seconds float64
	P50us   float64
	P99us   float64
	Errors  int
}

// roleRRClient: ADDR DURATION CLIENTS — short connections (connect, 64-byte
// request, 64-byte reply, close) for DURATION from CLIENTS goroutines.
func roleRRClient(args []string) error {
	if strings.HasPrefix(args[0], "udp:") {
		return roleUDPRRClient(args)
	}
	dur, err := time.ParseDuration(args[1])
	if err != nil {
		return err
	}
	var clients int
	fmt.Sscan(args[2], &clients)
	var mu sync.Mutex
	var lat []time.Duration
	errs := 0
	deadline := time.Now().Add(dur)
	start := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := make([]byte, 64)
			buf := make([]byte, 128)
			var mine []time.Duration
			bad := 0
			for time.Now().Before(deadline) {
				t0 := time.Now()
				c, err := net.Dial("tcp", args[0])
				if err != nil {
					bad++
					continue
				}
				c.Write(req)
				got := 0
				for {
					n, err := c.Read(buf)
					got += n
					if err != nil {
						break
					}
				}
				c.Close()
				if got != len(req) {
					bad++
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, mine...)
			errs += bad
			mu.Unlock()
		}()
	}
	wg.Wait()
	el := time.Since(start)
	slices.Sort(lat)
	r := rrResult{Conns: len(lat), Seconds: el.Seconds(), Errors: errs}
	if len(lat) > 0 {
		r.P50us = float64(lat[len(lat)/2].Microseconds())
		r.P99us = float64(lat[len(lat)*99/100].Microseconds())
	}
	return json.NewEncoder(os.Stdout).Encode(r)
}

// userBinary copies the test binary where u can run it (go test builds it in
// a directory only root may enter).
func userBinary(t testing.TB, u *testenv.User) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := u.Dir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "builtin.test")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// forwarder runs bin as u in the forwarder role and waits for "ready"; it
// returns the first line the forwarder printed and whether it is ready.
func forwarder(t testing.TB, u *testenv.User, bin string, args ...string) (string, bool) {
	line, ok, _ := forwarderPID(t, u, bin, args...)
	return line, ok
}

// forwarderPID is forwarder, also returning the forwarder's process ID.
func forwarderPID(t testing.TB, u *testenv.User, bin string, args ...string) (string, bool, int) {
	t.Helper()
	cmd := u.Cmd(bin, args...)
	cmd.Env = append(cmd.Env, roleEnv+"=forwarder")
	cmd.Stderr = &testLogWriter{t: t}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		stdin.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Errorf("forwarder did not stop within 10s of its stdin closing")
		}
	})
	line = strings.TrimSpace(line)
	return line, line == "ready", cmd.Process.Pid
}

type testLogWriter struct {
	t  testing.TB
	mu sync.Mutex
}

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.t.Logf("forwarder: %s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func TestRootlessForwarderEndToEnd(t *testing.T) {
	testenv.RequireRoot(t) // to make peers and servers in the user's netns
	testenv.RequireBinary(t, "nsenter")
	u := testenv.Unprivileged(t)
	n := testenv.ChildNetns(t, u)
	peer := testenv.NewPeer(t)
	bin := userBinary(t, u)

	l4 := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	serve(l4, whoami)
	l6 := testenv.Listen(t, n.Path, "tcp6", "[::1]:0")
	serve(l6, echo)
	su := testenv.ListenPacket(t, n.Path, "udp4", "0.0.0.0:0")
	serveUDP(su)
	tcp4 := freePort(t, "tcp4")
	tcp6 := freePort(t, "tcp6")
	udp4 := freePort(t, "udp4")
	line, ok := forwarder(t, u, bin, n.Path, "helper", "tcp,udp",
		fmt.Sprintf("%d:%d/tcp4", tcp4, childPort(l4.Addr())),
		fmt.Sprintf("%d:%d/tcp6", tcp6, childPort(l6.Addr())),
		fmt.Sprintf("%d:%d/udp4", udp4, childPort(su.LocalAddr())))
	if !ok {
		t.Fatalf("forwarder as %s: %s", u.Name, line)
	}

	t.Run("tcp6 echo", func(t *testing.T) {
		roundTrip(t, "tcp6", hostPort("::1", tcp6), "through the rootless forwarder")
	})
	t.Run("tcp4 source IP kept", func(t *testing.T) {
		got := askWho(t, peer.Dial, "tcp4", hostPort(peer.LocalIP4.String(), tcp4))
		if !net.IP(got.Addr().AsSlice()).Equal(peer.PeerIP4) {
			t.Fatalf("service saw %s, want the peer's %s", got, peer.PeerIP4)
		}
		got = askWho(t, net.Dial, "tcp4", hostPort("127.0.0.1", tcp4))
		if got.Addr() != netip.MustParseAddr("127.0.0.1") {
			t.Fatalf("loopback client seen as %s", got)
		}
	})
	t.Run("udp4 source IP kept", func(t *testing.T) {
		pc, err := peer.ListenPacket("udp4", hostPort(peer.PeerIP4.String(), 0))
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		got, err := udpAsk(pc, &net.UDPAddr{IP: peer.LocalIP4, Port: udp4}, "who")
		if err != nil {
			t.Fatal(err)
		}
		if want := "reply to " + pc.LocalAddr().String() + ": who"; got != want {
			t.Fatalf("got %q, want %q", got, want)
		}
	})
}

func TestRootlessPrivilegedPortNamesBothFixes(t *testing.T) {
	testenv.RequireRoot(t)
	u := testenv.Unprivileged(t)
	if b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start"); strings.TrimSpace(string(b)) == "0" {
		t.Skip("net.ipv4.ip_unprivileged_port_start is 0 here: every port is unprivileged")
	}
	n := testenv.ChildNetns(t, u)
	bin := userBinary(t, u)
	line, ok := forwarder(t, u, bin, n.Path, "helper", "tcp", "0.0.0.0:80:8080/tcp")
	if ok {
		t.Fatalf("an unprivileged forwarder published port 80")
	}
	for _, want := range []string{
		"listen tcp 0.0.0.0:80: permission denied: ports below 1024 need",
		"`sysctl net.ipv4.ip_unprivileged_port_start=0`",
		"`setcap cap_net_bind_service=ep " + bin + "`",
	} {
		if !strings.Contains(line, want) {
			t.Errorf("error %q does not say %q", line, want)
		}
	}
}

// TestRootlessPrivilegedPortWithSetcap: the forwarder binary with
// cap_net_bind_service publishes port 80 as the unprivileged user, because
// the listener never enters the child user namespace.
func TestRootlessPrivilegedPortWithSetcap(t *testing.T) {
	testenv.RequireRoot(t)
	setcap := testenv.RequireBinary(t, "setcap")
	u := testenv.Unprivileged(t)
	n := testenv.ChildNetns(t, u)
	if c, err := net.Listen("tcp4", "127.0.0.1:80"); err != nil {
		t.Skipf("port 80 is busy on this host: %v", err)
	} else {
		c.Close()
	}
	bin := userBinary(t, u)
	if out, err := exec.Command(setcap, "cap_net_bind_service=ep", bin).CombinedOutput(); err != nil {
		t.Skipf("setcap on %s: %v: %s (file capabilities unsupported here)", bin, err, out)
	}
	l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	serve(l, echo)
	line, ok := forwarder(t, u, bin, n.Path, "helper", "tcp", fmt.Sprintf("127.0.0.1:80:%d/tcp4", childPort(l.Addr())))
	if !ok {
		t.Fatalf("forwarder with cap_net_bind_service: %s", line)
	}
	roundTrip(t, "tcp4", "127.0.0.1:80", "privileged port")
}
