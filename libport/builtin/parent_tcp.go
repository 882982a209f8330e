package builtin

// Parent side: TCP listeners in the host netns and the life of each proxied
// connection (the child socket comes from child_dial.go, the bytes move in
// copy.go).

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport"
)

type tcpPort struct {
	d     *Driver
	spec  libport.Spec
	child netip.AddrPort
	lfd   int       // the listener, non-blocking, in every loop's epoll set
	loops []*evLoop // every loop accepts from lfd (EPOLLEXCLUSIVE)

	mu      sync.Mutex
	conns   map[*tcpConn]struct{}
	closing bool
	backoff time.Duration // pause after accept failed for want of fds or memory

	warn logLimiter
}

// addTCP listens for spec in the parent netns and starts accepting. Go
// listens with the backlog the machine allows (net.core.somaxconn).
func (d *Driver) addTCP(spec libport.Spec, child netip.AddrPort) (port, error) {
	if d.opts.SourceIP.TCP() {
		d.routing.enableTCP()
	}
	loops, err := d.loops.get()
	if err != nil {
		return nil, fmt.Errorf("event loop: %w", err)
	}
	network, addr := listenNetwork(spec)
	lc := net.ListenConfig{
		// Keep-alive is set once on the listener, which accepted sockets
		// inherit, instead of four setsockopt calls per connection.
		KeepAlive: -1,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) { serr = setKeepAlive(int(fd)) })
			if err != nil {
				return err
			}
			return serr
		},
	}
	l, err := lc.Listen(context.Background(), network, addr)
	if err != nil {
		return nil, annotateListenError(err, network, addr, spec.ParentPort)
	}
	// Go made the socket (dual-stack rules, backlog); the loops own a copy
	// of it outside Go's poller, so its readiness wakes only them.
	lfd := -1
	rc, err := l.(*net.TCPListener).SyscallConn()
	if err == nil {
		cerr := rc.Control(func(fd uintptr) { lfd, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) })
		if err == nil {
			err = cerr
		}
	}
	l.Close()
	if err != nil {
		return nil, fmt.Errorf("listener of %s %s: %w", network, addr, err)
	}
	p := &tcpPort{d: d, spec: spec, child: child, lfd: lfd, loops: loops, conns: map[*tcpConn]struct{}{}}
	p.warn.logf = d.opts.Logf
	for _, lp := range loops {
		lp.do(func(lp *evLoop) { err = errors.Join(err, p.listen(lp)) })
	}
	if err != nil {
		p.close()
		return nil, fmt.Errorf("listener of %s %s in the event loop: %w", network, addr, err)
	}
	return p, nil
}

// listen makes lp accept from the listener. It runs on lp.
func (p *tcpPort) listen(lp *evLoop) error {
	// Level-triggered: a loop that stops after a batch is woken again;
	// exclusive: one loop wakes per new connection, not all.
	return lp.add(p.lfd, unix.EPOLLIN|unix.EPOLLEXCLUSIVE, p)
}

// Keep-alive on client connections, as Go sets it by default (15 s idle, 15 s
// between 9 probes): the service cannot see a dead client through the proxy,
// so the proxy must notice and pass the end on.
const (
	keepAliveIdle     = 15
	keepAliveInterval = 15
	keepAliveCount    = 9
)

func setKeepAlive(fd int) error {
	for _, o := range []struct{ level, opt, v int }{
		{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveIdle},
		{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepAliveInterval},
		{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAliveCount},
		// Small requests and replies must not wait for Nagle on the
		// client's hop; accepted sockets inherit this too.
		{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
	} {
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.v); err != nil {
			return fmt.Errorf("keep-alive and no-delay on the listener: %w", err)
		}
	}
	return nil
}

// acceptBatch bounds the connections one loop accepts per wake-up, so that
// a burst spreads over the loops.
const acceptBatch = 16

