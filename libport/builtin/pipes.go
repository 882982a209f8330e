package builtin

// The pipes splice(2) moves bytes through. Pipe buffers count against a
// per-user limit (fs.pipe-user-pages-soft, 64 MiB by default, shared by every
// process of the user): once a user is over it, new pipes get one or two
// pages and F_SETPIPE_SZ fails, and every splice-based proxy of that user
// crawls. Go's own io.Copy splice keeps a pool of 1 MiB pipes that grows
// with the number of connections; we keep our own instead, bounded and sized
// on purpose, and lend a pipe to a connection only while bytes are in flight.

import (
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// pipeSize is what one splice moves at most: as Go's own splice pipes,
	// 1 MiB, so that a bulk transfer costs few syscalls (measured against
	// 256 KiB: forwarder CPU per GB 7-13% lower, same run).
	pipeSize = 1 << 20
	// maxPipes bounds the pipes of the process: 16 x 1 MiB = 16 MiB, a
	// quarter of the default per-user soft limit. A pipe is lent only while
	// bytes are in flight, so 16 covers that many transfers moving at the
	// same instant; connections beyond it copy through pooled buffers.
	maxPipes = 16
	// idlePipeTTL is how long a pipe nobody uses stays open for reuse; pipes
	// count against the user limit even when empty, so idle ones are closed.
	idlePipeTTL = 2 * time.Second
	// pipeRetryAfter pauses pipe creation after the kernel refused a pipe of
	// pipeSize (the user is over the limit), so each connection does not pay
	// for a failing attempt.
	pipeRetryAfter = time.Second
	// copyBufSize is the fallback buffer when no pipe is free.
	copyBufSize = 128 << 10
)

// pipe is a kernel pipe of pipeSize bytes; both ends are non-blocking.
type pipe struct {
	r, w int
	idle time.Time // when it was last returned to the pool
}

// pipePool lends pipes. It never holds more than maxPipes, and closes those
// idle for longer than idlePipeTTL.
type pipePool struct {
	mu       sync.Mutex
	idle     []*pipe // most recently returned last
	live     int     // pipes open: idle + lent
	trimming bool    // a trim timer is pending
	noneTill atomic.Int64
	logOnce  sync.Once
	logf     func(string, ...any)
}

var pipes = &pipePool{}

// get lends a pipe, or returns nil when none can be had: the caller then
// copies through a buffer.
func (p *pipePool) get() *pipe {
	p.mu.Lock()
	if n := len(p.idle); n > 0 {
		pp := p.idle[n-1]
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		return pp
	}
	if p.live >= maxPipes || time.Now().UnixNano() < p.noneTill.Load() {
		p.mu.Unlock()
		return nil
	}
	p.live++
	p.mu.Unlock()
	pp, err := newPipe()
	if err != nil {
		p.mu.Lock()
		p.live--
		p.mu.Unlock()
		p.noneTill.Store(time.Now().Add(pipeRetryAfter).UnixNano())
		p.logOnce.Do(func() {
			p.mu.Lock()
			logf := p.logf
			p.mu.Unlock()
			if logf != nil {
				logf("builtin: cannot make a %d KiB pipe (%v): copying through buffers while pipes are short; see fs.pipe-user-pages-soft", pipeSize>>10, err)
			}
		})
		return nil
	}
	return pp
}

// setLogf names where the pool reports that pipes ran short (once per process).
func (p *pipePool) setLogf(logf func(string, ...any)) {
	p.mu.Lock()
	if p.logf == nil {
		p.logf = logf
	}
	p.mu.Unlock()
}

// put returns an empty pipe for reuse.
func (p *pipePool) put(pp *pipe) {
	pp.idle = time.Now()
	p.mu.Lock()
	p.idle = append(p.idle, pp)
	if !p.trimming {
		p.trimming = true
		time.AfterFunc(idlePipeTTL, p.trim)
	}
	p.mu.Unlock()
}

// discard closes a pipe that may still hold bytes (its connection failed).
func (p *pipePool) discard(pp *pipe) {
	pp.close()
	p.mu.Lock()
	p.live--
	p.mu.Unlock()
}

// trim closes the pipes idle for longer than idlePipeTTL and reschedules
// itself while any remain.
func (p *pipePool) trim() {
	cutoff := time.Now().Add(-idlePipeTTL)
	p.mu.Lock()
	n := 0
	for n < len(p.idle) && p.idle[n].idle.Before(cutoff) {
		n++
	}
	old := append([]*pipe(nil), p.idle[:n]...)
	p.idle = append(p.idle[:0], p.idle[n:]...)
	p.live -= len(old)
	if len(p.idle) > 0 {
		time.AfterFunc(idlePipeTTL, p.trim)
	} else {
		p.trimming = false
	}
	p.mu.Unlock()
	for _, pp := range old {
		pp.close()
	}
}

// stats reports the pipes open and idle, for tests.
func (p *pipePool) stats() (live, idle int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.live, len(p.idle)
}

func newPipe() (*pipe, error) {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, err
	}
	pp := &pipe{r: fds[0], w: fds[1]}
	// A pipe smaller than asked for (the user is over the soft limit) would
	// move a page per syscall: refuse it and let the caller use a buffer.
	if _, err := unix.FcntlInt(uintptr(pp.w), unix.F_SETPIPE_SZ, pipeSize); err != nil {
		pp.close()
		return nil, err
	}
	return pp, nil
}

func (pp *pipe) close() {
	unix.Close(pp.r)
	unix.Close(pp.w)
}

// copyBufs holds the fallback buffers; like pipes they are lent only while
// bytes are in flight.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}
