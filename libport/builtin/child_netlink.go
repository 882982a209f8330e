package builtin

// Child side: a minimal rtnetlink client over a NETLINK_ROUTE socket made in
// the child netns. It only adds and deletes policy rules and routes, one
// acknowledged request at a time. (vishvananda/netlink's Handle cannot adopt
// a socket made elsewhere, and the few messages we need are short.)

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport/netns"
)

// netlinkTimeout bounds one request: the kernel answers at once or never.
const netlinkTimeout = 5 * time.Second

// loopbackIfindex is lo's index in every network namespace.
const loopbackIfindex = 1

type rtnl struct {
	f   *os.File
	rc  syscall.RawConn
	seq uint32
	buf []byte
}

// openRtnl makes a NETLINK_ROUTE socket in the child netns.
func openRtnl(src netns.SocketSource) (*rtnl, error) {
	fd, err := src.Socket(unix.AF_NETLINK, unix.SOCK_RAW, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket in the child netns: %w", err)
	}
	f := os.NewFile(uintptr(fd), "child netlink")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &rtnl{f: f, rc: rc, buf: make([]byte, 16<<10)}, nil
}

func (n *rtnl) close() error { return n.f.Close() }

// request sends one message and waits for its acknowledgement; the errno
// the kernel acknowledges with is returned as is (nil for success).
func (n *rtnl) request(typ, flags uint16, body []byte) error {
	n.seq++
	seq := n.seq
	msg := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	msg = append(msg, body...)
	ne := binary.NativeEndian
	ne.PutUint32(msg[0:], uint32(len(msg)))
	ne.PutUint16(msg[4:], typ)
	ne.PutUint16(msg[6:], flags|unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	ne.PutUint32(msg[8:], seq)
	ne.PutUint32(msg[12:], 0)

	if err := n.f.SetDeadline(time.Now().Add(netlinkTimeout)); err != nil {
		return err
	}
	var serr error
	if err := n.rc.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		return serr != unix.EAGAIN
	}); err != nil {
		return fmt.Errorf("netlink send: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("netlink send: %w", serr)
	}
	for {
		var got int
		var rerr error
		if err := n.rc.Read(func(fd uintptr) bool {
			got, _, rerr = unix.Recvfrom(int(fd), n.buf, 0)
			return rerr != unix.EAGAIN
		}); err != nil {
			return fmt.Errorf("netlink receive: %w", err)
		}
		if rerr != nil {
			return fmt.Errorf("netlink receive: %w", rerr)
		}
		msgs, err := syscall.ParseNetlinkMessage(n.buf[:got])
		if err != nil {
			return fmt.Errorf("netlink receive: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != seq || m.Header.Type != unix.NLMSG_ERROR {
				continue
			}
			if len(m.Data) < 4 {
				return fmt.Errorf("netlink: short acknowledgement")
			}
			if code := int32(ne.Uint32(m.Data)); code != 0 {
				return unix.Errno(-code)
			}
			return nil
		}
	}
}

// attrs builds rtattr lists.
type attrs []byte

func (a *attrs) add(typ uint16, data []byte) {
	l := unix.SizeofRtAttr + len(data)
	var hdr [4]byte
	binary.NativeEndian.PutUint16(hdr[0:], uint16(l))
	binary.NativeEndian.PutUint16(hdr[2:], typ)
	*a = append(*a, hdr[:]...)
	*a = append(*a, data...)
	for len(*a)%4 != 0 {
		*a = append(*a, 0)
	}
}

func (a *attrs) u32(typ uint16, v uint32) {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	a.add(typ, b[:])
}

// rule is a policy routing rule: "[iif lo ipproto udp sport P] [fwmark M] lookup T".
type rule struct {
	family   int
	priority uint32
	table    uint32
	fwmark   uint32 // 0: none
	udpSport uint16 // 0: none; else "iif lo ipproto udp sport P"
}

func (r rule) message() []byte {
	// struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action; u32 flags
	hdr := []byte{byte(r.family), 0, 0, 0, unix.RT_TABLE_UNSPEC, 0, 0, unix.FR_ACT_TO_TBL, 0, 0, 0, 0}
	a := attrs(hdr)
	a.u32(unix.FRA_PRIORITY, r.priority)
	a.u32(unix.FRA_TABLE, r.table)
	if r.fwmark != 0 {
		a.u32(unix.FRA_FWMARK, r.fwmark)
		a.u32(unix.FRA_FWMASK, 0xffffffff)
	}
	if r.udpSport != 0 {
		a.add(unix.FRA_IIFNAME, []byte("lo\x00"))
		a.add(unix.FRA_IP_PROTO, []byte{unix.IPPROTO_UDP})
		var pr [4]byte // struct fib_rule_port_range {u16 start, end}, host order
		binary.NativeEndian.PutUint16(pr[0:], r.udpSport)
		binary.NativeEndian.PutUint16(pr[2:], r.udpSport)
		a.add(unix.FRA_SPORT_RANGE, pr[:])
	}
	return a
}

// localRoute is "local default dev lo table T [src S]": every destination is
// this host, as far as lookups that reach table T go.
type localRoute struct {
	family  int
	table   uint32
	prefsrc netip.Addr // zero: none
}

func (r localRoute) message() []byte {
	// struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type; u32 flags
	hdr := []byte{byte(r.family), 0, 0, 0, unix.RT_TABLE_UNSPEC, unix.RTPROT_BOOT, unix.RT_SCOPE_HOST, unix.RTN_LOCAL, 0, 0, 0, 0}
	a := attrs(hdr)
	a.u32(unix.RTA_TABLE, r.table)
	a.u32(unix.RTA_OIF, loopbackIfindex)
	if r.prefsrc.IsValid() {
		a.add(unix.RTA_PREFSRC, r.prefsrc.AsSlice())
	}
	return a
}

// addRule adds r; an identical rule already there is success.
func (n *rtnl) addRule(r rule) error {
	err := n.request(unix.RTM_NEWRULE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, r.message())
	if err == unix.EEXIST {
		return nil
	}
	return err
}

// delRule deletes r; a rule already gone is success.
func (n *rtnl) delRule(r rule) error {
	err := n.request(unix.RTM_DELRULE, 0, r.message())
	if err == unix.ENOENT {
		return nil
	}
	return err
}

// addRoute adds r; the same route already there is success.
func (n *rtnl) addRoute(r localRoute) error {
	err := n.request(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_EXCL, r.message())
	if err == unix.EEXIST {
		return nil
	}
	return err
}
