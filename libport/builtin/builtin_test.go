package builtin

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/netns"
)

func TestMain(m *testing.M) {
	runRole()
	testenv.Main(m)
}

// setup makes a child netns owned by the test user and a driver (in this
// process, as root, with the setns source) publishing into it.
func setup(t testing.TB, opts Options) (*Driver, *testenv.Netns) {
	t.Helper()
	testenv.RequireRoot(t)
	u := testenv.Unprivileged(t)
	n := testenv.ChildNetns(t, u)
	src, err := netns.NewSetnsSource(n.Path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	d, err := New(src, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, n
}

func setnsSource(t testing.TB, path string) netns.SocketSource {
	t.Helper()
	src, err := netns.NewSetnsSource(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

// failingSysctl is a real socket source whose sysctl writes are refused.
type failingSysctl struct{ netns.SocketSource }

func (failingSysctl) Sysctl(key, value string) error {
	return fmt.Errorf("sysctl %s=%s: %w", key, value, os.ErrPermission)
}

// freePort returns a port nothing listens on in the host netns for network.
func freePort(t testing.TB, network string) int {
	t.Helper()
	var addr net.Addr
	if network[:3] == "udp" {
		c, err := net.ListenPacket(network, ":0")
		if err != nil {
			t.Fatal(err)
		}
		addr = c.LocalAddr()
		c.Close()
	} else {
		l, err := net.Listen(network, ":0")
		if err != nil {
			t.Fatal(err)
		}
		addr = l.Addr()
		l.Close()
	}
	_, p, _ := net.SplitHostPort(addr.String())
	n, _ := strconv.Atoi(p)
	return n
}

var nextID struct {
	sync.Mutex
	n int
}

// publish adds spec (with a free parent port when ParentPort is 0) and
// returns the spec as added and its id.
func publish(t testing.TB, d *Driver, spec libport.Spec) (libport.Spec, int) {
	t.Helper()
	if spec.ParentPort == 0 {
		spec.ParentPort = freePort(t, spec.Proto)
	}
	nextID.Lock()
	nextID.n++
	id := nextID.n
	nextID.Unlock()
	if err := d.Add(context.Background(), id, spec); err != nil {
		t.Fatalf("add %s: %v", spec, err)
	}
	return spec, id
}

// childPort is the port of a listener made in the child.
func childPort(a net.Addr) int {
	switch a := a.(type) {
	case *net.TCPAddr:
		return a.Port
	case *net.UDPAddr:
		return a.Port
	}
	panic(fmt.Sprintf("address %v", a))
}

// serve runs handle for every connection l accepts, until l is closed.
func serve(l net.Listener, handle func(net.Conn)) {
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
}

func echo(c net.Conn) {
	defer c.Close()
	io.Copy(c, c)
}

func hostPort(ip string, port int) string { return net.JoinHostPort(ip, strconv.Itoa(port)) }

func roundTrip(t testing.TB, network, addr, msg string) {
	t.Helper()
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s %s: %v", network, addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write to %s: %v", addr, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read from %s: %v", addr, err)
	}
	if string(got) != msg {
		t.Fatalf("echo through %s: got %q, want %q", addr, got, msg)
	}
}

func TestTCPEcho(t *testing.T) {
	d, n := setup(t, Options{})
	cases := []struct {
		proto, parentIP       string
		serverNet, serverAddr string
		dial                  []string // network, host pairs
	}{
		{"tcp", "", "tcp4", "127.0.0.1:0", []string{"tcp4", "127.0.0.1", "tcp6", "::1"}},
		{"tcp", "0.0.0.0", "tcp4", "127.0.0.1:0", []string{"tcp4", "127.0.0.1", "tcp6", "::1"}},
		{"tcp4", "", "tcp4", "127.0.0.1:0", []string{"tcp4", "127.0.0.1"}},
		{"tcp4", "127.0.0.1", "tcp4", "127.0.0.1:0", []string{"tcp4", "127.0.0.1"}},
		{"tcp6", "", "tcp6", "[::1]:0", []string{"tcp6", "::1"}},
		{"tcp6", "::1", "tcp6", "[::1]:0", []string{"tcp6", "::1"}},
	}
	for _, c := range cases {
		t.Run(c.proto+"/"+c.parentIP, func(t *testing.T) {
			l := testenv.Listen(t, n.Path, c.serverNet, c.serverAddr)
			serve(l, echo)
			spec, _ := publish(t, d, libport.Spec{Proto: c.proto, ParentIP: c.parentIP, ChildPort: childPort(l.Addr())})
			for i := 0; i < len(c.dial); i += 2 {
				roundTrip(t, c.dial[i], hostPort(c.dial[i+1], spec.ParentPort), "hello "+c.dial[i])
			}
		})
	}
}

func TestExplicitChildIPWins(t *testing.T) {
	d, n := setup(t, Options{})
	l := testenv.Listen(t, n.Path, "tcp6", "[::1]:0")
	serve(l, echo)
	spec, _ := publish(t, d, libport.Spec{Proto: "tcp", ChildIP: "::1", ChildPort: childPort(l.Addr())})
	roundTrip(t, "tcp4", hostPort("127.0.0.1", spec.ParentPort), "to ::1 in the child")
}

func TestChildAddrDefaults(t *testing.T) {
	gw := hostGatewayIP()
	cases := []struct {
		spec libport.Spec
		want string
	}{
		{libport.Spec{Proto: "tcp", ChildPort: 80}, "127.0.0.1:80"},
		{libport.Spec{Proto: "tcp", ParentIP: "0.0.0.0", ChildPort: 80}, "127.0.0.1:80"},
		{libport.Spec{Proto: "tcp", ParentIP: "::", ChildPort: 80}, "[::1]:80"},
		{libport.Spec{Proto: "tcp6", ChildPort: 80}, "[::1]:80"},
		{libport.Spec{Proto: "udp6", ParentIP: "::1", ChildPort: 53}, "[::1]:53"},
		{libport.Spec{Proto: "tcp4", ParentIP: "127.0.0.2", ChildPort: 80}, "127.0.0.1:80"},
		{libport.Spec{Proto: "tcp", ParentIP: "10.0.2.100", ChildPort: 80}, "10.0.2.100:80"},
		{libport.Spec{Proto: "tcp6", ParentIP: "fd00::5", ChildPort: 80}, "[fd00::5]:80"},
		{libport.Spec{Proto: "tcp", ParentIP: "10.0.2.100", ChildIP: "10.0.2.3", ChildPort: 80}, "10.0.2.3:80"},
		{libport.Spec{Proto: "tcp", ChildIP: "::1", ChildPort: 80}, "[::1]:80"},
	}
	if gw.IsValid() {
		cases = append(cases, struct {
			spec libport.Spec
			want string
		}{libport.Spec{Proto: "tcp", ParentIP: gw.String(), ChildPort: 80}, "127.0.0.1:80"})
	}
	for _, c := range cases {
		got, err := childAddr(c.spec)
		if err != nil || got.String() != c.want {
			t.Errorf("childAddr(%s) = %v, %v; want %s", c.spec, got, err, c.want)
		}
	}
}

// sumReader is deterministic pseudo-random data whose SHA-256 is known to
// both ends without sending it twice.
func sumReader(seed uint64, size int64) io.Reader {
	return io.LimitReader(rand.NewChaCha8([32]byte{byte(seed)}), size)
}

func TestTCPBulkSHA256(t *testing.T) {
	size := int64(1 << 30)
	if testing.Short() {
		size = 256 << 20
	}
	d, n := setup(t, Options{})
	l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	// The server reads a command: 'U' (upload: it hashes what it reads until
	// EOF and answers the sum) or 'D' (download: it sends size bytes and closes).
	serve(l, func(c net.Conn) {
		defer c.Close()
		var cmd [1]byte
		if _, err := io.ReadFull(c, cmd[:]); err != nil {
			return
		}
		switch cmd[0] {
		case 'U':
			h := sha256.New()
			io.Copy(h, c)
			c.Write(h.Sum(nil))
		case 'D':
			io.Copy(c, sumReader(2, size))
		}
	})
	spec, _ := publish(t, d, libport.Spec{Proto: "tcp4", ChildPort: childPort(l.Addr())})
	addr := hostPort("127.0.0.1", spec.ParentPort)

	want := func(seed uint64) []byte {
		h := sha256.New()
		io.Copy(h, sumReader(seed, size))
		return h.Sum(nil)
	}

	t.Run("upload", func(t *testing.T) {
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		c.Write([]byte{'U'})
		if _, err := io.Copy(c, sumReader(1, size)); err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("upload %d MiB in %v", size>>20, time.Since(start))
		if w := want(1); !bytes.Equal(got, w) {
			t.Fatalf("server's SHA-256 %x, want %x", got, w)
		}
	})
	t.Run("download", func(t *testing.T) {
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		c.Write([]byte{'D'})
		h := sha256.New()
		got, err := io.Copy(h, c)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("download %d MiB in %v", got>>20, time.Since(start))
		if got != size {
			t.Fatalf("downloaded %d bytes, want %d", got, size)
		}
		if w := want(2); !bytes.Equal(h.Sum(nil), w) {
			t.Fatalf("SHA-256 of the download %x, want %x", h.Sum(nil), w)
		}
	})
}

func TestTCPHalfClose(t *testing.T) {
	d, n := setup(t, Options{})
	l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	// The server answers only after the client has finished sending.
	serve(l, func(c net.Conn) {
		defer c.Close()
		b, err := io.ReadAll(c)
		if err != nil {
			return
		}
		fmt.Fprintf(c, "got %d bytes: %s", len(b), b)
	})
	spec, _ := publish(t, d, libport.Spec{Proto: "tcp", ChildPort: childPort(l.Addr())})
	for _, network := range []string{"tcp4", "tcp6"} {
		host := map[string]string{"tcp4": "127.0.0.1", "tcp6": "::1"}[network]
		c, err := net.Dial(network, hostPort(host, spec.ParentPort))
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "request")
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		reply, err := io.ReadAll(c)
		c.Close()
		if err != nil {
			t.Fatalf("%s: reading the reply after half-close: %v", network, err)
		}
		if string(reply) != "got 7 bytes: request" {
			t.Fatalf("%s: reply %q", network, reply)
		}
	}
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func TestTCPResetPropagates(t *testing.T) {
	d, n := setup(t, Options{})
	l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	accepted := make(chan *net.TCPConn, 1)
	serve(l, func(c net.Conn) { accepted <- c.(*net.TCPConn) })
	spec, _ := publish(t, d, libport.Spec{Proto: "tcp4", ChildPort: childPort(l.Addr())})
	addr := hostPort("127.0.0.1", spec.ParentPort)

	t.Run("server resets", func(t *testing.T) {
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		s := <-accepted
		s.SetLinger(0)
		s.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 1))
		if !isReset(err) {
			t.Fatalf("client read after the server's reset: %v, want connection reset", err)
		}
	})
	t.Run("client resets", func(t *testing.T) {
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		s := <-accepted
		defer s.Close()
		io.WriteString(c, "x") // make sure the proxy has both sides up
		s.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		_, err = s.Read(make([]byte, 1))
		if !isReset(err) {
			t.Fatalf("server read after the client's reset: %v, want connection reset", err)
		}
	})
}

func TestTCPRefusedChildPortResetsClient(t *testing.T) {
	d, n := setup(t, Options{})
	l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	port := childPort(l.Addr())
	l.Close() // nothing listens there now
	spec, _ := publish(t, d, libport.Spec{Proto: "tcp4", ChildPort: port})
	start := time.Now()
	c, err := net.Dial("tcp4", hostPort("127.0.0.1", spec.ParentPort))
	if isReset(err) {
		return // the reset beat the client's own handshake: as fast as it gets
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if !isReset(err) {
		t.Fatalf("read from a port whose child refuses: %v, want connection reset", err)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("the reset took %v", el)
	}
}

func TestRemoveClosesListenerAndConnections(t *testing.T) {
	d, n := setup(t, Options{})
	l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	serve(l, echo)
	spec, id := publish(t, d, libport.Spec{Proto: "tcp4", ChildPort: childPort(l.Addr())})
	addr := hostPort("127.0.0.1", spec.ParentPort)
	var conns []net.Conn
	for i := 0; i < 5; i++ {
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "x")
		io.ReadFull(c, make([]byte, 1))
		conns = append(conns, c)
	}
	start := time.Now()
	if err := d.Remove(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > time.Second {
		t.Errorf("remove took %v", el)
	}
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, syscall.EAGAIN) || isTimeout(err) {
			t.Errorf("connection %d still open after remove: %v", i, err)
		}
	}
	if c, err := net.Dial("tcp4", addr); err == nil {
		c.Close()
		t.Fatalf("port %d still accepts after remove", spec.ParentPort)
	}
	if err := d.Remove(context.Background(), id); err == nil || err.Error() != fmt.Sprintf("unknown id: %d", id) {
		t.Fatalf("second remove: %v", err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestAddErrorsLeaveNothing(t *testing.T) {
	d, _ := setup(t, Options{})
	busy, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	port := childPort(busy.Addr())
	err = d.Add(context.Background(), 1, libport.Spec{Proto: "tcp4", ParentIP: "127.0.0.1", ParentPort: port, ChildPort: 80})
	if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("add on a taken port: %v, want address in use", err)
	}
	if err := d.Add(context.Background(), 2, libport.Spec{Proto: "sctp", ParentPort: 1, ChildPort: 1}); err == nil {
		t.Fatal("add of an sctp spec succeeded")
	}
	if len(d.ports) != 0 {
		t.Fatalf("failed adds left %d ports", len(d.ports))
	}
}

func TestPrivilegedPortMessage(t *testing.T) {
	orig := &net.OpError{Op: "listen", Net: "tcp", Err: &netOSErr{syscall.EACCES}}
	err := annotateListenError(orig, "tcp", "0.0.0.0:80", 80)
	msg := err.Error()
	want := "listen tcp 0.0.0.0:80: permission denied: ports below "
	if len(msg) < len(want) || msg[:len(want)] != want || !bytes.Contains([]byte(msg), []byte("`setcap cap_net_bind_service=ep /")) ||
		!bytes.Contains([]byte(msg), []byte("`sysctl net.ipv4.ip_unprivileged_port_start=0`")) {
		t.Fatalf("message %q", msg)
	}
	if !errors.Is(err, syscall.EACCES) {
		t.Fatal("the annotated error does not wrap EACCES")
	}
	if err := annotateListenError(orig, "tcp", "0.0.0.0:8080", 8080); err != orig {
		t.Fatalf("an unprivileged port got annotated: %v", err)
	}
}

type netOSErr struct{ err error }

func (e *netOSErr) Error() string { return "bind: " + e.err.Error() }
func (e *netOSErr) Unwrap() error { return e.err }

func TestParseSourceIP(t *testing.T) {
	cases := map[string]string{"": "tcp", "tcp": "tcp", "udp": "udp", "tcp,udp": "tcp,udp", "none": "none"}
	for in, want := range cases {
		s, err := ParseSourceIP(in)
		if err != nil || s.String() != want {
			t.Errorf("ParseSourceIP(%q) = %v, %v; want %s", in, s, err, want)
		}
	}
	for _, bad := range []string{"sctp", "none,tcp", "tcp,"} {
		if _, err := ParseSourceIP(bad); err == nil {
			t.Errorf("ParseSourceIP(%q) succeeded", bad)
		}
	}
}

// TestClientConnectionsKeepAlive: keep-alive and no-delay are set once on the listener;
// the kernel copies it into every accepted socket.
func TestClientConnectionsKeepAlive(t *testing.T) {
	d, n := setup(t, Options{})
	l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	serve(l, echo)
	spec, id := publish(t, d, libport.Spec{Proto: "tcp", ChildPort: childPort(l.Addr())})
	c, err := net.Dial("tcp4", hostPort("127.0.0.1", spec.ParentPort))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTripConn(t, c)
	p := d.ports[id].(*tcpPort)
	p.mu.Lock()
	var conn *tcpConn
	for k := range p.conns {
		conn = k
	}
	p.mu.Unlock()
	func(fd int) {
		for _, o := range []struct {
			level, opt, want int
			name             string
		}{
			{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1, "SO_KEEPALIVE"},
			{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveIdle, "TCP_KEEPIDLE"},
			{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepAliveInterval, "TCP_KEEPINTVL"},
			{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAliveCount, "TCP_KEEPCNT"},
			{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1, "TCP_NODELAY"},
		} {
			if v, err := unix.GetsockoptInt(fd, o.level, o.opt); err != nil || v != o.want {
				t.Errorf("accepted socket: %s = %d, %v; want %d", o.name, v, err, o.want)
			}
		}
	}(conn.pfd)
}

// TestRemoveDuringHangingConnect: a child listener whose accept queue is
// full drops SYNs, so our connect in the child hangs; removing the port must
// still end it at once.
func TestRemoveDuringHangingConnect(t *testing.T) {
	d, n := setup(t, Options{})
	var lfd int
	err := testenv.Do(n.Path, func() error {
		var err error
		if lfd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		if err := unix.Bind(lfd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			return err
		}
		return unix.Listen(lfd, 0) // never accepted: the queue fills at once
	})
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(lfd)
	sa, _ := unix.Getsockname(lfd)
	spec, id := publish(t, d, libport.Spec{Proto: "tcp4", ChildPort: sa.(*unix.SockaddrInet4).Port})
	var clients []net.Conn
	for i := 0; i < 4; i++ {
		c, err := net.Dial("tcp4", hostPort("127.0.0.1", spec.ParentPort))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, c)
	}
	time.Sleep(300 * time.Millisecond) // the later connects are now retrying SYNs
	p := d.ports[id].(*tcpPort)
	p.mu.Lock()
	inFlight := len(p.conns)
	p.mu.Unlock()
	if inFlight != len(clients) {
		t.Fatalf("%d connections tracked, want %d", inFlight, len(clients))
	}
	start := time.Now()
	if err := d.Remove(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("remove took %v with connects hanging in the child", el)
	}
	for i, c := range clients {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
			t.Errorf("client %d still open after remove: %v", i, err)
		}
	}
}
