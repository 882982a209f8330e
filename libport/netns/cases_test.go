package netns

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testSocketsInChild checks every kind a forwarder asks for: made in the
// child netns (SIOCGSKNS names the socket's netns), of the kind asked for,
// close-on-exec and non-blocking.
func testSocketsInChild(t *testing.T, src SocketSource, fx *fixture) {
	child := nsInode(t, fx.path)
	if host := nsInode(t, "/proc/self/ns/net"); host == child {
		t.Fatal("the child netns is the host's")
	}
	for _, k := range []struct {
		domain, typ, proto int
		wantProto          int
	}{
		{unix.AF_INET, unix.SOCK_STREAM, 0, unix.IPPROTO_TCP},
		{unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_TCP, unix.IPPROTO_TCP},
		{unix.AF_INET, unix.SOCK_STREAM | unix.SOCK_CLOEXEC, 0, unix.IPPROTO_TCP},
		{unix.AF_INET6, unix.SOCK_STREAM, 0, unix.IPPROTO_TCP},
		{unix.AF_INET, unix.SOCK_DGRAM, 0, unix.IPPROTO_UDP},
		{unix.AF_INET6, unix.SOCK_DGRAM, unix.IPPROTO_UDP, unix.IPPROTO_UDP},
		{unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_ROUTE, unix.NETLINK_ROUTE},
	} {
		name := fmt.Sprintf("socket(%d,%#x,%d)", k.domain, k.typ, k.proto)
		fd, err := src.Socket(k.domain, k.typ, k.proto)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for opt, want := range map[int]int{
			unix.SO_DOMAIN:   k.domain,
			unix.SO_TYPE:     k.typ &^ unix.SOCK_CLOEXEC,
			unix.SO_PROTOCOL: k.wantProto,
		} {
			if got, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, opt); err != nil || got != want {
				t.Errorf("%s: socket option %d is %d (%v), want %d", name, opt, got, err, want)
			}
		}
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
			t.Errorf("%s: not close-on-exec (%#x, %v)", name, fl, err)
		}
		if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err != nil || fl&unix.O_NONBLOCK == 0 {
			t.Errorf("%s: not non-blocking (%#x, %v)", name, fl, err)
		}
		if got := socketNetns(t, fd); got != child {
			t.Errorf("%s: socket is in netns inode %d, want the child's %d", name, got, child)
		}
		unix.Close(fd)
	}
}

// testConnect dials, with a socket from the source, a server that only
// exists inside the child.
func testConnect(t *testing.T, src SocketSource, network, addr string) {
	if c, err := net.DialTimeout(network, addr, time.Second); err == nil {
		c.Close()
		t.Logf("note: %s %s also answers on the host; the echo below proves the child's", network, addr)
	}
	domain := unix.AF_INET
	if network == "tcp6" {
		domain = unix.AF_INET6
	}
	fd, err := src.Socket(domain, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	c := connectFd(t, fd, addr)
	defer c.Close()
	msg := "hello child " + network
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := ioReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo through %s %s: %q, %v", network, addr, buf, err)
	}
}

// testListenInChild binds and listens on a socket from the source: a
// connection from the host does not reach it, one from the child does.
func testListenInChild(t *testing.T, src SocketSource, fx *fixture) {
	fd, err := src.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "child listener")
	fl, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	l := fl.(*net.TCPListener)
	defer l.Close()
	addr := l.Addr().String()

	if c, err := net.DialTimeout("tcp4", addr, time.Second); err == nil {
		// Something on the host has the same port; it must not be ours.
		c.Close()
		_ = l.SetDeadline(time.Now().Add(200 * time.Millisecond))
		if a, err := l.Accept(); err == nil {
			a.Close()
			t.Fatalf("a host connection to %s reached the listener in the child", addr)
		}
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial %s from the host: %v, want connection refused", addr, err)
	}

	_ = l.SetDeadline(time.Now().Add(5 * time.Second))
	accepted := make(chan error, 1)
	go func() {
		a, err := l.Accept()
		if err == nil {
			a.Close()
		}
		accepted <- err
	}()
	cfd, err := src.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	connectFd(t, cfd, addr).Close()
	if err := <-accepted; err != nil {
		t.Fatalf("accept in the child: %v", err)
	}
}

