package builtin

// Parent side: UDP listeners in the host netns and the flow table. Each
// client address is a flow with its own socket in the child netns, so the
// service sees one peer per client; one goroutine reads the listener in
// batches and one per flow reads replies in batches. No goroutine per
// datagram.

import (
	"container/list"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
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
	conn  *net.UDPConn
	rc    syscall.RawConn

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
	file        *os.File
	rc          syscall.RawConn
	transparent bool
	elem        *list.Element
	last        atomic.Int64 // unix nanoseconds of the last datagram either way
}

func (d *Driver) addUDP(spec libport.Spec, child netip.AddrPort) (port, error) {
	network, addr := listenNetwork(spec)
	pc, err := net.ListenPacket(network, addr)
	if err != nil {
		return nil, annotateListenError(err, network, addr, spec.ParentPort)
	}
	conn := pc.(*net.UDPConn)
	_ = conn.SetReadBuffer(udpReadBuffer)
	rc, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return nil, err
	}
	p := &udpPort{
		d: d, spec: spec, child: child, conn: conn, rc: rc,
		flows: map[netip.AddrPort]*udpFlow{}, stop: make(chan struct{}),
	}
	p.warn.logf = d.opts.Logf
	childFamily := domainOf(child.Addr())
	if d.opts.SourceIP.UDP && d.routing.addUDPPort(childFamily, child.Port()) {
		p.transparent = true
		p.childRaw = rawOf(child, childFamily)
	}
	p.wg.Add(2)
	go p.serve()
	go p.reap()
	return p, nil
}

// serve reads client datagrams in batches and hands each run of datagrams
// from one client to its flow in one sendmmsg.
func (p *udpPort) serve() {
	defer p.wg.Done()
	var (
		b    *batch
		n    int
		rerr error
	)
	defer func() {
		if b != nil {
			batches.Put(b)
		}
	}()
	read := func(fd uintptr) bool {
		for {
			if b == nil {
				b = batches.Get().(*batch)
			}
			n, rerr = b.recv(int(fd))
			switch rerr {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				batches.Put(b) // wait holding no buffers
				b = nil
				return false
			}
			return true
		}
	}
	for {
		if err := p.rc.Read(read); err != nil {
			return // the listener was closed
		}
		if rerr != nil {
			p.warn.printf("recv", "builtin: port %s: receive: %v", p.spec, rerr)
			continue
		}
		p.dispatch(b, n)
	}
}

func (p *udpPort) dispatch(b *batch, n int) {
	now := time.Now().UnixNano()
	for i := 0; i < n; {
		client := b.addr(i)
		j := i + 1
		for j < n && b.addr(j) == client {
			j++
		}
		if f := p.flow(client, b, i, now); f != nil {
			f.forward(b, i, j)
		}
		i = j
	}
}

// flow finds or makes the flow of client, whose first datagram is b's i-th.
func (p *udpPort) flow(client netip.AddrPort, b *batch, i int, now int64) *udpFlow {
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

	var evicted *udpFlow
	p.mu.Lock()
	if p.closing {
		p.mu.Unlock()
		f.file.Close()
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
	p.wg.Add(1)
	p.mu.Unlock()
	if evicted != nil {
		evicted.file.Close()
	}
	go f.serve()
	return f
}

// newFlow makes the child socket of a flow: transparent when UDP source IP
// is on for the port and the client's address can be used in the child.
func (p *udpPort) newFlow(client netip.AddrPort, raw rawAddr) (*udpFlow, error) {
	f := &udpFlow{port: p, client: client, clientRaw: raw}
	from := netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	var file *os.File
	var err error
	if p.transparent && canBeTransparent(from, p.child) {
		file, err = udpFlowSocket(p.d.src, p.child, from)
		var terr *transparentError
		if errors.As(err, &terr) {
			p.warn.printf("transparent", "builtin: port %s: flow from the child's own address instead: %v", p.spec, err)
		} else {
			f.transparent = err == nil
		}
	}
	if file == nil {
		file, err = udpFlowSocket(p.d.src, p.child, netip.AddrPort{})
		if err != nil {
			return nil, err
		}
	}
	rc, err := file.SyscallConn()
	if err != nil {
		file.Close()
		return nil, err
	}
	f.file, f.rc = file, rc
	return f, nil
}

// drop takes f out of the table; the caller closes its socket. Callers hold p.mu.
func (p *udpPort) drop(f *udpFlow) {
	delete(p.flows, f.client)
	p.lru.Remove(f.elem)
}

// forward sends b's datagrams [i, j) from f's client into the child.
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
	_ = f.rc.Write(func(fd uintptr) bool {
		if size := b.gsoSize(i, j); size > 0 && !f.port.d.noGSO.Load() {
			var name *rawAddr
			if f.transparent {
				name = &f.port.childRaw
			}
			err := b.sendGSO(int(fd), i, j, size, name)
			if err == nil {
				gsoSends.Add(1)
				return true
			}
			if err == unix.EINVAL || err == unix.EIO || err == unix.ENOPROTOOPT || err == unix.EOPNOTSUPP {
				f.port.d.noGSO.Store(true) // a kernel without UDP GSO
			}
			// Otherwise (a full buffer, a pending ICMP error) one at a time.
		}
		b.sendAll(int(fd), i, j)
		return true
	})
}

// serve reads the service's replies in batches and sends them to the client
// from the parent listener.
func (f *udpFlow) serve() {
	p := f.port
	defer p.wg.Done()
	var (
		b    *batch
		n    int
		rerr error
	)
	defer func() {
		if b != nil {
			batches.Put(b)
		}
	}()
	read := func(fd uintptr) bool {
		for {
			if b == nil {
				b = batches.Get().(*batch)
			}
			n, rerr = b.recv(int(fd))
			switch rerr {
			case unix.EINTR, unix.ECONNREFUSED:
				// ECONNREFUSED: nothing listens on the child port (yet);
				// the flow stays for when something does.
				continue
			case unix.EAGAIN:
				batches.Put(b)
				b = nil
				return false
			}
			return true
		}
	}
	for {
		if err := f.rc.Read(read); err != nil {
			return // the flow was closed
		}
		if rerr != nil {
			p.warn.printf("reply", "builtin: port %s: reading replies for %s: %v", p.spec, f.client, rerr)
			p.end(f)
			return
		}
		f.last.Store(time.Now().UnixNano())
		for k := 0; k < n; k++ {
			size, _ := b.size(k)
			b.setLen(k, size)
			b.setName(k, &f.clientRaw)
		}
		sent := 0
		err := p.rc.Write(func(fd uintptr) bool {
			for sent < n {
				m, err := b.send(int(fd), sent, n)
				switch err {
				case nil:
					sent += m
				case unix.EINTR:
				case unix.EAGAIN:
					return false // the listener's send buffer is full: wait, slowing only this flow
				default:
					sent++ // this client cannot be reached: drop the datagram
				}
			}
			return true
		})
		if err != nil {
			return // the listener was closed
		}
	}
}

// end closes f and takes it out of the table, unless that already happened.
func (p *udpPort) end(f *udpFlow) {
	p.mu.Lock()
	if cur, ok := p.flows[f.client]; ok && cur == f {
		p.drop(f)
	}
	p.mu.Unlock()
	f.file.Close()
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
			for _, f := range idle {
				f.file.Close()
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

// close stops the listener, ends every flow and waits for their goroutines.
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
	p.conn.Close()
	close(p.stop)
	for _, f := range flows {
		f.file.Close()
	}
	p.wg.Wait()
	if p.transparent {
		p.d.routing.removeUDPPort(domainOf(p.child.Addr()), p.child.Port())
	}
}
