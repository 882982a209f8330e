// Package netns gives a process sockets inside a network namespace it may not
// be able to enter. A rootless forwarder cannot setns into a netns owned by a
// user namespace it made, so sockets come from a long-lived helper inside the
// child's user+net namespaces; a process that may enter (root, or one already
// inside the owning user namespace) makes them itself with setns.
package netns

import (
	"os"

	"golang.org/x/sys/unix"
)

// SocketSource makes sockets in one target network namespace.
type SocketSource interface {
	// Socket returns a new socket made in the target netns: a close-on-exec,
	// non-blocking fd that the caller owns.
	Socket(domain, typ, proto int) (int, error)
	// Sysctl writes value to /proc/sys/KEY as the target netns sees it,
	// e.g. Sysctl("net/ipv4/tcp_fwmark_accept", "1").
	Sysctl(key, value string) error
	// Close releases the source and stops its helper, if any.
	Close() error
}

// OwnerUserns opens the user namespace that owns the network namespace at
// path (NS_GET_USERNS), so a helper can join both.
func OwnerUserns(path string) (*os.File, error) {
	ns, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	fd, err := unix.IoctlRetInt(int(ns.Fd()), unix.NS_GET_USERNS)
	if err != nil {
		return nil, &os.PathError{Op: "NS_GET_USERNS", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), "userns of "+path), nil
}