// testNetlinkLinks dumps the links with RTM_GETLINK on a NETLINK_ROUTE
// socket from the source: the child has only lo.
func testNetlinkLinks(t *testing.T, src SocketSource, fx *fixture) {
	fd, err := src.Socket(unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		t.Fatal(err)
	}
	req := make([]byte, unix.NLMSG_HDRLEN+unix.SizeofIfInfomsg)
	binary.NativeEndian.PutUint32(req[0:], uint32(len(req)))                   // nlmsg_len
	binary.NativeEndian.PutUint16(req[4:], unix.RTM_GETLINK)                   // nlmsg_type
	binary.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP) // nlmsg_flags
	binary.NativeEndian.PutUint32(req[8:], 1)                                  // nlmsg_seq
	req[unix.NLMSG_HDRLEN] = unix.AF_UNSPEC
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		t.Fatal(err)
	}
	var names []string
	buf := make([]byte, 1<<16)
	for done := false; !done; {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if n, err := unix.Poll(pfd, 5000); err != nil || n == 0 {
			t.Fatalf("no netlink reply: %v", err)
		}
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			t.Fatal(err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			t.Fatal(err)
		}
		for i := range msgs {
			switch msgs[i].Header.Type {
			case unix.NLMSG_DONE:
				done = true
			case unix.NLMSG_ERROR:
				t.Fatalf("RTM_GETLINK: netlink error %v", msgs[i].Data)
			case unix.RTM_NEWLINK:
				attrs, err := syscall.ParseNetlinkRouteAttr(&msgs[i])
				if err != nil {
					t.Fatal(err)
				}
				for _, a := range attrs {
					if a.Attr.Type == unix.IFLA_IFNAME {
						names = append(names, strings.TrimRight(string(a.Value), "\x00"))
					}
				}
			}
		}
	}
	if strings.Join(names, ",") != "lo" {
		t.Fatalf("links in the child: %v, want only lo", names)
	}
}

// testSysctl sets tcp_fwmark_accept, which source IP needs, in the child.
// The host's value must not move; the root side checks the child's.
func testSysctl(t *testing.T, src SocketSource, fx *fixture) {
	before := readSysctl(t, "net/ipv4/tcp_fwmark_accept")
	if err := src.Sysctl("net/ipv4/tcp_fwmark_accept", "1"); err != nil {
		t.Fatal(err)
	}
	if after := readSysctl(t, "net/ipv4/tcp_fwmark_accept"); after != before {
		t.Fatalf("the host's tcp_fwmark_accept went from %s to %s", before, after)
	}
}

func testSysctlBadKeys(t *testing.T, src SocketSource, fx *fixture) {
	for _, key := range []string{"", "/net/ipv4/tcp_fwmark_accept", "net/../../etc/passwd", "net/ipv4/", "net//ipv4/ip_forward", "net/ipv4/x\x00y", "net.ipv4.tcp_fwmark_accept"} {
		err := src.Sysctl(key, "1")
		if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("%q", key)) && !strings.Contains(err.Error(), key) {
			t.Errorf("Sysctl(%q): %v, want an error naming the key", key, err)
		}
	}
	if err := src.Sysctl("net/ipv4/no_such_sysctl", "1"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Sysctl of a missing key: %v, want not-exist", err)
	}
	if err := src.Sysctl("net/ipv4/tcp_fwmark_accept", "1"); err != nil {
		t.Errorf("the source broke after bad keys: %v", err)
	}
}

// testTransparent checks the fact source IP rests on: the owner of the child
// user namespace may set IP_TRANSPARENT and SO_MARK on a child socket, while
// an unprivileged process may not on its own.
func testTransparent(t *testing.T, src SocketSource, fx *fixture) {
	for _, c := range []struct {
		domain, level, opt int
	}{
		{unix.AF_INET, unix.SOL_IP, unix.IP_TRANSPARENT},
		{unix.AF_INET6, unix.SOL_IPV6, unix.IPV6_TRANSPARENT},
	} {
		fd, err := src.Socket(c.domain, unix.SOCK_STREAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.SetsockoptInt(fd, c.level, c.opt, 1); err != nil {
			t.Errorf("transparent on a child socket (domain %d): %v", c.domain, err)
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, 0x70); err != nil {
			t.Errorf("SO_MARK on a child socket (domain %d): %v", c.domain, err)
		}
		if got, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK); err != nil || got != 0x70 {
			t.Errorf("SO_MARK reads back %#x, %v", got, err)
		}
		unix.Close(fd)
	}
	if os.Geteuid() == 0 {
		t.Log("root may set both on host sockets too; the refusal is checked as the user")
		return
	}
	hfd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(hfd)
	if err := unix.SetsockoptInt(hfd, unix.SOL_IP, unix.IP_TRANSPARENT, 1); !errors.Is(err, unix.EPERM) {
		t.Errorf("IP_TRANSPARENT on a host socket as the user: %v, want EPERM", err)
	}
	if err := unix.SetsockoptInt(hfd, unix.SOL_SOCKET, unix.SO_MARK, 0x70); !errors.Is(err, unix.EPERM) {
		t.Errorf("SO_MARK on a host socket as the user: %v, want EPERM", err)
	}
}

