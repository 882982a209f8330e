package netns

// This file runs on the parent side: it starts, feeds and restarts the
// helper that lives inside the child's user and network namespaces.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Bounds on waiting for the helper: it is local and answers in microseconds,
// so a helper that takes this long is stuck and gets replaced.
const (
	helperStartTimeout   = 10 * time.Second
	helperRequestTimeout = 5 * time.Second
)

var errHelperDied = errors.New("helper died")

// helperSource gets sockets from a helper process inside the child's user
// and network namespaces. A Go process cannot join a user namespace (it is
// multithreaded), and a rootless process cannot setns into a netns owned by
// a user namespace it made, so single-threaded nsenter joins both and execs
// our own binary, whose init() runs the helper loop (helperchild.go).
type helperSource struct {
	path    string
	logf    func(string, ...any)
	nsenter string
	// Held for restarts: a new helper joins exactly these namespaces and
	// runs exactly this binary, even if the process that gave path its
	// name has gone or the binary was replaced on disk.
	userns, netns, exe *os.File

	spawner *spawner
	pool    *socketPool

	mu     sync.Mutex // guards closed and cur; held while a helper starts
	closed bool
	cur    *helperProc
}

// NewHelperSource starts a helper inside the user and network namespaces of
// the netns at path (its owning user namespace is found with NS_GET_USERNS)
// and returns once the helper answers from inside. The caller's euid must own
// that user namespace (or be root). nsenter from util-linux must be on PATH.
func NewHelperSource(path string, opts ...Option) (SocketSource, error) {
	o := buildOptions(opts)
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		return nil, fmt.Errorf("netns: helper for %s: %w (install util-linux)", path, err)
	}
	s := &helperSource{path: path, logf: o.logf, nsenter: nsenter}
	ok := false
	defer func() {
		if !ok {
			s.closeFiles()
		}
	}()
	if s.netns, err = os.Open(path); err != nil {
		return nil, fmt.Errorf("netns: helper: open %s: %w (want a netns path such as /proc/PID/ns/net)", path, err)
	}
	if s.userns, err = OwnerUserns(path); err != nil {
		return nil, fmt.Errorf("netns: helper: owning user namespace of %s: %w", path, err)
	}
	if s.exe, err = os.Open("/proc/self/exe"); err != nil {
		return nil, fmt.Errorf("netns: helper: open own binary: %w", err)
	}
	s.spawner = newSpawner()
	h, err := s.start()
	if err != nil {
		s.spawner.stop()
		return nil, err
	}
	s.cur = h
	s.pool = newSocketPool(s.makeSockets)
	ok = true
	return s, nil
}

func (s *helperSource) closeFiles() {
	for _, f := range []*os.File{s.netns, s.userns, s.exe} {
		if f != nil {
			f.Close()
		}
	}
}

func (s *helperSource) Socket(domain, typ, proto int) (int, error) {
	if k, pooled := kindOf(domain, typ, proto); pooled {
		return s.pool.get(k)
	}
	fds, err := s.makeSockets(kind{domain, typ &^ (unix.SOCK_CLOEXEC | unix.SOCK_NONBLOCK), proto}, 1)
	if err != nil {
		return -1, err
	}
	return fds[0], nil
}

// makeSockets asks the helper for n sockets of kind k.
func (s *helperSource) makeSockets(k kind, n int) ([]int, error) {
	req := request{op: opSocket, domain: int32(k.domain), typ: int32(k.typ), proto: int32(k.proto), count: uint32(n)}
	fds, errno, err := s.do(req)
	if err != nil {
		return nil, fmt.Errorf("netns: %v in %s: %w", k, s.path, err)
	}
	if len(fds) == 0 {
		if errno == 0 {
			errno = unix.EIO // a helper that sends nothing and no error is broken
		}
		return nil, fmt.Errorf("netns: %v in %s: %w", k, s.path, errno)
	}
	return fds, nil
}

func (s *helperSource) Sysctl(key, value string) error {
	if _, err := sysctlPath(key); err != nil {
		return err
	}
	payload := append(append([]byte(key), 0), value...)
	if len(payload) > maxPayload {
		return fmt.Errorf("netns: sysctl %s: key and value longer than %d bytes", key, maxPayload)
	}
	_, errno, err := s.do(request{op: opSysctl, payload: payload})
	if err == nil && errno != 0 {
		err = &os.PathError{Op: "write", Path: "/proc/sys/" + key, Err: errno}
	}
	if err != nil {
		return fmt.Errorf("netns: sysctl %s=%s in %s: %w", key, value, s.path, err)
	}
	return nil
}

// do sends req to the running helper, starting a new one if it died. A
// request cut short by the helper's death is sent once more to its successor:
// every request is safe to repeat.
func (s *helperSource) do(req request) ([]int, unix.Errno, error) {
	for attempt := 0; ; attempt++ {
		h, err := s.helper()
		if err != nil {
			return nil, 0, err
		}
		fds, errno, err := h.call(req)
		if errors.Is(err, errHelperDied) && attempt == 0 {
			continue
		}
		return fds, errno, err
	}
}