// event accepts new connections; it runs on lp.
func (p *tcpPort) event(lp *evLoop, _ int32, _ uint32) {
	for range acceptBatch {
		fd, sa, err := unix.Accept4(p.lfd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		switch err {
		case nil:
		case unix.EAGAIN:
			return
		case unix.EINTR, unix.ECONNABORTED:
			continue
		default:
			// Out of fds or memory: stop accepting on this loop a little
			// and keep serving, as net/http does; the port must not die of
			// a passing shortage.
			p.mu.Lock()
			p.backoff = min(max(2*p.backoff, 5*time.Millisecond), time.Second)
			wait := p.backoff
			p.mu.Unlock()
			p.warn.printf("accept", "builtin: port %s: accept: %v", p.spec, err)
			lp.remove(p.lfd)
			time.AfterFunc(wait, func() {
				lp.post(func(lp *evLoop) {
					p.mu.Lock()
					closing := p.closing
					p.mu.Unlock()
					if !closing {
						_ = p.listen(lp)
					}
				})
			})
			return
		}
		p.mu.Lock()
		p.backoff = 0
		p.mu.Unlock()
		p.serve(lp, fd, sa)
	}
}

// close stops the listener, resets every connection and waits for that.
func (p *tcpPort) close() {
	p.mu.Lock()
	p.closing = true
	p.mu.Unlock()
	for _, lp := range p.loops {
		lp.do(func(lp *evLoop) {
			lp.remove(p.lfd)
			p.mu.Lock()
			var mine []*tcpConn
			for c := range p.conns {
				if c.loop == lp {
					mine = append(mine, c)
				}
			}
			p.mu.Unlock()
			for _, c := range mine {
				c.close(true)
			}
		})
	}
	unix.Close(p.lfd)
}

// dial makes the child side of a connection from client, transparent when
// source IP is on and the client's address can be used in the child. The
// connect is under way when it returns.
func (p *tcpPort) dial(client netip.AddrPort) (int, error) {
	d := p.d
	if d.opts.SourceIP.TCP() && canBeTransparent(client, p.child) && d.routing.tcpReady(client.Addr().Is4()) {
		fd, err := dialTCP(d.src, p.child, client, tcpMark)
		var terr *transparentError
		if !errors.As(err, &terr) {
			return fd, err
		}
		p.warn.printf("transparent", "builtin: port %s: dialing from the child's own address instead: %v", p.spec, err)
	}
	return dialTCP(d.src, p.child, netip.AddrPort{}, 0)
}

// serve starts proxying the accepted parent socket pfd; it runs on lp.
func (p *tcpPort) serve(lp *evLoop, pfd int, sa unix.Sockaddr) {
	c := &tcpConn{port: p, loop: lp, pfd: pfd, cfd: -1}
	p.mu.Lock()
	if p.closing {
		p.mu.Unlock()
		resetClose(pfd)
		return
	}
	p.conns[c] = struct{}{}
	p.mu.Unlock()
	cfd, err := p.dial(clientAddr(sa))
	if err != nil {
		// The client learns at once, as it would from the service itself.
		c.close(true)
		if !errors.Is(err, unix.ECONNREFUSED) {
			p.warn.printf("dial", "builtin: port %s: %v", p.spec, err)
		}
		return
	}
	c.cfd = cfd
	c.up = half{src: pfd, dst: cfd}
	c.down = half{src: cfd, dst: pfd}
	// The child's connect finishes (or fails) while we wait for events: a
	// splice into it waits for EPOLLOUT, and a refusal arrives as EPOLLERR.
	const events = unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET
	if err := lp.add(pfd, events, c); err != nil {
		c.close(true)
		return
	}
	if err := lp.add(cfd, events, c); err != nil {
		c.close(true)
		return
	}
	// The client may have sent its request already: edge-triggered
	// registration reports it, but trying now saves a wake-up.
	c.event(lp, int32(pfd), unix.EPOLLIN)
}

func clientAddr(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

// tcpConn is one proxied connection: pfd is the client's connection in the
// host netns, cfd ours to the service in the child netns. Only its loop
// touches it after serve.
type tcpConn struct {
	port     *tcpPort
	loop     *evLoop
	pfd, cfd int
	up       half // client to service
	down     half // service to client
	closed   bool
}

// event moves what the events on fd allow; it runs on the connection's loop.
func (c *tcpConn) event(_ *evLoop, fd int32, events uint32) {
	if c.closed {
		return
	}
	if events&unix.EPOLLERR != 0 {
		// Reset, refused or timed out: pass it on as a reset.
		c.close(true)
		return
	}
	from, to := &c.up, &c.down // from reads fd, to writes it
	if int(fd) == c.cfd {
		from, to = &c.down, &c.up
	}
	ok := true
	if events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP) != 0 {
		ok = from.move(to.eof)
	}
	if ok && events&(unix.EPOLLOUT|unix.EPOLLHUP) != 0 && to.n > 0 {
		ok = to.move(from.eof)
	}
	switch {
	case !ok:
		c.close(true)
	case c.up.eof && c.down.eof:
		c.close(false)
	}
}

// close closes both sockets, with RST instead of FIN when reset is set. It
// runs on the connection's loop (or before the connection has one).
func (c *tcpConn) close(reset bool) {
	if c.closed {
		return
	}
	c.closed = true
	for _, fd := range []int{c.pfd, c.cfd} {
		if fd < 0 {
			continue
		}
		c.loop.forget(fd)
		if reset {
			resetClose(fd)
		} else {
			unix.Close(fd)
		}
	}
	c.up.release()
	c.down.release()
	c.port.mu.Lock()
	delete(c.port.conns, c)
	c.port.mu.Unlock()
}

// logLimiter prints each kind of message at most once every logEvery, so a
// flood of failing connections cannot flood the log.
type logLimiter struct {
	logf func(string, ...any)
	mu   sync.Mutex
	last map[string]time.Time
}

const logEvery = 10 * time.Second

func (l *logLimiter) printf(kind, format string, args ...any) {
	if l.logf == nil {
		return
	}
	now := time.Now()
	l.mu.Lock()
	if l.last == nil {
		l.last = map[string]time.Time{}
	}
	if t, ok := l.last[kind]; ok && now.Sub(t) < logEvery {
		l.mu.Unlock()
		return
	}
	l.last[kind] = now
	l.mu.Unlock()
	l.logf(format, args...)
}
