package netns

// This file runs on the parent side.

import (
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// kind is what a socket is: the arguments of socket(2) without flags.
type kind struct{ domain, typ, proto int }

func (k kind) String() string {
	return fmt.Sprintf("socket(domain %d, type %d, proto %d)", k.domain, k.typ, k.proto)
}

// kindOf strips the flags from typ and reports whether sockets of this kind
// are kept in a pool: TCP and UDP over IPv4 and IPv6, what a port forwarder
// makes per connection or flow. Other kinds (netlink, raw) are rare and are
// made on request. The protocol is normalised so that (AF_INET, SOCK_STREAM, 0)
// and (AF_INET, SOCK_STREAM, IPPROTO_TCP) share a pool.
func kindOf(domain, typ, proto int) (kind, bool) {
	k := kind{domain, typ &^ (unix.SOCK_CLOEXEC | unix.SOCK_NONBLOCK), proto}
	if k.domain != unix.AF_INET && k.domain != unix.AF_INET6 {
		return k, false
	}
	switch {
	case k.typ == unix.SOCK_STREAM && (k.proto == 0 || k.proto == unix.IPPROTO_TCP):
		k.proto = 0
		return k, true
	case k.typ == unix.SOCK_DGRAM && (k.proto == 0 || k.proto == unix.IPPROTO_UDP):
		k.proto = 0
		return k, true
	}
	return k, false
}

const (
	poolBatch    = 64 // sockets per refill: one IPC round trip buys this many
	poolLowWater = 16 // a refill starts when fewer than this are left
)

// socketPool keeps sockets of the pooled kinds made ahead of demand. A
// refill runs in the background when a pool drops below the low-water
// mark, so a caller normally takes a ready socket and pays no round trip.
type socketPool struct {
	// make returns between 1 and n new sockets of kind k in the child netns.
	make func(k kind, n int) ([]int, error)

	mu     sync.Mutex
	closed bool
	kinds  map[kind]*kindPool
	wg     sync.WaitGroup // running refills
}

type kindPool struct {
	fds       []int
	refilling bool
	done      chan struct{} // closed when the running refill ends
	err       error         // the last refill's error, if it brought nothing
}

func newSocketPool(make func(k kind, n int) ([]int, error)) *socketPool {
	return &socketPool{make: make, kinds: map[kind]*kindPool{}}
}

// get returns a socket of a pooled kind; the caller owns it.
func (p *socketPool) get(k kind) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	kp := p.kinds[k]
	if kp == nil {
		kp = &kindPool{}
		p.kinds[k] = kp
	}
	for {
		if p.closed {
			return -1, fmt.Errorf("netns: %v: %w", k, os.ErrClosed)
		}
		if n := len(kp.fds); n > 0 {
			fd := kp.fds[n-1]
			kp.fds = kp.fds[:n-1]
			if n-1 < poolLowWater {
				p.refill(k, kp)
			}
			return fd, nil
		}
		p.refill(k, kp)
		done := kp.done
		p.mu.Unlock()
		<-done
		p.mu.Lock()
		if len(kp.fds) == 0 && kp.err != nil {
			return -1, kp.err
		}
		// Otherwise take one of the new sockets, or, if other callers took
		// them all first, start another refill.
	}
}

// refill starts a background refill of kp unless one is running. p.mu is held.
func (p *socketPool) refill(k kind, kp *kindPool) {
	if kp.refilling {
		return
	}
	kp.refilling = true
	kp.done = make(chan struct{})
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		fds, err := p.make(k, poolBatch)
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.closed {
			closeFds(fds)
		} else {
			kp.fds = append(kp.fds, fds...)
		}
		kp.err = err
		kp.refilling = false
		close(kp.done)
	}()
}

// close stops handing out sockets. Callers waiting for a refill get
// os.ErrClosed once it ends.
func (p *socketPool) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
}

// drain waits for running refills (close the source behind them first, so
// that they end quickly) and closes every pooled socket.
func (p *socketPool) drain() {
	p.wg.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, kp := range p.kinds {
		closeFds(kp.fds)
		kp.fds = nil
	}
}

// Pooled is how many sockets src holds ready for callers, 0 for a source
// without pools. Tests that count a process's fds subtract it: a pool holds
// between a few and poolBatch+poolLowWater sockets per kind in use.
func Pooled(src SocketSource) int {
	var p *socketPool
	switch s := src.(type) {
	case *setnsSource:
		p = s.pool
	case *helperSource:
		p = s.pool
	default:
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, kp := range p.kinds {
		n += len(kp.fds)
	}
	return n
}

func closeFds(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
