package builtin

// Child side: every socket here is made in the child netns by the socket
// source and used from the parent. A socket keeps the netns it was made in,
// so binding, connecting and routing all happen as the child sees them.

import (
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport/netns"
)

// transparentError is a failure to make a socket look like the client
// (IP_TRANSPARENT, SO_MARK or the bind to the client's address); the caller
// falls back to a plain socket.
type transparentError struct{ err error }

func (e *transparentError) Error() string { return "source IP: " + e.err.Error() }
func (e *transparentError) Unwrap() error { return e.err }

func domainOf(a netip.Addr) int {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func sockaddrOf(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}

// canBeTransparent reports whether a socket for child may be bound to
// client's address: same family, and an address that means the same thing in
// the child (not loopback, not link-local, whose zone is a parent interface).
func canBeTransparent(client, child netip.AddrPort) bool {
	a := client.Addr()
	return client.IsValid() && a.Is4() == child.Addr().Is4() &&
		!a.IsLoopback() && !a.IsLinkLocalUnicast() && !a.IsUnspecified() && a.Zone() == ""
}

// makeTransparent lets fd use from, an address the child does not own, as its
// source, and marks its packets so that replies to from are delivered locally.
func makeTransparent(fd int, from netip.AddrPort, mark int) error {
	var err error
	if from.Addr().Is4() {
		err = unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_TRANSPARENT, 1)
	} else {
		err = unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
	}
	if err != nil {
		return &transparentError{fmt.Errorf("IP_TRANSPARENT: %w", err)}
	}
	if mark != 0 {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, mark); err != nil {
			return &transparentError{fmt.Errorf("SO_MARK: %w", err)}
		}
	}
	// The client may reuse its port while the child still holds the last
	// connection from it in TIME_WAIT.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return &transparentError{fmt.Errorf("SO_REUSEADDR: %w", err)}
	}
	if err := unix.Bind(fd, sockaddrOf(from)); err != nil {
		return &transparentError{fmt.Errorf("bind %s: %w", from, err)}
	}
	return nil
}

// dialTCP starts connecting a new child-netns socket to to and returns it
// (non-blocking) with the connect under way: the caller's event loop learns
// of its end. With from valid the socket is transparent: bound to the
// client's address and marked with mark.
func dialTCP(src netns.SocketSource, to, from netip.AddrPort, mark int) (int, error) {
	fd, err := src.Socket(domainOf(to.Addr()), unix.SOCK_STREAM, 0)
	if err != nil {
		return -1, fmt.Errorf("socket in the child netns: %w", err)
	}
	// Small requests and replies must not wait for Nagle on our hop.
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	if from.IsValid() {
		if err := makeTransparent(fd, from, mark); err != nil {
			unix.Close(fd)
			return -1, err
		}
	}
	if err := unix.Connect(fd, sockaddrOf(to)); err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		if from.IsValid() && (errors.Is(err, unix.EADDRINUSE) || errors.Is(err, unix.EADDRNOTAVAIL)) {
			return -1, &transparentError{fmt.Errorf("connect %s from %s: %w", to, from, err)}
		}
		return -1, fmt.Errorf("connect %s in the child netns: %w", to, err)
	}
	return fd, nil
}

// udpFlowSocket makes the child side of one UDP flow. A plain flow socket is
// connected to to, so the kernel filters replies for us; a transparent one is
// bound to the client's address from and left unconnected (it sends with
// sendto), because replies come back through the per-port rule as datagrams
// addressed to from.
func udpFlowSocket(src netns.SocketSource, to, from netip.AddrPort) (int, error) {
	fd, err := src.Socket(domainOf(to.Addr()), unix.SOCK_DGRAM, 0)
	if err != nil {
		return -1, fmt.Errorf("socket in the child netns: %w", err)
	}
	if err = unix.SetNonblock(fd, true); err != nil {
		err = fmt.Errorf("non-blocking flow socket in the child netns: %w", err)
	} else if from.IsValid() {
		err = makeTransparent(fd, from, 0)
	} else if err = unix.Connect(fd, sockaddrOf(to)); err != nil {
		err = fmt.Errorf("connect %s in the child netns: %w", to, err)
	}
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}
