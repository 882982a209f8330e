// Package apitest gives tests of the API and its clients a real server: a
// port driver that really binds each published port on the host and echoes
// what it receives, and an API server on a unix socket in a test directory.
// It stands in for a forwarder without a child network namespace, so that
// API and CLI tests need neither root nor slirp4netns.
package apitest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/api"
)

// EchoDriver is a libport.Driver that listens on each spec's parent address
// and echoes: TCP connections byte for byte, UDP datagrams back to their
// sender. The child side of a spec is ignored.
type EchoDriver struct {
	mu    sync.Mutex
	ports map[int]*echoPort
}

type echoPort struct {
	closer io.Closer
	conns  sync.WaitGroup
	mu     sync.Mutex
	open   map[net.Conn]bool
}

// NewEchoDriver returns a driver with no ports.
func NewEchoDriver() *EchoDriver { return &EchoDriver{ports: map[int]*echoPort{}} }

// Info names the driver "echo" with every protocol.
func (d *EchoDriver) Info() libport.DriverInfo {
	return libport.DriverInfo{Driver: "echo", Protos: append([]string(nil), libport.Protos...)}
}

// Add listens on spec's parent address; a taken address is a real EADDRINUSE.
func (d *EchoDriver) Add(_ context.Context, id int, spec libport.Spec) error {
	addr := net.JoinHostPort(spec.ParentIP, strconv.Itoa(spec.ParentPort))
	p := &echoPort{open: map[net.Conn]bool{}}
	if spec.Transport() == "tcp" {
		l, err := net.Listen(spec.Proto, addr)
		if err != nil {
			return err
		}
		p.closer = l
		go p.serveTCP(l)
	} else {
		c, err := net.ListenPacket(spec.Proto, addr)
		if err != nil {
			return err
		}
		p.closer = c
		go serveUDP(c)
	}
	d.mu.Lock()
	d.ports[id] = p
	d.mu.Unlock()
	return nil
}

func (p *echoPort) serveTCP(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.open[c] = true
		p.mu.Unlock()
		p.conns.Add(1)
		go func() {
			defer p.conns.Done()
			io.Copy(c, c)
			c.Close()
			p.mu.Lock()
			delete(p.open, c)
			p.mu.Unlock()
		}()
	}
}

func serveUDP(c net.PacketConn) {
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		c.WriteTo(buf[:n], from)
	}
}

// Remove closes the port's listener and its connections.
func (d *EchoDriver) Remove(_ context.Context, id int) error {
	d.mu.Lock()
	p, ok := d.ports[id]
	delete(d.ports, id)
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("echo driver: unknown id: %d", id)
	}
	p.close()
	return nil
}

func (p *echoPort) close() {
	p.closer.Close()
	p.mu.Lock()
	for c := range p.open {
		c.Close()
	}
	p.mu.Unlock()
	p.conns.Wait()
}

// Ports returns the IDs the driver forwards now.
func (d *EchoDriver) Ports() []int {
	d.mu.Lock()
	defer d.mu.Unlock()
	var ids []int
	for id := range d.ports {
		ids = append(ids, id)
	}
	return ids
}

// Close removes every port.
func (d *EchoDriver) Close() error {
	d.mu.Lock()
	ports := d.ports
	d.ports = map[int]*echoPort{}
	d.mu.Unlock()
	for _, p := range ports {
		p.close()
	}
	return nil
}

// Serve serves h on a socket at socketPath until the test ends. The socket
// is handed to the owner of its directory, so a test running as root can let
// an unprivileged user's client (rootlessctl, portkit) connect.
func Serve(t testing.TB, socketPath string, h http.Handler) {
	t.Helper()
	l, err := api.Listen(socketPath)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Dir(socketPath))
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if int(st.Uid) != os.Geteuid() {
		if err := os.Chown(socketPath, int(st.Uid), int(st.Gid)); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- api.ServeListener(ctx, l, h) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("API server: %v", err)
		}
	})
}

// NewTable returns a table over d that is closed when the test ends.
func NewTable(t testing.TB, d libport.Driver) *libport.Table {
	table := libport.NewTable(d)
	t.Cleanup(func() { table.Close() })
	return table
}
