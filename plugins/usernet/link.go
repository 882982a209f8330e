package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport/netns"
)

// linkState is what the child netns shows of the interface usernet attached:
// it is read back after ADD (so the result reports what is, not what was
// asked for) and compared with prevResult on CHECK.
type linkState struct {
	Name     string
	Index    int
	MAC      string
	MTU      int
	Up       bool
	Addrs    []net.IPNet // global addresses: no link-local
	Gateways []net.IP    // next hops of default routes out of this link
}

// readLink dumps links, addresses and routes over a NETLINK_ROUTE socket made
// inside the child netns (through the socket source, so it works rootless)
// and returns ifName's state.
func readLink(src netns.SocketSource, ifName string) (*linkState, error) {
	fd, err := src.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket in the child netns: %w", err)
	}
	defer unix.Close(fd)
	// The source hands out non-blocking sockets; a bounded blocking read is simpler here.
	if err := unix.SetNonblock(fd, false); err != nil {
		return nil, err
	}
	tv := unix.NsecToTimeval((5 * time.Second).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("bind netlink socket: %w", err)
	}
	nl := &netlinkConn{fd: fd}

	st := &linkState{}
	links, err := nl.dump(unix.RTM_GETLINK, unix.AF_UNSPEC, unix.SizeofIfInfomsg)
	if err != nil {
		return nil, fmt.Errorf("list links in the child netns: %w", err)
	}
	for _, m := range links {
		if len(m.Data) < unix.SizeofIfInfomsg {
			continue
		}
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return nil, err
		}
		name, mac, mtu := "", "", 0
		for _, a := range attrs {
			switch a.Attr.Type {
			case unix.IFLA_IFNAME:
				name = cString(a.Value)
			case unix.IFLA_ADDRESS:
				mac = net.HardwareAddr(a.Value).String()
			case unix.IFLA_MTU:
				if len(a.Value) >= 4 {
					mtu = int(binary.NativeEndian.Uint32(a.Value))
				}
			}
		}
		if name != ifName {
			continue
		}
		st.Name, st.MAC, st.MTU = name, mac, mtu
		st.Index = int(int32(binary.NativeEndian.Uint32(m.Data[4:8])))
		st.Up = binary.NativeEndian.Uint32(m.Data[8:12])&unix.IFF_UP != 0
	}
	if st.Name == "" {
		return nil, fmt.Errorf("interface %s does not exist in the child netns", ifName)
	}

	addrs, err := nl.dump(unix.RTM_GETADDR, unix.AF_UNSPEC, unix.SizeofIfAddrmsg)
	if err != nil {
		return nil, fmt.Errorf("list addresses in the child netns: %w", err)
	}
	for _, m := range addrs {
		if len(m.Data) < unix.SizeofIfAddrmsg {
			continue
		}
		family, prefix, flags := m.Data[0], int(m.Data[1]), uint32(m.Data[2])
		if int(binary.NativeEndian.Uint32(m.Data[4:8])) != st.Index {
			continue
		}
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return nil, err
		}
		for _, a := range attrs {
			if a.Attr.Type == unix.IFA_FLAGS && len(a.Value) >= 4 {
				flags = binary.NativeEndian.Uint32(a.Value)
			}
		}
		// A tentative address (IPv6 duplicate address detection still running)
		// cannot carry traffic yet; it is not reported until it can.
		if flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) != 0 {
			continue
		}
		for _, a := range attrs {
			// IFA_LOCAL is the address on point-to-point links; IFA_ADDRESS elsewhere.
			if a.Attr.Type != unix.IFA_ADDRESS && a.Attr.Type != unix.IFA_LOCAL {
				continue
			}
			ip := net.IP(append([]byte(nil), a.Value...))
			if ip.IsLinkLocalUnicast() {
				continue
			}
			bits := 32
			if family == unix.AF_INET6 {
				bits = 128
			}
			st.addAddr(net.IPNet{IP: ip, Mask: net.CIDRMask(prefix, bits)})
		}
	}

	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		routes, err := nl.dump(unix.RTM_GETROUTE, family, unix.SizeofRtMsg)
		if err != nil {
			return nil, fmt.Errorf("list routes in the child netns: %w", err)
		}
		for _, m := range routes {
			if len(m.Data) < unix.SizeofRtMsg || m.Data[1] != 0 { // rtm_dst_len 0: a default route
				continue
			}
			attrs, err := syscall.ParseNetlinkRouteAttr(&m)
			if err != nil {
				return nil, err
			}
			var gw net.IP
			oif, table := 0, int(m.Data[4])
			for _, a := range attrs {
				switch a.Attr.Type {
				case unix.RTA_GATEWAY:
					gw = net.IP(append([]byte(nil), a.Value...))
				case unix.RTA_OIF:
					oif = int(binary.NativeEndian.Uint32(a.Value))
				case unix.RTA_TABLE:
					table = int(binary.NativeEndian.Uint32(a.Value))
				}
			}
			if oif == st.Index && table == unix.RT_TABLE_MAIN && gw != nil {
				st.Gateways = append(st.Gateways, gw)
			}
		}
	}
	return st, nil
}

func (st *linkState) addAddr(a net.IPNet) {
	for _, have := range st.Addrs {
		if have.IP.Equal(a.IP) {
			return
		}
	}
	st.Addrs = append(st.Addrs, a)
}

// has reports whether st has a usable address and a default gateway of
// family (4 or 6).
func (st *linkState) has(family int) bool {
	want4 := family == 4
	addr := false
	for _, a := range st.Addrs {
		addr = addr || (a.IP.To4() != nil) == want4
	}
	gw := false
	for _, g := range st.Gateways {
		gw = gw || (g.To4() != nil) == want4
	}
	return addr && gw
}

// gateway returns the default gateway of ip's family, or nil.
func (st *linkState) gateway(ip net.IP) net.IP {
	for _, gw := range st.Gateways {
		if (gw.To4() != nil) == (ip.To4() != nil) {
			return gw
		}
	}
	return nil
}

func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

type netlinkConn struct {
	fd  int
	seq uint32
}

// dump sends a dump request with a zeroed family header of hdrLen bytes
// (its first byte the address family) and collects the replies.
func (c *netlinkConn) dump(typ uint16, family uint8, hdrLen int) ([]syscall.NetlinkMessage, error) {
	c.seq++
	req := make([]byte, unix.NLMSG_HDRLEN+hdrLen)
	binary.NativeEndian.PutUint32(req[0:4], uint32(len(req)))
	binary.NativeEndian.PutUint16(req[4:6], typ)
	binary.NativeEndian.PutUint16(req[6:8], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.NativeEndian.PutUint32(req[8:12], c.seq)
	req[unix.NLMSG_HDRLEN] = family
	if err := unix.Sendto(c.fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, err
	}
	var out []syscall.NetlinkMessage
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil {
			return nil, err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, err
		}
		for _, m := range msgs {
			if m.Header.Seq != c.seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := -int32(binary.NativeEndian.Uint32(m.Data[:4])); errno != 0 {
						return nil, syscall.Errno(errno)
					}
				}
				return nil, errors.New("netlink error")
			}
			m.Data = append([]byte(nil), m.Data...)
			out = append(out, m)
		}
	}
}
