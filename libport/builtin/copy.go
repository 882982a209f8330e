package builtin

// The copy engine: one direction of a proxied TCP connection, moved by its
// event loop whenever its source is readable or its destination writable. It
// runs the same on either side's sockets (they are all plain non-blocking
// fds), so it knows nothing of namespaces.

import (
	"golang.org/x/sys/unix"
)

const spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

// half is one direction: bytes from src to dst. It splices through a lent
// pipe (no copy into user space), holding the pipe only while bytes are in
// flight: a connection that waits for data holds no pipe and no buffer.
// When no pipe can be had it copies through a lent buffer instead.
type half struct {
	src, dst int
	p        *pipe
	buf      *[]byte
	n        int  // bytes read from src and not yet written to dst
	off      int  // where those bytes start in buf
	eof      bool // src ended and the end was passed on
}

// move moves bytes until src has none or dst takes no more, passing src's
// end on as a half-close (unless the other direction ended too: the
// connection is then closed whole). false means src or dst failed and the
// connection must be reset.
func (h *half) move(otherEOF bool) bool {
	for !h.eof {
		if h.n == 0 {
			if h.p == nil && h.buf == nil {
				if h.p = pipes.get(); h.p == nil {
					h.buf = copyBufs.Get().(*[]byte)
				}
			}
			var m int
			var err error
			if h.p != nil {
				var m64 int64
				m64, err = unix.Splice(h.src, nil, h.p.w, nil, pipeSize, spliceFlags)
				m = int(m64)
			} else {
				m, err = unix.Read(h.src, *h.buf)
			}
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				// The pipe is empty: it goes back, the wait holds nothing.
				h.release()
				return true
			case err != nil:
				return false
			case m == 0:
				h.release()
				h.eof = true
				if !otherEOF {
					_ = unix.Shutdown(h.dst, unix.SHUT_WR)
				}
				return true
			}
			h.n, h.off = m, 0
		}
		var m int
		var err error
		if h.p != nil {
			var m64 int64
			m64, err = unix.Splice(h.p.r, nil, h.dst, nil, h.n, spliceFlags)
			m = int(m64)
		} else {
			m, err = unix.Write(h.dst, (*h.buf)[h.off:h.off+h.n])
		}
		switch err {
		case nil:
			h.n -= m
			h.off += m
		case unix.EINTR:
		case unix.EAGAIN:
			return true // dst's EPOLLOUT brings us back
		default:
			return false
		}
	}
	return true
}

// release returns the pipe or buffer; a pipe still holding bytes nobody will
// read is closed.
func (h *half) release() {
	if h.p != nil {
		if h.n > 0 {
			pipes.discard(h.p)
		} else {
			pipes.put(h.p)
		}
		h.p = nil
	}
	if h.buf != nil {
		copyBufs.Put(h.buf)
		h.buf = nil
	}
	h.n = 0
}

// resetClose closes a socket with RST instead of FIN (SO_LINGER with a zero
// timeout).
func resetClose(fd int) {
	_ = unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0})
	unix.Close(fd)
}
