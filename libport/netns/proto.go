package netns

// What passes between the parent and the helper over their SOCK_SEQPACKET
// socketpair. One packet is one message, so there is no framing. Both ends
// are the same binary, so integers travel in native byte order.

import (
	"encoding/binary"
	"fmt"
)

const (
	opHello  = 1 // reply with no fds: the helper is up inside the namespaces
	opSocket = 2 // make count sockets of (domain, typ, proto)
	opSysctl = 3 // payload is key NUL value: write value to /proc/sys/key
)

const (
	requestHeaderLen = 24
	replyLen         = 12
	maxPayload       = 4096 // bounds a sysctl key and value
	maxBatch         = 128  // fds per reply; SCM_RIGHTS takes at most 253
)

// request is a message from the parent to the helper.
type request struct {
	op                 uint8
	id                 uint32
	domain, typ, proto int32
	count              uint32
	payload            []byte
}

func (r *request) marshal() []byte {
	b := make([]byte, requestHeaderLen+len(r.payload))
	b[0] = r.op
	binary.NativeEndian.PutUint32(b[4:], r.id)
	binary.NativeEndian.PutUint32(b[8:], uint32(r.domain))
	binary.NativeEndian.PutUint32(b[12:], uint32(r.typ))
	binary.NativeEndian.PutUint32(b[16:], uint32(r.proto))
	binary.NativeEndian.PutUint32(b[20:], r.count)
	copy(b[requestHeaderLen:], r.payload)
	return b
}

func parseRequest(b []byte) (request, error) {
	if len(b) < requestHeaderLen || len(b) > requestHeaderLen+maxPayload {
		return request{}, fmt.Errorf("request of %d bytes", len(b))
	}
	return request{
		op:      b[0],
		id:      binary.NativeEndian.Uint32(b[4:]),
		domain:  int32(binary.NativeEndian.Uint32(b[8:])),
		typ:     int32(binary.NativeEndian.Uint32(b[12:])),
		proto:   int32(binary.NativeEndian.Uint32(b[16:])),
		count:   binary.NativeEndian.Uint32(b[20:]),
		payload: b[requestHeaderLen:],
	}, nil
}

// reply answers the request with the same id. errno is the error that
// stopped the helper (0 if none); nfds sockets ride along as SCM_RIGHTS,
// possibly fewer than asked for when errno is set.
type reply struct {
	id    uint32
	errno int32
	nfds  uint32
}

func (r *reply) marshal() []byte {
	b := make([]byte, replyLen)
	binary.NativeEndian.PutUint32(b[0:], r.id)
	binary.NativeEndian.PutUint32(b[4:], uint32(r.errno))
	binary.NativeEndian.PutUint32(b[8:], r.nfds)
	return b
}

func parseReply(b []byte) (reply, error) {
	if len(b) != replyLen {
		return reply{}, fmt.Errorf("reply of %d bytes, want %d", len(b), replyLen)
	}
	return reply{
		id:    binary.NativeEndian.Uint32(b[0:]),
		errno: int32(binary.NativeEndian.Uint32(b[4:])),
		nfds:  binary.NativeEndian.Uint32(b[8:]),
	}, nil
}
