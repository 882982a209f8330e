package netns

// This file runs on the parent side only, but one goroutine of it runs on an
// OS thread that lives inside the child netns (see serve).

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// setnsSource makes sockets on one OS thread that joined the child netns
// once and never leaves it: a socket costs a hand-off to that thread, not a
// setns pair, and the rest of the process never runs inside the child. TCP
// and UDP sockets are made in batches ahead of demand, as the helper's are,
// so that most calls skip even the hand-off.
type setnsSource struct {
	path string
	reqs chan setnsRequest
	pool *socketPool

	mu     sync.Mutex // guards closed against sends on reqs
	closed bool
	done   chan struct{} // closed when the thread has exited
}

// setnsRequest is one job for the thread inside the child netns.
type setnsRequest struct {
	do    func()
	reply chan struct{}
}

// NewSetnsSource joins the network namespace at path on a dedicated, locked
// OS thread. It needs CAP_SYS_ADMIN over the namespace (root, or a process
// already inside the owning user namespace); otherwise it fails with an error
// that wraps unix.EPERM, and NewHelperSource is the way in.
func NewSetnsSource(path string) (SocketSource, error) {
	s := &setnsSource{path: path, reqs: make(chan setnsRequest), done: make(chan struct{})}
	started := make(chan error, 1)
	go s.serve(started)
	if err := <-started; err != nil {
		return nil, err
	}
	s.pool = newSocketPool(s.makeSockets)
	return s, nil
}

// serve is the thread inside the child netns. It never unlocks the thread:
// when it returns, the Go runtime ends the thread instead of reusing it in
// the wrong namespace.
func (s *setnsSource) serve(started chan<- error) {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// This is the main thread: /proc/self shows its namespaces for the
		// whole process, and Go never ends it, so it would stay in the child
		// for good. Serve from another thread: while this goroutine holds
		// the main thread, the new one cannot run on it.
		locked := make(chan struct{})
		go func() {
			runtime.LockOSThread()
			close(locked)
			s.serveLocked(started)
		}()
		<-locked
		runtime.UnlockOSThread()
		return
	}
	s.serveLocked(started)
}

// serveLocked joins the child netns on the calling, locked thread (not the
// main one) and serves requests there until Close.
func (s *setnsSource) serveLocked(started chan<- error) {
	defer close(s.done)
	target, err := os.Open(s.path)
	if err != nil {
		runtime.UnlockOSThread() // nothing changed yet: the thread is clean
		started <- fmt.Errorf("netns: open %s: %w (want a netns path such as /proc/PID/ns/net)", s.path, err)
		return
	}
	err = unix.Setns(int(target.Fd()), unix.CLONE_NEWNET)
	target.Close()
	if err != nil {
		runtime.UnlockOSThread() // setns failed, so the thread is still ours
		started <- fmt.Errorf("netns: setns %s: %w (needs CAP_SYS_ADMIN over the namespace; a rootless forwarder uses the helper)", s.path, err)
		return
	}
	started <- nil
	for r := range s.reqs {
		r.do()
		close(r.reply)
	}
}

// call runs do on the thread inside the child netns.
func (s *setnsSource) call(do func()) error {
	reply := make(chan struct{})
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return fmt.Errorf("netns: source for %s: %w", s.path, os.ErrClosed)
	}
	// The send completes while we hold mu, so Close cannot close reqs under us;
	// the thread never blocks on anything but reqs, so this is a quick hand-off.
	s.reqs <- setnsRequest{do: do, reply: reply}
	s.mu.Unlock()
	<-reply
	return nil
}

func (s *setnsSource) Socket(domain, typ, proto int) (int, error) {
	if k, pooled := kindOf(domain, typ, proto); pooled {
		return s.pool.get(k)
	}
	fds, err := s.makeSockets(kind{domain, typ &^ (unix.SOCK_CLOEXEC | unix.SOCK_NONBLOCK), proto}, 1)
	if err != nil {
		return -1, err
	}
	return fds[0], nil
}

// makeSockets makes up to n sockets of kind k on the thread in the child.
func (s *setnsSource) makeSockets(k kind, n int) ([]int, error) {
	fds := make([]int, 0, n)
	var serr error
	err := s.call(func() {
		for range n {
			fd, err := unix.Socket(k.domain, k.typ|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, k.proto)
			if err != nil {
				serr = err
				return
			}
			fds = append(fds, fd)
		}
	})
	if err != nil {
		return nil, err
	}
	if len(fds) == 0 {
		return nil, fmt.Errorf("netns: %v in %s: %w", k, s.path, serr)
	}
	return fds, nil
}

func (s *setnsSource) Sysctl(key, value string) error {
	p, err := sysctlPath(key)
	if err != nil {
		return err
	}
	// The open must happen on the thread inside the child: /proc/sys/net
	// shows the netns of the thread that looks the file up.
	if cerr := s.call(func() { err = writeSysctl(p, value) }); cerr != nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("netns: sysctl %s=%s in %s: %w", key, value, s.path, err)
	}
	return nil
}

func (s *setnsSource) Close() error {
	s.pool.close()
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		close(s.reqs)
	}
	s.mu.Unlock()
	<-s.done
	s.pool.drain()
	return nil
}

// sysctlPath checks a key such as "net/ipv4/tcp_fwmark_accept" and returns
// its file under /proc/sys. Dotted keys are refused because interface names
// may hold dots, which makes the conversion ambiguous.
func sysctlPath(key string) (string, error) {
	if key == "" || key[0] == '/' || key[len(key)-1] == '/' {
		return "", fmt.Errorf("netns: sysctl key %q: want a relative path under /proc/sys such as net/ipv4/tcp_fwmark_accept", key)
	}
	for _, part := range strings.Split(key, "/") {
		if part == "" || part == "." || part == ".." {
			return "", fmt.Errorf("netns: sysctl key %q: empty, . or .. path element", key)
		}
	}
	for i := 0; i < len(key); i++ {
		if key[i] == 0 {
			return "", fmt.Errorf("netns: sysctl key %q: NUL byte", key)
		}
	}
	return "/proc/sys/" + key, nil
}

// writeSysctl writes value to the sysctl file p from the calling thread.
func writeSysctl(p, value string) error {
	fd, err := unix.Open(p, unix.O_WRONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: p, Err: err}
	}
	defer unix.Close(fd)
	n, err := unix.Write(fd, []byte(value))
	if err != nil {
		return &os.PathError{Op: "write", Path: p, Err: err}
	}
	if n != len(value) {
		return &os.PathError{Op: "write", Path: p, Err: errors.New("short write")}
	}
	return nil
}
