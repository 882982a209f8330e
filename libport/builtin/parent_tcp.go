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
	"os"
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
	ln    *net.TCPListener

	mu      sync.Mutex
	conns   map[*tcpConn]struct{}
	closing bool
	wg      sync.WaitGroup // the accept loop and every connection

	warn logLimiter
}

// addTCP listens for spec in the parent netns and starts accepting. Go
// listens with the backlog the machine allows (net.core.somaxconn).
func (d *Driver) addTCP(spec libport.Spec, child netip.AddrPort) (port, error) {
	if d.opts.SourceIP.TCP() {
		d.routing.enableTCP()
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
	p := &tcpPort{d: d, spec: spec, child: child, ln: l.(*net.TCPListener), conns: map[*tcpConn]struct{}{}}
	p.warn.logf = d.opts.Logf
	p.wg.Add(1)
	go p.accept()
	return p, nil
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
	} {
		if err := unix.SetsockoptInt(fd, o.level, o.opt, o.v); err != nil {
			return fmt.Errorf("keep-alive on the listener: %w", err)
		}
	}
	return nil
}

func (p *tcpPort) accept() {
	defer p.wg.Done()
	var backoff time.Duration
	for {
		c, err := p.ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of fds or memory: wait a little and keep serving, as
			// net/http does; the port must not die of a passing shortage.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			p.warn.printf("accept", "builtin: port %s: accept: %v", p.spec, err)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		conn := &tcpConn{port: p, parent: c}
		if !p.track(conn) {
			conn.close(true)
			continue
		}
		go conn.serve()
	}
}

// track registers c so that closing the port closes it; false when the port
// is already closing.
func (p *tcpPort) track(c *tcpConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closing {
		return false
	}
	p.conns[c] = struct{}{}
	p.wg.Add(1)
	return true
}

func (p *tcpPort) forget(c *tcpConn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	p.wg.Done()
}

// close stops the listener, resets every connection and waits for them.
func (p *tcpPort) close() {
	p.mu.Lock()
	p.closing = true
	conns := make([]*tcpConn, 0, len(p.conns))
	for c := range p.conns {
		conns = append(conns, c)
	}
	p.mu.Unlock()
	p.ln.Close()
	for _, c := range conns {
		c.close(true)
	}
	p.wg.Wait()
}

// dial makes the child side of a connection from client, transparent when
// source IP is on and the client's address can be used in the child. The
// socket is c's from before the connect completes.
func (p *tcpPort) dial(c *tcpConn, client netip.AddrPort) (*os.File, error) {
	d := p.d
	if d.opts.SourceIP.TCP() && canBeTransparent(client, p.child) && d.routing.tcpReady(client.Addr().Is4()) {
		f, err := dialTCP(d.src, p.child, client, tcpMark, c.setChild)
		var terr *transparentError
		if !errors.As(err, &terr) {
			return f, err
		}
		p.warn.printf("transparent", "builtin: port %s: dialing from the child's own address instead: %v", p.spec, err)
	}
	return dialTCP(d.src, p.child, netip.AddrPort{}, 0, c.setChild)
}

// tcpConn is one proxied connection: parent is the client's connection in
// the host netns, child ours to the service in the child netns.
type tcpConn struct {
	port   *tcpPort
	parent *net.TCPConn

	mu     sync.Mutex
	child  *os.File
	closed bool
}

func (c *tcpConn) serve() {
	defer c.port.forget(c)
	client := c.parent.RemoteAddr().(*net.TCPAddr).AddrPort()
	client = netip.AddrPortFrom(client.Addr().Unmap().WithZone(""), client.Port())
	child, err := c.port.dial(c, client)
	if err != nil {
		// The client learns at once, as it would from the service itself.
		c.close(true)
		if !errors.Is(err, unix.ECONNREFUSED) {
			c.port.warn.printf("dial", "builtin: port %s: %v", c.port.spec, err)
		}
		return
	}
	prc, err1 := c.parent.SyscallConn()
	crc, err2 := child.SyscallConn()
	if err1 != nil || err2 != nil {
		c.close(true)
		return
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		end, _ := pump(crc, prc)
		c.ended(end, prc)
	}()
	end, _ := pump(prc, crc)
	c.ended(end, crc)
	<-done
	c.close(false)
}

// setChild records the child socket (a fallback dial replaces a failed
// one); false when the connection was closed meanwhile.
func (c *tcpConn) setChild(f *os.File) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	c.child = f
	return true
}

// ended acts on how the direction writing to dst ended: a FIN passes on as
// a half-close (the other direction keeps going); a failure on either side
// resets both.
func (c *tcpConn) ended(end pumpEnd, dst syscall.RawConn) {
	switch end {
	case endEOF:
		shutdownWrite(dst)
	case endReadErr, endWriteErr:
		c.close(true)
	}
}

// close closes both sockets, with RST instead of FIN when reset is set.
func (c *tcpConn) close(reset bool) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	child := c.child
	c.mu.Unlock()
	if reset {
		_ = c.parent.SetLinger(0)
		if child != nil {
			if rc, err := child.SyscallConn(); err == nil {
				setResetOnClose(rc)
			}
		}
	}
	c.parent.Close()
	if child != nil {
		child.Close()
	}
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
