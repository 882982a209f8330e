package builtin

// Parent side: UDP listeners in the host netns and the flow table. Each
// client address is a flow with its own socket in the child netns, so the
// service sees one peer per client. The listener and its flows live on one
// event loop (loop.go), which reads them in batches: no goroutine per flow
// or datagram, and no netpoller hand-off between a request and its reply.

import (
	"container/list"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport"
)

// udpReadBuffer is asked of the parent listener: bursts of datagrams must
// not be dropped before the batch reader gets to them (the kernel caps it at
// net.core.rmem_max).
const udpReadBuffer = 4 << 20

type udpPort struct {
	d     *Driver
	spec  libport.Spec
	child netip.AddrPort
	fd    int     // the listener, non-blocking, in loop's epoll set
	loop  *evLoop // carries the listener and every flow of the port

	// transparent: replies from the child port are routed back to flows
	// bound to the client's address (UDP source IP is on and set up).
	transparent bool
	childRaw    rawAddr // the child address, for unconnected (transparent) flows

	mu      sync.Mutex
	flows   map[netip.AddrPort]*udpFlow
	lru     list.List // of *udpFlow, most recently used first
	closing bool
	stop    chan struct{}
	wg      sync.WaitGroup

	warn logLimiter
}

// gsoSends counts UDP GSO sends, for tests.
var gsoSends atomic.Int64

type udpFlow struct {
	port        *udpPort
	client      netip.AddrPort // as the listener saw it (maybe v4-mapped)
	clientRaw   rawAddr        // the same in kernel form, for replies
	fd          int            // the child socket, non-blocking, in the port's loop
	closed      bool           // fd is closed; only the loop touches it
	awaiting    bool           // datagrams went to the child since the last reply (loop only)
	answered    bool           // the last request was answered before the next (loop only)
	transparent bool
	elem        *list.Element
	last        atomic.Int64 // unix nanoseconds of the last datagram either way
}

// udpBatchesPerEvent bounds the batches one socket gets per wake-up, so that
// a flood on one does not starve the others on the loop (level-triggered:
// what is left wakes the loop again).
const udpBatchesPerEvent = 4

func (d *Driver) addUDP(spec libport.Spec, child netip.AddrPort) (port, error) {
	loops, err := d.loops.get()
	if err != nil {
		return nil, fmt.Errorf("event loop: %w", err)
	}
	network, addr := listenNetwork(spec)
	pc, err := net.ListenPacket(network, addr)
	if err != nil {
		return nil, annotateListenError(err, network, addr, spec.ParentPort)
	}
	conn := pc.(*net.UDPConn)
	_ = conn.SetReadBuffer(udpReadBuffer)
	// Go made the socket (dual-stack rules); the loop owns a copy of it
	// outside Go's poller. A request and its reply then cost one loop
	// wake-up each instead of a netpoller hand-off to a goroutine.
	fd := -1
	rc, err := conn.SyscallConn()
	if err == nil {
		cerr := rc.Control(func(lfd uintptr) { fd, err = unix.FcntlInt(lfd, unix.F_DUPFD_CLOEXEC, 0) })
		if err == nil {
			err = cerr
		}
	}
	conn.Close()
	if err == nil {
		err = unix.SetNonblock(fd, true)
	}
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("listener of %s %s: %w", network, addr, err)
	}
	p := &udpPort{
		d: d, spec: spec, child: child, fd: fd, loop: loops[int(spec.ParentPort)%len(loops)],
		flows: map[netip.AddrPort]*udpFlow{}, stop: make(chan struct{}),
	}
	p.warn.logf = d.opts.Logf
	// Set before the loop may read it, with the first datagram.
	childFamily := domainOf(child.Addr())
	if d.opts.SourceIP.UDP && d.routing.addUDPPort(childFamily, child.Port()) {
		p.transparent = true
		p.childRaw = rawOf(child, childFamily)
	}
	if !p.loop.do(func(lp *evLoop) { err = lp.add(fd, unix.EPOLLIN, p) }) {
		err = net.ErrClosed
	}
	if err != nil {
		unix.Close(fd)
		if p.transparent {
			d.routing.removeUDPPort(childFamily, child.Port())
		}
		return nil, fmt.Errorf("listener of %s %s in the event loop: %w", network, addr, err)
	}
	p.wg.Add(1)
	go p.reap()
	return p, nil
}

