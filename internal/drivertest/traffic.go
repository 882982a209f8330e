package drivertest

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"
)

// ServeTCP answers each line a client sends with "<client IP the server
// sees> <line>". The client speaks first: pasta's tap path stalls
// connections where the server speaks first.
func ServeTCP(t testing.TB, l net.Listener) {
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				seen := c.RemoteAddr().(*net.TCPAddr).IP
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if _, err := fmt.Fprintf(c, "%s %s", seen, line); err != nil {
						return
					}
				}
			}()
		}
	}()
}

// ServeUDP answers each datagram with "<client IP the server sees>
// <datagram>", and reports each client IP it sees on the returned channel
// (when there is room), so a test can tell a lost request from a lost reply.
func ServeUDP(t testing.TB, c net.PacketConn) <-chan string {
	seen := make(chan string, 64)
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			ip := from.(*net.UDPAddr).IP.String()
			select {
			case seen <- ip:
			default:
			}
			_, _ = c.WriteTo([]byte(fmt.Sprintf("%s %s", ip, buf[:n])), from)
		}
	}()
	return seen
}

// TCPRoundTrip dials addr with dial, sends two lines and returns the client
// IP the server reported, after checking both echoes.
func TCPRoundTrip(dial func(network, addr string) (net.Conn, error), network, addr string) (string, error) {
	c, err := dial(network, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	var seen string
	for _, msg := range []string{"ping", "pong"} {
		if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
			return "", err
		}
		line, err := r.ReadString('\n')
		if err != nil {
			return "", fmt.Errorf("read reply to %q: %w", msg, err)
		}
		ip, got, _ := strings.Cut(strings.TrimSpace(line), " ")
		if got != msg {
			return "", fmt.Errorf("reply %q to %q", line, msg)
		}
		seen = ip
	}
	return seen, nil
}

// UDPRoundTrip sends a datagram from c to to (retrying: UDP may be lost) and
// returns the client IP the server reported.
func UDPRoundTrip(c net.PacketConn, to net.Addr) (string, error) {
	buf := make([]byte, 2048)
	for i := 0; i < 10; i++ {
		if _, err := c.WriteTo([]byte("ping"), to); err != nil {
			return "", err
		}
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		n, _, err := c.ReadFrom(buf)
		if err != nil {
			continue
		}
		seen, msg, _ := strings.Cut(string(buf[:n]), " ")
		if msg != "ping" {
			return "", fmt.Errorf("udp reply %q", buf[:n])
		}
		return seen, nil
	}
	return "", errors.New("no UDP reply after 10 tries")
}

// FreePort returns a port free for both TCP and UDP on every address right now.
func FreePort(t testing.TB) int {
	t.Helper()
	for i := 0; i < 50; i++ {
		l, err := net.Listen("tcp", ":0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", fmt.Sprintf(":%d", port))
		l.Close()
		if err == nil {
			u.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}