// testConcurrent takes sockets from many goroutines at once, more than a
// batch per kind, so refills race with takers.
func testConcurrent(t *testing.T, src SocketSource, fx *fixture) {
	child := nsInode(t, fx.path)
	const workers, each = 4, 250
	var mu sync.Mutex
	seen := map[int]bool{}
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			domain := []int{unix.AF_INET, unix.AF_INET6}[w%2]
			typ := []int{unix.SOCK_STREAM, unix.SOCK_DGRAM}[w/2%2]
			for range each {
				fd, err := src.Socket(domain, typ, 0)
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				dup := seen[fd]
				seen[fd] = true
				mu.Unlock()
				if dup {
					errs <- fmt.Errorf("fd %d handed out twice", fd)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for fd := range seen {
		if got := socketNetns(t, fd); got != child {
			t.Errorf("fd %d is in netns %d, want the child's %d", fd, got, child)
		}
		unix.Close(fd)
	}
	if len(seen) != workers*each && !t.Failed() {
		t.Fatalf("got %d sockets, want %d", len(seen), workers*each)
	}
}

func testBadSocket(t *testing.T, src SocketSource, fx *fixture) {
	if fd, err := src.Socket(12345, unix.SOCK_STREAM, 0); !errors.Is(err, unix.EAFNOSUPPORT) {
		unix.Close(fd)
		t.Errorf("socket of domain 12345: %v, want EAFNOSUPPORT", err)
	}
	if fd, err := src.Socket(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_UDP); !errors.Is(err, unix.EPROTONOSUPPORT) {
		unix.Close(fd)
		t.Errorf("TCP socket with IPPROTO_UDP: %v, want EPROTONOSUPPORT", err)
	}
	fd, err := src.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatalf("the source broke after bad arguments: %v", err)
	}
	unix.Close(fd)
}

// testClosed closes src and checks that it then refuses politely.
func testClosed(t *testing.T, src SocketSource) {
	t.Helper()
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	if err := src.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if fd, err := src.Socket(unix.AF_INET, unix.SOCK_STREAM, 0); !errors.Is(err, os.ErrClosed) {
		unix.Close(fd)
		t.Errorf("Socket after Close: %v, want os.ErrClosed", err)
	}
	if fd, err := src.Socket(unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_ROUTE); !errors.Is(err, os.ErrClosed) {
		unix.Close(fd)
		t.Errorf("netlink Socket after Close: %v, want os.ErrClosed", err)
	}
	if err := src.Sysctl("net/ipv4/tcp_fwmark_accept", "1"); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Sysctl after Close: %v, want os.ErrClosed", err)
	}
}

// testRestart kills the helper and checks that the next calls get a new one,
// that the old one was reaped, and that the death was logged once.
func testRestart(t *testing.T, hs *helperSource, fx *fixture, logs *logLines) {
	child := nsInode(t, fx.path)
	old := hs.helperPID()
	if old <= 0 {
		t.Fatal("no helper running")
	}
	if err := unix.Kill(old, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, old)
	// A kind made on request needs the helper at once.
	fd, err := hs.Socket(unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatalf("socket after the helper was killed: %v", err)
	}
	unix.Close(fd)
	now := hs.helperPID()
	if now <= 0 || now == old {
		t.Fatalf("helper pid %d after restart, old %d", now, old)
	}
	if n := logs.count("died"); n != 1 {
		t.Errorf("helper death logged %d times, want once: %q", n, logs.lines)
	}
	// Kill it again and run the pools dry: refills go to the next helper.
	if err := unix.Kill(now, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, now)
	for i := range 3 * poolBatch {
		fd, err := hs.Socket(unix.AF_INET6, unix.SOCK_STREAM, 0)
		if err != nil {
			t.Fatalf("socket %d after the second kill: %v", i, err)
		}
		if got := socketNetns(t, fd); got != child {
			t.Fatalf("socket after restart is in netns %d, want %d", got, child)
		}
		unix.Close(fd)
	}
	if err := hs.Sysctl("net/ipv4/tcp_fwmark_accept", "1"); err != nil {
		t.Fatalf("sysctl after restart: %v", err)
	}
	if p := hs.helperPID(); p == now || p <= 0 {
		t.Fatalf("helper pid %d after the second restart", p)
	}
}