// event reads client datagrams in batches and hands each run of datagrams
// from one client to its flow in one sendmmsg. It runs on the port's loop.
func (p *udpPort) event(lp *evLoop, _ int32, _ uint32) {
	b := batches.Get().(*batch)
	defer batches.Put(b)
	for range udpBatchesPerEvent {
		n, err := b.recv(p.fd)
		switch err {
		case nil:
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return
		default:
			p.warn.printf("recv", "builtin: port %s: receive: %v", p.spec, err)
			return
		}
		p.dispatch(lp, b, n)
		if n < batchLen {
			return // drained, most likely: save the recvmmsg that says so
		}
	}
}

func (p *udpPort) dispatch(lp *evLoop, b *batch, n int) {
	now := time.Now().UnixNano()
	for i := 0; i < n; {
		client := b.addr(i)
		j := i + 1
		for j < n && b.addr(j) == client {
			j++
		}
		if f := p.flow(lp, client, b, i, now); f != nil {
			f.forward(b, i, j)
			// A flow whose requests get replies (not a one-way stream,
			// where polling would only take CPU from its ends) has the
			// loop poll for the reply instead of going to sleep.
			if f.awaiting {
				f.answered = false
			}
			f.awaiting = true
			if f.answered {
				lp.spin()
			}
		}
		i = j
	}
}

// flow finds or makes the flow of client, whose first datagram is b's i-th.
// It runs on the port's loop.
func (p *udpPort) flow(lp *evLoop, client netip.AddrPort, b *batch, i int, now int64) *udpFlow {
	p.mu.Lock()
	if f, ok := p.flows[client]; ok {
		f.last.Store(now)
		if p.lru.Front() != f.elem {
			p.lru.MoveToFront(f.elem)
		}
		p.mu.Unlock()
		return f
	}
	closing := p.closing
	p.mu.Unlock()
	if closing {
		return nil
	}
	f, err := p.newFlow(client, b.rawName(i))
	if err != nil {
		p.warn.printf("flow", "builtin: port %s: new flow from %s: %v", p.spec, client, err)
		return nil
	}
	f.last.Store(now)
	if err := lp.add(f.fd, unix.EPOLLIN, f); err != nil {
		unix.Close(f.fd)
		p.warn.printf("flow", "builtin: port %s: new flow from %s in the event loop: %v", p.spec, client, err)
		return nil
	}

	var evicted *udpFlow
	p.mu.Lock()
	if p.closing {
		p.mu.Unlock()
		f.close(lp)
		return nil
	}
	if len(p.flows) >= p.d.opts.UDPMaxFlows {
		if back := p.lru.Back(); back != nil {
			evicted = back.Value.(*udpFlow)
			p.drop(evicted)
		}
	}
	p.flows[client] = f
	f.elem = p.lru.PushFront(f)
	p.mu.Unlock()
	if evicted != nil {
		evicted.close(lp)
	}
	return f
}

// close closes f's socket, once; it runs on the port's loop. Closing the fd
// takes it out of the epoll set.
func (f *udpFlow) close(lp *evLoop) {
	if f.closed {
		return
	}
	f.closed = true
	lp.forget(f.fd)
	unix.Close(f.fd)
}

// newFlow makes the child socket of a flow: transparent when UDP source IP
// is on for the port and the client's address can be used in the child.
func (p *udpPort) newFlow(client netip.AddrPort, raw rawAddr) (*udpFlow, error) {
	f := &udpFlow{port: p, client: client, clientRaw: raw, fd: -1}
	from := netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	var err error
	if p.transparent && canBeTransparent(from, p.child) {
		f.fd, err = udpFlowSocket(p.d.src, p.child, from)
		var terr *transparentError
		if errors.As(err, &terr) {
			p.warn.printf("transparent", "builtin: port %s: flow from the child's own address instead: %v", p.spec, err)
		} else {
			f.transparent = err == nil
		}
	}
	if f.fd < 0 {
		f.fd, err = udpFlowSocket(p.d.src, p.child, netip.AddrPort{})
		if err != nil {
			return nil, err
		}
	}
	return f, nil
}

// drop takes f out of the table; the caller closes its socket. Callers hold p.mu.
func (p *udpPort) drop(f *udpFlow) {
	delete(p.flows, f.client)
	p.lru.Remove(f.elem)
}

// forward sends b's datagrams [i, j) from f's client into the child. It
// never waits: a datagram the child socket will not take now is dropped.
func (f *udpFlow) forward(b *batch, i, j int) {
	for k := i; k < j; k++ {
		size, _ := b.size(k)
		b.setLen(k, size)
		if f.transparent {
			b.setName(k, &f.port.childRaw)
		} else {
			b.clearName(k)
		}
	}
	// Truncated datagrams cannot occur with maxDatagram buffers; nothing to skip.
	if size := b.gsoSize(i, j); size > 0 && !f.port.d.noGSO.Load() {
		var name *rawAddr
		if f.transparent {
			name = &f.port.childRaw
		}
		err := b.sendGSO(f.fd, i, j, size, name)
		if err == nil {
			gsoSends.Add(1)
			return
		}
		if err == unix.EINVAL || err == unix.EIO || err == unix.ENOPROTOOPT || err == unix.EOPNOTSUPP {
			f.port.d.noGSO.Store(true) // a kernel without UDP GSO
		}
		// Otherwise (a full buffer, a pending ICMP error) one at a time.
	}
	b.sendAll(f.fd, i, j)
}

