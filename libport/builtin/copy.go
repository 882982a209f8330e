package builtin

// The copy engine: one direction of a proxied TCP connection. It runs the
// same on either side's sockets (they are all plain fds in the poller), so it
// knows nothing of namespaces.

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// pumpEnd says how one direction of a connection ended.
type pumpEnd int

const (
	// endEOF: the source sent FIN and everything before it was delivered.
	endEOF pumpEnd = iota
	// endReadErr: reading the source failed (it was reset).
	endReadErr
	// endWriteErr: writing the destination failed (it was reset or closed).
	endWriteErr
	// endClosed: a socket was closed under the pump (port removed, or the
	// other direction aborted the connection).
	endClosed
)

const spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

// pump moves bytes from src to dst until src ends or either fails. It
// splices through a lent pipe (no copy into user space), holding the pipe
// only while bytes are in flight or src keeps delivering: a connection that
// waits for data waits in the poller with no pipe and no buffer. When no
// pipe can be had it copies through a lent buffer instead.
func pump(src, dst syscall.RawConn) (pumpEnd, error) {
	var (
		p    *pipe
		buf  *[]byte
		n    int // bytes read from src and not yet written to dst
		off  int // where those bytes start in buf
		rerr error
		werr error
	)
	defer func() {
		if p != nil {
			if n > 0 {
				pipes.discard(p) // it still holds bytes nobody will read
			} else {
				pipes.put(p)
			}
		}
		if buf != nil {
			copyBufs.Put(buf)
		}
	}()
	// Each call tries the syscall first: RawConn.Read resets the poller's
	// readiness before calling, so only EAGAIN may lead to a wait.
	fill := func(fd uintptr) bool {
		for {
			if p == nil && buf == nil {
				if p = pipes.get(); p == nil {
					buf = copyBufs.Get().(*[]byte)
				}
			}
			var m int
			if p != nil {
				var m64 int64
				m64, rerr = unix.Splice(int(fd), nil, p.w, nil, pipeSize, spliceFlags)
				m = int(m64)
			} else {
				m, rerr = unix.Read(int(fd), *buf)
			}
			switch rerr {
			case nil:
				n, off = m, 0
				return true
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				// The pipe is empty here (we always drain it first), so it
				// goes back; the wait holds nothing.
				if p != nil {
					pipes.put(p)
					p = nil
				}
				if buf != nil {
					copyBufs.Put(buf)
					buf = nil
				}
				return false
			}
			return true
		}
	}
	drain := func(fd uintptr) bool {
		for n > 0 {
			var m int
			if p != nil {
				var m64 int64
				m64, werr = unix.Splice(p.r, nil, int(fd), nil, n, spliceFlags)
				m = int(m64)
			} else {
				m, werr = unix.Write(int(fd), (*buf)[off:off+n])
			}
			switch werr {
			case nil:
				n -= m
				off += m
			case unix.EINTR:
				werr = nil
			case unix.EAGAIN:
				werr = nil
				return false
			default:
				return true
			}
		}
		return true
	}
	for {
		if err := src.Read(fill); err != nil {
			return endClosed, err
		}
		if rerr != nil {
			return endReadErr, rerr
		}
		if n == 0 {
			return endEOF, nil
		}
		if err := dst.Write(drain); err != nil {
			return endClosed, err
		}
		if werr != nil {
			return endWriteErr, werr
		}
	}
}

// shutdownWrite sends FIN on the socket behind rc, passing a half-close on.
func shutdownWrite(rc syscall.RawConn) {
	_ = rc.Control(func(fd uintptr) { _ = unix.Shutdown(int(fd), unix.SHUT_WR) })
}

// setResetOnClose makes the next close of the socket behind rc send RST
// instead of FIN (SO_LINGER with a zero timeout).
func setResetOnClose(rc syscall.RawConn) {
	_ = rc.Control(func(fd uintptr) {
		_ = unix.SetsockoptLinger(int(fd), unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	})
}
