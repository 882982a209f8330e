package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"strings"
)

// serveEnv makes the bench binary act as the request/reply server instead of
// the bench: it is re-executed inside a child netns through nsenter, as the
// unprivileged user. Value: "tcp=ADDR,udp=ADDR".
const serveEnv = "PORTKIT_BENCH_SERVE"

// msgSize is the request and the reply of one exchange: small, so the figure
// is the cost of the connection or the datagram, not of the copy.
const msgSize = 32

func serve(spec string) error {
	errc := make(chan error, 2)
	n := 0
	for _, part := range strings.Split(spec, ",") {
		proto, addr, ok := strings.Cut(part, "=")
		if !ok {
			return fmt.Errorf("%s=%q: want tcp=ADDR,udp=ADDR", serveEnv, spec)
		}
		switch proto {
		case "tcp":
			l, err := net.Listen("tcp", addr)
			if err != nil {
				return err
			}
			go func() { errc <- serveTCP(l) }()
		case "udp":
			c, err := net.ListenPacket("udp", addr)
			if err != nil {
				return err
			}
			go func() { errc <- serveUDP(c) }()
		default:
			return fmt.Errorf("%s: unknown protocol %q", serveEnv, proto)
		}
		n++
	}
	if n == 0 {
		return fmt.Errorf("%s is empty", serveEnv)
	}
	return <-errc
}

// serveTCP answers each request with a reply, then waits for the client to
// close (idle connections stay open until it does).
func serveTCP(l net.Listener) error {
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			buf := make([]byte, msgSize)
			for {
				if _, err := io.ReadFull(c, buf); err != nil {
					return
				}
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}()
	}
}

func serveUDP(c net.PacketConn) error {
	buf := make([]byte, 2048)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return err
		}
		_, _ = c.WriteTo(buf[:n], from)
	}
}

func serveMain() {
	if err := serve(os.Getenv(serveEnv)); err != nil {
		fmt.Fprintf(os.Stderr, "portkit-bench server: %v\n", err)
		os.Exit(1)
	}
}