// replyWait bounds how long the loop waits for room in the listener's send
// buffer before it drops a flow's replies.
const replyWait = time.Millisecond

// event reads the service's replies in batches and sends them to the client
// from the parent listener. It runs on the port's loop.
func (f *udpFlow) event(lp *evLoop, _ int32, _ uint32) {
	p := f.port
	b := batches.Get().(*batch)
	defer batches.Put(b)
	for r := 0; r < udpBatchesPerEvent && !f.closed; r++ {
		n, err := b.recv(f.fd)
		switch err {
		case nil:
		case unix.EINTR, unix.ECONNREFUSED:
			// ECONNREFUSED: nothing listens on the child port (yet);
			// the flow stays for when something does.
			continue
		case unix.EAGAIN:
			return
		default:
			p.warn.printf("reply", "builtin: port %s: reading replies for %s: %v", p.spec, f.client, err)
			p.end(lp, f)
			return
		}
		f.last.Store(time.Now().UnixNano())
		if f.awaiting {
			f.awaiting, f.answered = false, true
		}
		for k := 0; k < n; k++ {
			size, _ := b.size(k)
			b.setLen(k, size)
			b.setName(k, &f.clientRaw)
		}
		waited := false
		for sent := 0; sent < n; {
			m, err := b.send(p.fd, sent, n)
			switch err {
			case nil:
				sent += m
			case unix.EINTR:
			case unix.EAGAIN:
				// The listener's send buffer is full: wait a little for
				// room, then drop rather than stall every flow of the loop.
				if waited {
					sent = n
					break
				}
				waited = true
				fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLOUT}}
				_, _ = unix.Poll(fds, int(replyWait/time.Millisecond))
			default:
				sent++ // this client cannot be reached: drop the datagram
			}
		}
		if n < batchLen {
			return
		}
	}
}

// end closes f and takes it out of the table, unless that already happened.
// It runs on the port's loop.
func (p *udpPort) end(lp *evLoop, f *udpFlow) {
	p.mu.Lock()
	if cur, ok := p.flows[f.client]; ok && cur == f {
		p.drop(f)
	}
	p.mu.Unlock()
	f.close(lp)
}

// reap ends flows idle for longer than the idle timeout.
func (p *udpPort) reap() {
	defer p.wg.Done()
	timeout := p.d.opts.UDPIdleTimeout
	every := min(max(timeout/4, 10*time.Millisecond), 5*time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case now := <-t.C:
			cutoff := now.Add(-timeout).UnixNano()
			var idle []*udpFlow
			p.mu.Lock()
			for _, f := range p.flows {
				if f.last.Load() < cutoff {
					idle = append(idle, f)
					p.drop(f)
				}
			}
			p.mu.Unlock()
			if len(idle) > 0 {
				// Wait, so that a flow reaped is gone when this returns
				// (tests count sockets).
				p.loop.do(func(lp *evLoop) {
					for _, f := range idle {
						f.close(lp)
					}
				})
			}
		}
	}
}

// flowCount is the number of live flows, for tests.
func (p *udpPort) flowCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.flows)
}

// close stops the listener, ends every flow and waits for the reaper.
func (p *udpPort) close() {
	p.mu.Lock()
	p.closing = true
	flows := make([]*udpFlow, 0, len(p.flows))
	for _, f := range p.flows {
		flows = append(flows, f)
	}
	p.flows = map[netip.AddrPort]*udpFlow{}
	p.lru.Init()
	p.mu.Unlock()
	closeAll := func(lp *evLoop) {
		lp.forget(p.fd)
		unix.Close(p.fd)
		for _, f := range flows {
			f.close(lp)
		}
	}
	if !p.loop.do(closeAll) {
		// The loop has ended (the driver is closing): nothing else uses the fds.
		for _, f := range flows {
			if !f.closed {
				f.closed = true
				unix.Close(f.fd)
			}
		}
		unix.Close(p.fd)
	}
	close(p.stop)
	p.wg.Wait()
	if p.transparent {
		p.d.routing.removeUDPPort(domainOf(p.child.Addr()), p.child.Port())
	}
}
