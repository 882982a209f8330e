// Command echod is the server tests run inside containers and namespaces:
// it answers every TCP line and every UDP datagram with the client's address
// as the server sees it, a space, and what the client sent. It is built
// static so it runs in a busybox rootfs.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"strings"
)

func main() {
	var tcp, udp multi
	flag.Var(&tcp, "tcp", "TCP address to serve (repeatable), e.g. :8080 or [::]:8080")
	flag.Var(&udp, "udp", "UDP address to serve (repeatable)")
	flag.Parse()
	if len(tcp)+len(udp) == 0 {
		fmt.Fprintln(os.Stderr, "usage: echod [-tcp ADDR]... [-udp ADDR]...")
		os.Exit(2)
	}
	for _, a := range tcp {
		l, err := net.Listen("tcp", a)
		if err != nil {
			log.Fatal(err)
		}
		go serveTCP(l)
	}
	for _, a := range udp {
		c, err := net.ListenPacket("udp", a)
		if err != nil {
			log.Fatal(err)
		}
		go serveUDP(c)
	}
	fmt.Println("ready")
	select {}
}

func serveTCP(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go func() {
			defer c.Close()
			r := bufio.NewScanner(c)
			for r.Scan() {
				if _, err := fmt.Fprintf(c, "%s %s\n", c.RemoteAddr(), r.Text()); err != nil {
					return
				}
			}
		}()
	}
}

func serveUDP(c net.PacketConn) {
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			log.Fatal(err)
		}
		reply := from.String() + " " + strings.TrimRight(string(buf[:n]), "\n")
		_, _ = c.WriteTo([]byte(reply), from)
	}
}

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }
