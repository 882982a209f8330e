package builtin

// Batched datagram I/O: recvmmsg(2) and sendmmsg(2) on raw fds inside
// RawConn callbacks, so waits happen in Go's poller. (golang.org/x/net's
// ReadBatch allocates a net.Addr per datagram and holds its buffers while it
// waits; here addresses stay raw and a batch is lent only while datagrams are
// in flight, as pipes are for TCP.)

import (
	"encoding/binary"
	"net/netip"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	// batchLen is the most datagrams one system call moves.
	batchLen = 16
	// maxDatagram holds any UDP payload over IPv4 or IPv6 (without jumbograms).
	maxDatagram = 65535
)

// batch is the message vector of one recvmmsg or sendmmsg call.
type batch struct {
	hdrs  [batchLen]unix.Mmsghdr
	iovs  [batchLen]unix.Iovec
	names [batchLen]unix.RawSockaddrInet6 // large enough for either family
	bufs  [batchLen][]byte
}

var batches = sync.Pool{New: func() any {
	b := new(batch)
	mem := make([]byte, batchLen*maxDatagram)
	for i := range b.hdrs {
		b.bufs[i] = mem[i*maxDatagram : (i+1)*maxDatagram : (i+1)*maxDatagram]
		b.iovs[i].Base = &b.bufs[i][0]
		b.hdrs[i].Hdr.Iov = &b.iovs[i]
		b.hdrs[i].Hdr.SetIovlen(1)
	}
	return b
}}

// recv reads up to batchLen datagrams from the non-blocking fd.
func (b *batch) recv(fd int) (int, error) {
	for i := range b.hdrs {
		h := &b.hdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&b.names[i]))
		h.Namelen = unix.SizeofSockaddrInet6
		h.Flags = 0
		b.iovs[i].SetLen(maxDatagram)
		b.hdrs[i].Len = 0
	}
	n, _, e := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&b.hdrs[0])), batchLen, 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// send writes datagrams [from, to) as prepared by the caller (lengths set by
// setLen, addresses by setName or clearName) and returns how many went out.
func (b *batch) send(fd, from, to int) (int, error) {
	n, _, e := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&b.hdrs[from])), uintptr(to-from), unix.MSG_NOSIGNAL, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// sendAll sends [from, to) and drops what the kernel will not take now:
// a datagram proxy must not stall every flow on one full socket.
func (b *batch) sendAll(fd, from, to int) {
	for from < to {
		n, err := b.send(fd, from, to)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.ECONNREFUSED:
			// An ICMP error from an earlier datagram surfaced here; this
			// one was not sent. Try again once the error is consumed.
			continue
		case err != nil:
			// The first datagram cannot go (EAGAIN, EMSGSIZE...): drop it.
			from++
		default:
			from += n
		}
	}
}

// gsoMaxBytes bounds one UDP GSO send (the kernel takes at most 64 KiB
// less headers, and at most 64 segments: batchLen is below that).
const gsoMaxBytes = 65000

// gsoSize reports the segment size if datagrams [from, to) can go as one
// UDP GSO send: at least two, all of one size but the last (no larger), and
// 64 KiB at most in total; 0 otherwise.
func (b *batch) gsoSize(from, to int) int {
	if to-from < 2 {
		return 0
	}
	size := int(b.hdrs[from].Len)
	total := 0
	for k := from; k < to; k++ {
		n := int(b.hdrs[k].Len)
		if n == 0 || n > size || (n != size && k != to-1) {
			return 0
		}
		total += n
	}
	if total > gsoMaxBytes {
		return 0
	}
	return size
}

// sendGSO sends datagrams [from, to) (lengths set by setLen) to name, or on
// a connected socket when name is nil, as one UDP GSO send of segments of
// size bytes: one trip through the stack instead of one per datagram.
func (b *batch) sendGSO(fd, from, to, size int, name *rawAddr) error {
	var oob [24]byte // unix.CmsgSpace(2)
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level = unix.SOL_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	*(*uint16)(unsafe.Pointer(&oob[unix.CmsgLen(0)])) = uint16(size)
	var msg unix.Msghdr
	msg.Iov = &b.iovs[from]
	msg.SetIovlen(to - from)
	msg.Control = &oob[0]
	msg.SetControllen(unix.CmsgSpace(2))
	if name != nil {
		msg.Name = (*byte)(unsafe.Pointer(&name.sa))
		msg.Namelen = name.len
	}
	_, _, e := unix.Syscall(unix.SYS_SENDMSG, uintptr(fd), uintptr(unsafe.Pointer(&msg)), unix.MSG_NOSIGNAL)
	if e != 0 {
		return e
	}
	return nil
}

// size is the length of received datagram i, truncated reports whether it
// did not fit (it cannot, for UDP, but the flag is checked anyway).
func (b *batch) size(i int) (int, bool) {
	return int(b.hdrs[i].Len), b.hdrs[i].Hdr.Flags&unix.MSG_TRUNC != 0
}

// setLen makes datagram i n bytes long for send.
func (b *batch) setLen(i, n int) { b.iovs[i].SetLen(n) }

// clearName sends datagram i on a connected socket.
func (b *batch) clearName(i int) {
	b.hdrs[i].Hdr.Name = nil
	b.hdrs[i].Hdr.Namelen = 0
}

// setName sends datagram i to the raw address n.
func (b *batch) setName(i int, n *rawAddr) {
	b.names[i] = n.sa
	b.hdrs[i].Hdr.Name = (*byte)(unsafe.Pointer(&b.names[i]))
	b.hdrs[i].Hdr.Namelen = n.len
}

// addr is the source address of received datagram i.
func (b *batch) addr(i int) netip.AddrPort {
	return parseRaw(&b.names[i])
}

// rawName is the source address of received datagram i as the kernel gave it.
func (b *batch) rawName(i int) rawAddr {
	return rawAddr{sa: b.names[i], len: b.hdrs[i].Hdr.Namelen}
}

// rawAddr is a socket address in kernel form, ready for sendmmsg.
type rawAddr struct {
	sa  unix.RawSockaddrInet6
	len uint32
}

func parseRaw(sa *unix.RawSockaddrInet6) netip.AddrPort {
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port)
	case unix.AF_INET6:
		port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), port)
	}
	return netip.AddrPort{}
}

// rawOf is ap in kernel form for a socket of family (an IPv4 address sent
// from an IPv6 socket becomes v4-mapped).
func rawOf(ap netip.AddrPort, family int) rawAddr {
	var r rawAddr
	if family == unix.AF_INET {
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(&r.sa))
		sa4.Family = unix.AF_INET
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:], ap.Port())
		sa4.Addr = ap.Addr().As4()
		r.len = unix.SizeofSockaddrInet4
		return r
	}
	r.sa.Family = unix.AF_INET6
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&r.sa.Port))[:], ap.Port())
	r.sa.Addr = ap.Addr().As16()
	r.len = unix.SizeofSockaddrInet6
	return r
}
