package builtin

// The event loops that carry TCP and UDP: a few goroutines, each locked to its own
// thread, waiting in its own epoll and moving bytes with splice(2) for the
// connections it owns (both of their sockets, parent and child). Go's netpoller
// with three goroutines per connection spent more of the forwarder's CPU
// handing goroutines between threads (futex, nanosleep, epoll_pwait) than
// on the sockets; a loop sleeps in one epoll_wait and wakes for a batch of
// events. The loops know nothing of namespaces: all sockets are plain fds.

import (
	"net"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// handler gets the events of the fds registered with it. It runs on the
// loop's thread.
type handler interface {
	event(l *evLoop, fd int32, events uint32)
}

// evLoop is one event loop. Only its own goroutine touches handlers and the
// fds registered in it; other goroutines talk to it through do.
type evLoop struct {
	epfd   int
	wakefd int // an eventfd: do writes it so that epoll_wait returns

	mu    sync.Mutex
	cmds  []func(*evLoop)
	ended bool

	handlers map[int32]handler
	done     chan struct{}

	// spinUntil (unix nanoseconds; loop thread only) keeps the loop polling
	// instead of sleeping: a UDP reply is due soon, and waking a sleeping
	// thread costs more than the reply's whole trip through the child.
	spinUntil int64
}

// udpSpin is how long the loop keeps polling after it forwarded a datagram.
var udpSpin = 100 * time.Microsecond

// spin keeps l polling for udpSpin from now; it runs on l.
func (l *evLoop) spin() {
	l.spinUntil = time.Now().UnixNano() + int64(udpSpin)
}

// wakeMarker is the epoll user data of the eventfd (not a real fd number).
const wakeMarker = -1

func newEvLoop() (*evLoop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, err
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: wakeMarker}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(wakefd)
		return nil, err
	}
	l := &evLoop{epfd: epfd, wakefd: wakefd, handlers: map[int32]handler{}, done: make(chan struct{})}
	go l.run()
	return l, nil
}

// do runs f on the loop's thread and waits for it; false when the loop has
// ended (f did not run).
func (l *evLoop) do(f func(*evLoop)) bool {
	ran := make(chan struct{})
	l.mu.Lock()
	if l.ended {
		l.mu.Unlock()
		return false
	}
	l.cmds = append(l.cmds, func(l *evLoop) { f(l); close(ran) })
	l.mu.Unlock()
	l.wake()
	<-ran
	return true
}

// post runs f on the loop's thread later, without waiting.
func (l *evLoop) post(f func(*evLoop)) {
	l.mu.Lock()
	if l.ended {
		l.mu.Unlock()
		return
	}
	l.cmds = append(l.cmds, f)
	l.mu.Unlock()
	l.wake()
}

func (l *evLoop) wake() {
	var one = [8]byte{1}
	_, _ = unix.Write(l.wakefd, one[:])
}

// stop ends the loop once it has run the commands queued before. Every fd
// must have been removed by then.
func (l *evLoop) stop() {
	l.do(func(l *evLoop) {
		l.mu.Lock()
		l.ended = true
		l.mu.Unlock()
	})
	<-l.done
}

// add registers fd with h for events (edge-triggered when asked).
func (l *evLoop) add(fd int, events uint32, h handler) error {
	ev := unix.EpollEvent{Events: events, Fd: int32(fd)}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return err
	}
	l.handlers[int32(fd)] = h
	return nil
}

// remove unregisters fd; closing it afterwards is the caller's.
func (l *evLoop) remove(fd int) {
	_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil)
	delete(l.handlers, int32(fd))
}

// forget drops fd's handler when the fd is about to be closed (closing it
// removes it from the epoll set).
func (l *evLoop) forget(fd int) {
	delete(l.handlers, int32(fd))
}

func (l *evLoop) run() {
	// The thread is the loop's alone: waking it is one epoll_wait return,
	// not a hand-off between threads.
	runtime.LockOSThread()
	defer close(l.done)
	events := make([]unix.EpollEvent, 128)
	for {
		timeout := -1
		if l.spinUntil != 0 {
			if time.Now().UnixNano() < l.spinUntil {
				timeout = 0
			} else {
				l.spinUntil = 0
			}
		}
		n, err := unix.EpollWait(l.epfd, events, timeout)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			panic("builtin: epoll_wait: " + err.Error()) // EBADF/EINVAL: a bug of ours
		}
		for _, ev := range events[:n] {
			if ev.Fd == wakeMarker {
				var buf [8]byte
				_, _ = unix.Read(l.wakefd, buf[:])
				if l.runCmds() {
					unix.Close(l.epfd)
					unix.Close(l.wakefd)
					return
				}
				continue
			}
			// A handler earlier in this batch may have closed the fd.
			if h := l.handlers[ev.Fd]; h != nil {
				h.event(l, ev.Fd, ev.Events)
			}
		}
	}
}

// runCmds runs the queued commands and reports whether the loop must end.
func (l *evLoop) runCmds() bool {
	for {
		l.mu.Lock()
		cmds := l.cmds
		l.cmds = nil
		ended := l.ended
		l.mu.Unlock()
		if len(cmds) == 0 {
			return ended
		}
		for _, f := range cmds {
			f(l)
		}
	}
}

// loopSet is the driver's loops: one per CPU the process may use but one,
// started with the first port.
type loopSet struct {
	mu      sync.Mutex
	loops   []*evLoop
	stopped bool // the driver closed: an Add racing with Close starts none
}

func (s *loopSet) get() ([]*evLoop, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return nil, net.ErrClosed
	}
	if s.loops != nil {
		return s.loops, nil
	}
	// One P stays free: with every P held by a loop blocked in epoll_wait,
	// Go's sysmon takes them back on every tick and never backs off.
	n := max(min(runtime.GOMAXPROCS(0), runtime.NumCPU())-1, 1)
	var loops []*evLoop
	for range max(n, 1) {
		l, err := newEvLoop()
		if err != nil {
			for _, l := range loops {
				l.stop()
			}
			return nil, err
		}
		loops = append(loops, l)
	}
	s.loops = loops
	return loops, nil
}

func (s *loopSet) stop() {
	s.mu.Lock()
	loops := s.loops
	s.loops = nil
	s.stopped = true
	s.mu.Unlock()
	for _, l := range loops {
		l.stop()
	}
}