// helper returns the running helper, first replacing it if it died.
func (s *helperSource) helper() (*helperProc, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, fmt.Errorf("netns: source for %s: %w", s.path, os.ErrClosed)
	}
	if s.cur != nil && !s.cur.isDead() {
		return s.cur, nil
	}
	if s.cur != nil {
		old := s.cur
		s.cur = nil
		old.stop()
		s.logf("netns: helper for %s (pid %d) died: %v; starting a new one", s.path, old.pid, old.deathReason())
	}
	h, err := s.start()
	if err != nil {
		return nil, err
	}
	s.cur = h
	return h, nil
}

// start execs a new helper and waits until it answers from inside the
// namespaces.
func (s *helperSource) start() (*helperProc, error) {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("netns: helper for %s: socketpair: %w", s.path, err)
	}
	parentEnd := os.NewFile(uintptr(pair[0]), "netns helper control")
	childEnd := os.NewFile(uintptr(pair[1]), "netns helper control (child end)")
	defer childEnd.Close() // the helper has its own copy once started
	fc, err := net.FileConn(parentEnd)
	parentEnd.Close()
	if err != nil {
		return nil, fmt.Errorf("netns: helper for %s: control socket: %w", s.path, err)
	}
	conn := fc.(*net.UnixConn)

	// nsenter does not fork when it enters only user and net namespaces,
	// so the helper is this very process, our child, which we reap.
	cmd := exec.Command(s.nsenter,
		fmt.Sprintf("--user=/proc/self/fd/%d", helperUsernsFd),
		fmt.Sprintf("--net=/proc/self/fd/%d", helperNetnsFd),
		"--preserve-credentials", "--",
		fmt.Sprintf("/proc/self/fd/%d", helperExeFd))
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%d", helperEnv, helperCtrlFd))
	cmd.ExtraFiles = []*os.File{childEnd, s.userns, s.netns, s.exe} // fds 3, 4, 5, 6
	stderr := &tailBuffer{max: 2048}
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// The kernel sends this when the thread that forked the helper
		// exits; the spawner's thread lives as long as the source.
		Pdeathsig: syscall.SIGKILL,
		// Keep terminal signals (^C to the forwarder's group) away from
		// the helper; it goes when the forwarder goes.
		Setpgid: true,
	}
	if err := s.spawner.run(cmd.Start); err != nil {
		conn.Close()
		return nil, fmt.Errorf("netns: helper for %s: start %s: %w", s.path, s.nsenter, err)
	}
	h := &helperProc{
		cmd:     cmd,
		pid:     cmd.Process.Pid,
		conn:    conn,
		stderr:  stderr,
		pending: map[uint32]chan helperReply{},
		dead:    make(chan struct{}),
		exited:  make(chan struct{}),
	}
	go h.wait()
	go h.read()
	if _, errno, err := h.callTimeout(request{op: opHello}, helperStartTimeout); err != nil || errno != 0 {
		h.stop()
		if err == nil {
			err = errno
		}
		return nil, fmt.Errorf("netns: helper for %s (nsenter --user --net --preserve-credentials, pid %d) did not start: %w: %s (the caller must own the user namespace that owns the netns)",
			s.path, h.pid, err, h.deathReason())
	}
	return h, nil
}

func (s *helperSource) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	h := s.cur
	s.cur = nil
	s.mu.Unlock()
	s.pool.close()
	if h != nil {
		h.stop() // fails requests still in flight, so refills end now
	}
	s.pool.drain()
	s.spawner.stop()
	s.closeFiles()
	return nil
}

// helperPID is the pid of the running helper, or 0; for tests.
func (s *helperSource) helperPID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		return 0
	}
	return s.cur.pid
}

// helperProc is one helper process and the parent's end of its control socket.
type helperProc struct {
	cmd    *exec.Cmd
	pid    int
	conn   *net.UnixConn
	stderr *tailBuffer
	nextID atomic.Uint32

	mu      sync.Mutex
	pending map[uint32]chan helperReply
	deadErr error

	dead   chan struct{} // closed when the control socket failed
	exited chan struct{} // closed when the process was reaped
}

type helperReply struct {
	fds   []int
	errno unix.Errno
}

func (h *helperProc) call(req request) ([]int, unix.Errno, error) {
	return h.callTimeout(req, helperRequestTimeout)
}

func (h *helperProc) callTimeout(req request, timeout time.Duration) ([]int, unix.Errno, error) {
	req.id = h.nextID.Add(1)
	ch := make(chan helperReply, 1)
	h.mu.Lock()
	if h.deadErr != nil {
		h.mu.Unlock()
		return nil, 0, errHelperDied
	}
	h.pending[req.id] = ch
	h.mu.Unlock()
	// SOCK_SEQPACKET: one write is one whole message, and net.UnixConn
	// serialises concurrent writers.
	if _, _, err := h.conn.WriteMsgUnix(req.marshal(), nil, nil); err != nil {
		h.fail(fmt.Errorf("write request: %w", err))
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case r := <-ch:
		return r.fds, r.errno, nil
	case <-h.dead:
		if r, ok := h.abandon(req.id, ch); ok {
			return r.fds, r.errno, nil
		}
		return nil, 0, errHelperDied
	case <-timer.C:
		h.fail(fmt.Errorf("no reply within %v", timeout))
		h.kill()
		if r, ok := h.abandon(req.id, ch); ok {
			return r.fds, r.errno, nil
		}
		return nil, 0, fmt.Errorf("helper pid %d: no reply within %v: %w", h.pid, timeout, errHelperDied)
	}
}