// waitGone waits until pid has left /proc: dead and reaped, not a zombie.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); errors.Is(err, os.ErrNotExist) {
			return
		}
		if time.Now().After(deadline) {
			state, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			t.Fatalf("helper %d not reaped after 5 s: %s", pid, state)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// connectFd connects a non-blocking socket to addr and wraps it in a net.Conn.
func connectFd(t *testing.T, fd int, addr string) net.Conn {
	t.Helper()
	ta, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	var sa unix.Sockaddr
	if ip4 := ta.IP.To4(); ip4 != nil {
		sa = &unix.SockaddrInet4{Port: ta.Port, Addr: [4]byte(ip4)}
	} else {
		sa = &unix.SockaddrInet6{Port: ta.Port, Addr: [16]byte(ta.IP.To16())}
	}
	err = unix.Connect(fd, sa)
	if errors.Is(err, unix.EINPROGRESS) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
		if n, perr := unix.Poll(pfd, 5000); perr != nil || n == 0 {
			err = fmt.Errorf("connect did not finish: %v", perr)
		} else if soerr, gerr := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); gerr != nil {
			err = gerr
		} else if soerr != 0 {
			err = unix.Errno(soerr)
		} else {
			err = nil
		}
	}
	if err != nil {
		unix.Close(fd)
		t.Fatalf("connect to %s: %v", addr, err)
	}
	f := os.NewFile(uintptr(fd), "child conn")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func ioReadFull(c net.Conn, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := c.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// nsInode is the inode of the namespace file at path.
func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// socketNetns is the inode of the netns a socket lives in (SIOCGSKNS).
func socketNetns(t *testing.T, fd int) uint64 {
	t.Helper()
	nsfd, err := unix.IoctlRetInt(fd, unix.SIOCGSKNS)
	if err != nil {
		t.Fatalf("SIOCGSKNS on fd %d: %v", fd, err)
	}
	defer unix.Close(nsfd)
	var st unix.Stat_t
	if err := unix.Fstat(nsfd, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// testNoFdLeak takes sockets from a fresh source, closes them and the
// source, and checks that the process holds as many fds as before; while
// open, the pools are all the source holds beyond a few fixed fds.
func testNoFdLeak(t *testing.T, src SocketSource, fx *fixture) {
	before := countFds(t)
	s, err := fx.open(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 * poolBatch {
		for _, domain := range []int{unix.AF_INET, unix.AF_INET6} {
			fd, err := s.Socket(domain, unix.SOCK_STREAM, 0)
			if err != nil {
				t.Fatal(err)
			}
			unix.Close(fd)
		}
	}
	// Refills run in the background; let the last ones land.
	switch s := s.(type) {
	case *setnsSource:
		s.pool.wg.Wait()
	case *helperSource:
		s.pool.wg.Wait()
	}
	pooled := Pooled(s)
	if pooled < 2 || pooled > 2*(poolBatch+poolLowWater) {
		t.Errorf("%d sockets pooled for 2 kinds, want 2..%d", pooled, 2*(poolBatch+poolLowWater))
	}
	// The helper source also holds its control socket, the helper's stderr
	// pipe and the netns, userns and binary it restarts the helper with.
	if extra := countFds(t) - before - pooled; extra < 0 || extra > 6 {
		t.Errorf("open source holds %d fds beyond its %d pooled sockets", extra, pooled)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		after := countFds(t)
		if after == before {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d fds before the source, %d after Close", before, after)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func countFds(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents) - 1 // the directory's own fd
}
