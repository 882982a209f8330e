package builtin

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
)

// serveUDP answers every datagram with "reply to <sender>: <payload>".
func serveUDP(c net.PacketConn) {
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			c.WriteTo(fmt.Appendf(nil, "reply to %s: %s", from, buf[:n]), from)
		}
	}()
}

// udpAsk sends msg from c to addr and returns the reply.
func udpAsk(c net.PacketConn, addr net.Addr, msg string) (string, error) {
	buf := make([]byte, 65536)
	for try := 0; try < 5; try++ {
		if _, err := c.WriteTo([]byte(msg), addr); err != nil {
			return "", err
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		n, _, err := c.ReadFrom(buf)
		if err == nil {
			return string(buf[:n]), nil
		}
		if !isTimeout(err) {
			return "", err
		}
	}
	return "", fmt.Errorf("no reply from %s to %q", addr, msg)
}

func TestUDPRequestReply1000Clients(t *testing.T) {
	d, n := setup(t, Options{})
	cases := []struct {
		proto, serverNet, serverAddr, clientNet, host string
	}{
		{"udp4", "udp4", "127.0.0.1:0", "udp4", "127.0.0.1"},
		{"udp6", "udp6", "[::1]:0", "udp6", "::1"},
		{"udp", "udp4", "127.0.0.1:0", "udp6", "::1"},
	}
	for _, c := range cases {
		t.Run(c.proto, func(t *testing.T) {
			server := testenv.ListenPacket(t, n.Path, c.serverNet, c.serverAddr)
			serveUDP(server)
			spec, _ := publish(t, d, libport.Spec{Proto: c.proto, ChildPort: childPort(server.LocalAddr())})
			addr, err := net.ResolveUDPAddr(c.clientNet, hostPort(c.host, spec.ParentPort))
			if err != nil {
				t.Fatal(err)
			}
			const clients = 1000
			var wg sync.WaitGroup
			errs := make(chan error, clients)
			sem := make(chan struct{}, 64)
			for i := 0; i < clients; i++ {
				wg.Add(1)
				sem <- struct{}{}
				go func() {
					defer wg.Done()
					defer func() { <-sem }()
					pc, err := net.ListenPacket(c.clientNet, hostPort(c.host, 0))
					if err != nil {
						errs <- err
						return
					}
					defer pc.Close()
					msg := fmt.Sprintf("client %d", i)
					got, err := udpAsk(pc, addr, msg)
					if err != nil {
						errs <- err
						return
					}
					// Without source IP the service sees the flow's own
					// socket; what matters is that each client got its reply.
					if want := ": " + msg; len(got) < len(want) || got[len(got)-len(want):] != want {
						errs <- fmt.Errorf("client %d got %q", i, got)
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
		})
	}
}

func TestUDPFlowLimitEvictsLeastRecentlyUsed(t *testing.T) {
	d, n := setup(t, Options{UDPMaxFlows: 8})
	server := testenv.ListenPacket(t, n.Path, "udp4", "127.0.0.1:0")
	serveUDP(server)
	spec, id := publish(t, d, libport.Spec{Proto: "udp4", ChildPort: childPort(server.LocalAddr())})
	addr, _ := net.ResolveUDPAddr("udp4", hostPort("127.0.0.1", spec.ParentPort))
	var clients []net.PacketConn
	for i := 0; i < 12; i++ {
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		clients = append(clients, pc)
		if _, err := udpAsk(pc, addr, "hi"); err != nil {
			t.Fatal(err)
		}
		// Keep the first client recent: it must survive the evictions.
		if i > 0 {
			if _, err := udpAsk(clients[0], addr, "still here"); err != nil {
				t.Fatal(err)
			}
		}
	}
	p := d.ports[id].(*udpPort)
	if got := p.flowCount(); got != 8 {
		t.Fatalf("%d flows at a limit of 8", got)
	}
	p.mu.Lock()
	_, first := p.flows[clients[0].LocalAddr().(*net.UDPAddr).AddrPort()]
	_, second := p.flows[clients[1].LocalAddr().(*net.UDPAddr).AddrPort()]
	p.mu.Unlock()
	if !first || second {
		t.Fatalf("after evictions: recently used client kept %v (want true), oldest kept %v (want false)", first, second)
	}
	// An evicted client simply gets a new flow.
	if _, err := udpAsk(clients[1], addr, "back"); err != nil {
		t.Fatal(err)
	}
}

func TestUDPIdleFlowsEnd(t *testing.T) {
	d, n := setup(t, Options{UDPIdleTimeout: 200 * time.Millisecond})
	server := testenv.ListenPacket(t, n.Path, "udp4", "127.0.0.1:0")
	serveUDP(server)
	spec, id := publish(t, d, libport.Spec{Proto: "udp4", ChildPort: childPort(server.LocalAddr())})
	addr, _ := net.ResolveUDPAddr("udp4", hostPort("127.0.0.1", spec.ParentPort))
	for i := 0; i < 5; i++ {
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		if _, err := udpAsk(pc, addr, "hi"); err != nil {
			t.Fatal(err)
		}
	}
	p := d.ports[id].(*udpPort)
	if got := p.flowCount(); got != 5 {
		t.Fatalf("%d flows, want 5", got)
	}
	deadline := time.Now().Add(3 * time.Second)
	for p.flowCount() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d flows still open after the idle timeout", p.flowCount())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestUDPLargeDatagram(t *testing.T) {
	d, n := setup(t, Options{})
	server := testenv.ListenPacket(t, n.Path, "udp4", "127.0.0.1:0")
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := server.ReadFrom(buf)
			if err != nil {
				return
			}
			server.WriteTo(buf[:n], from)
		}
	}()
	spec, _ := publish(t, d, libport.Spec{Proto: "udp4", ChildPort: childPort(server.LocalAddr())})
	addr, _ := net.ResolveUDPAddr("udp4", hostPort("127.0.0.1", spec.ParentPort))
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	big := make([]byte, 65507)
	for i := range big {
		big[i] = byte(i * 7)
	}
	got, err := udpAsk(pc, addr, string(big))
	if err != nil {
		t.Fatal(err)
	}
	if got != string(big) {
		t.Fatalf("a %d-byte datagram came back as %d bytes", len(big), len(got))
	}
}

func TestUDPRemoveEndsFlows(t *testing.T) {
	d, n := setup(t, Options{})
	server := testenv.ListenPacket(t, n.Path, "udp4", "127.0.0.1:0")
	serveUDP(server)
	spec, id := publish(t, d, libport.Spec{Proto: "udp4", ChildPort: childPort(server.LocalAddr())})
	addr, _ := net.ResolveUDPAddr("udp4", hostPort("127.0.0.1", spec.ParentPort))
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if _, err := udpAsk(pc, addr, "hi"); err != nil {
		t.Fatal(err)
	}
	if err := d.Remove(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	// The port is free again at once.
	c, err := net.ListenPacket("udp4", addr.String())
	if err != nil {
		t.Fatalf("port still taken after remove: %v", err)
	}
	c.Close()
}

// TestUDPBurstKeepsDatagramBoundaries: a burst from one client goes into the
// child as one GSO send where it can; the service must still get every
// datagram whole and separate.
func TestUDPBurstKeepsDatagramBoundaries(t *testing.T) {
	d, n := setup(t, Options{})
	srv := testenv.ListenPacket(t, n.Path, "udp4", "127.0.0.1:0")
	spec, _ := publish(t, d, libport.Spec{Proto: "udp4", ChildPort: childPort(srv.LocalAddr())})
	c, err := net.Dial("udp4", hostPort("127.0.0.1", spec.ParentPort))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const count, size = 400, 1000
	sizeOf := func(i int) int {
		if i%16 == 15 {
			return size / 2 // a short one ends many runs
		}
		return size
	}
	got := make(chan []int, 1)
	go func() {
		var bad []int
		seen := 0
		buf := make([]byte, 2*size)
		for seen < count {
			srv.SetReadDeadline(time.Now().Add(2 * time.Second))
			m, _, err := srv.ReadFrom(buf)
			if err != nil {
				break
			}
			seen++
			i := int(buf[0]) | int(buf[1])<<8
			if m != sizeOf(i) || !bytes.Equal(buf[2:m], bytes.Repeat([]byte{byte(i)}, m-2)) {
				bad = append(bad, i)
			}
		}
		got <- append(bad, -seen)
	}()
	gso0 := gsoSends.Load()
	for i := range count {
		msg := bytes.Repeat([]byte{byte(i)}, sizeOf(i))
		msg[0], msg[1] = byte(i), byte(i>>8)
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if i%32 == 31 {
			time.Sleep(2 * time.Millisecond) // let the service keep up: loss is not what this tests
		}
	}
	res := <-got
	seen := -res[len(res)-1]
	if bad := res[:len(res)-1]; len(bad) > 0 {
		t.Errorf("datagrams %v arrived with a wrong size or content", bad)
	}
	if seen < count*9/10 {
		t.Errorf("the service got %d of %d datagrams", seen, count)
	}
	t.Logf("%d of %d datagrams, %d GSO sends", seen, count, gsoSends.Load()-gso0)
}