// abandon stops waiting for request id and returns its reply if the reader
// delivered it after all. The reader sends while holding h.mu, so once the
// entry is gone no reply (and none of its fds) can slip in unseen.
func (h *helperProc) abandon(id uint32, ch chan helperReply) (helperReply, bool) {
	h.mu.Lock()
	delete(h.pending, id)
	h.mu.Unlock()
	select {
	case r := <-ch:
		return r, true
	default:
		return helperReply{}, false
	}
}

// read delivers replies to their callers until the control socket fails.
func (h *helperProc) read() {
	buf := make([]byte, replyLen+1)
	oob := make([]byte, unix.CmsgSpace(maxBatch*4))
	for {
		// Go asks for MSG_CMSG_CLOEXEC, so received fds are close-on-exec.
		n, oobn, flags, _, err := h.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			h.fail(fmt.Errorf("read reply: %w", err))
			return
		}
		if n == 0 && oobn == 0 {
			h.fail(errors.New("control socket closed (EOF)"))
			return
		}
		fds, perr := parseRights(oob[:oobn])
		if perr == nil && flags&(unix.MSG_CTRUNC|unix.MSG_TRUNC) != 0 {
			perr = errors.New("truncated reply")
		}
		rep, rerr := parseReply(buf[:n])
		if perr == nil && rerr != nil {
			perr = rerr
		}
		if perr == nil && int(rep.nfds) != len(fds) {
			perr = fmt.Errorf("reply announces %d fds, carries %d", rep.nfds, len(fds))
		}
		if perr != nil {
			closeFds(fds)
			h.fail(fmt.Errorf("bad reply: %w", perr))
			h.kill()
			return
		}
		h.mu.Lock()
		ch, ok := h.pending[rep.id]
		delete(h.pending, rep.id)
		if ok {
			ch <- helperReply{fds: fds, errno: unix.Errno(rep.errno)} // buffered: never blocks
		}
		h.mu.Unlock()
		if !ok {
			closeFds(fds) // its caller gave up waiting
		}
	}
}

func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for i := range msgs {
		more, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			closeFds(fds)
			return nil, err
		}
		fds = append(fds, more...)
	}
	return fds, nil
}

// fail marks the helper dead (once) and wakes every caller waiting on it.
func (h *helperProc) fail(err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.deadErr != nil {
		return
	}
	h.deadErr = err
	close(h.dead)
	h.conn.Close()
}

func (h *helperProc) isDead() bool {
	select {
	case <-h.dead:
		return true
	default:
		return false
	}
}

// deathReason says why the helper stopped answering, with what it printed.
func (h *helperProc) deathReason() string {
	h.mu.Lock()
	reason := fmt.Sprint(h.deadErr)
	h.mu.Unlock()
	select {
	case <-h.exited:
		if state := h.cmd.ProcessState.String(); !strings.Contains(reason, state) {
			reason += "; " + state
		}
	case <-time.After(100 * time.Millisecond):
	}
	if out := strings.TrimSpace(h.stderr.String()); out != "" {
		reason += "; stderr: " + out
	}
	return reason
}

func (h *helperProc) kill() { _ = h.cmd.Process.Kill() }

// wait reaps the helper (PID 1 on these machines does not reap orphans, so
// the helper must stay our child and we must wait for it) and marks it dead.
func (h *helperProc) wait() {
	_ = h.cmd.Wait()
	close(h.exited)
	h.fail(fmt.Errorf("exited: %v", h.cmd.ProcessState))
}

// stop ends the helper and waits until it is reaped.
func (h *helperProc) stop() {
	h.fail(errors.New("stopped"))
	h.kill()
	<-h.exited
}

// spawner starts helpers from one locked OS thread that lives as long as
// the source: PDEATHSIG fires when the forking thread exits, and an ordinary
// Go thread may exit at any time.
type spawner struct {
	jobs chan func()
	done chan struct{}
}

func newSpawner() *spawner {
	sp := &spawner{jobs: make(chan func()), done: make(chan struct{})}
	go func() {
		defer close(sp.done)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		for job := range sp.jobs {
			job()
		}
	}()
	return sp
}

func (sp *spawner) run(fn func() error) error {
	errc := make(chan error, 1)
	sp.jobs <- func() { errc <- fn() }
	return <-errc
}

func (sp *spawner) stop() {
	close(sp.jobs)
	<-sp.done
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	max int
	mu  sync.Mutex
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append([]byte(nil), t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
