package builtin

import (
	"context"
	"fmt"
	"golang.org/x/sys/unix"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/netns"
)

func countFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// steady returns count() once it stops changing (pools refill in the background).
func steady(count func() int) int {
	last := count()
	for i := 0; i < 100; i++ {
		time.Sleep(50 * time.Millisecond)
		n := count()
		if n == last {
			return n
		}
		last = n
	}
	return last
}

// settle waits until count() is at most want, and returns the last count.
func settle(count func() int, want int) int {
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := count()
		if n <= want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestNoLeaksAfter10000Connections(t *testing.T) {
	total := 10000
	if testing.Short() {
		total = 2000
	}
	d, n := setup(t, Options{})
	l := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	serve(l, echo)
	udpServer := testenv.ListenPacket(t, n.Path, "udp4", "127.0.0.1:0")
	serveUDP(udpServer)

	// Warm up what lives for the whole process (netpoll, timers, the setns
	// thread), then take the baseline.
	warm, warmID := publish(t, d, libport.Spec{Proto: "tcp4", ChildPort: childPort(l.Addr())})
	roundTrip(t, "tcp4", hostPort("127.0.0.1", warm.ParentPort), "warm")
	d.Remove(context.Background(), warmID)
	runtime.GC()
	// The socket source keeps sockets made ahead of demand: not ours.
	fdCount := func() int { return countFDs(t) - netns.Pooled(d.src) }
	baseFDs := steady(fdCount)
	baseG := runtime.NumGoroutine()

	spec, id := publish(t, d, libport.Spec{Proto: "tcp4", ChildPort: childPort(l.Addr())})
	uspec, uid := publish(t, d, libport.Spec{Proto: "udp4", ChildPort: childPort(udpServer.LocalAddr())})
	addr := hostPort("127.0.0.1", spec.ParentPort)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, 1)
	work := make(chan int)
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4)
			for range work {
				c, err := net.Dial("tcp4", addr)
				if err == nil {
					c.SetDeadline(time.Now().Add(10 * time.Second))
					if _, err = c.Write([]byte("ping")); err == nil {
						_, err = io.ReadFull(c, buf)
					}
					c.Close()
				}
				if err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		}()
	}
	for i := 0; i < total; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	t.Logf("%d connections in %v", total, time.Since(start))

	// Leave some connections and UDP flows open: Remove must close them.
	var open []net.Conn
	for i := 0; i < 50; i++ {
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		roundTripConn(t, c)
		open = append(open, c)
	}
	uaddr, _ := net.ResolveUDPAddr("udp4", hostPort("127.0.0.1", uspec.ParentPort))
	for i := 0; i < 50; i++ {
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		_, err = udpAsk(pc, uaddr, "hi")
		pc.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Remove(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	if err := d.Remove(context.Background(), uid); err != nil {
		t.Fatal(err)
	}
	for _, c := range open {
		c.Close()
	}
	// What is left open on our side are the client sockets this test holds
	// (closed above) and the echo server's (closed when they see EOF).
	fds := settle(fdCount, baseFDs)
	gs := settle(runtime.NumGoroutine, baseG)
	if fds > baseFDs {
		t.Errorf("fds: %d after, %d before: %v", fds, baseFDs, fdKinds(t))
	}
	if gs > baseG {
		buf := make([]byte, 1<<20)
		t.Errorf("goroutines: %d after, %d before\n%s", gs, baseG, buf[:runtime.Stack(buf, true)])
	}
	t.Logf("fds %d → %d, goroutines %d → %d", baseFDs, fds, baseG, gs)

	// Idle pipes are closed too, so they stop counting against the user's limit.
	live := settle(func() int { l, _ := pipes.stats(); return l }, 0)
	if live != 0 {
		t.Errorf("%d pipes still open after the connections ended", live)
	}
}

// fdKinds counts the open fds by what they point to, to name a leak.
func fdKinds(t testing.TB) map[string]int {
	ents, _ := os.ReadDir("/proc/self/fd")
	kinds := map[string]int{}
	for _, e := range ents {
		target, _ := os.Readlink("/proc/self/fd/" + e.Name())
		if i := strings.IndexByte(target, ':'); i > 0 {
			target = target[:i]
		}
		if target == "socket" {
			fd, _ := strconv.Atoi(e.Name())
			typ, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
			sa, _ := unix.Getsockname(fd)
			pa, _ := unix.Getpeername(fd)
			target = fmt.Sprintf("socket type %d %s -> %s", typ, saString(sa), saString(pa))
		}
		kinds[target]++
	}
	return kinds
}

func saString(sa unix.Sockaddr) string {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return fmt.Sprintf("%v:%d", net.IP(sa.Addr[:]), sa.Port)
	case *unix.SockaddrInet6:
		return fmt.Sprintf("[%v]:%d", net.IP(sa.Addr[:]), sa.Port)
	case *unix.SockaddrUnix:
		return "unix:" + sa.Name
	case *unix.SockaddrNetlink:
		return "netlink"
	}
	return fmt.Sprintf("%T", sa)
}

func roundTripConn(t testing.TB, c net.Conn) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Time{})
}
