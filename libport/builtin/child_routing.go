package builtin

// Child side: the routing source IP needs inside the child netns, set over a
// NETLINK_ROUTE socket made there (never by running ip or iptables).
//
// TCP, once per netns:
//
//	sysctl net.ipv4.tcp_fwmark_accept=1     (governs IPv6 too)
//	ip rule add fwmark 0x504b lookup 20555 priority 20555      (and -6)
//	ip route add local default dev lo table 20555               (and -6)
//
// Our transparent sockets carry SO_MARK 0x504b, so their SYN does; the
// listener in the child takes the mark into the accepted socket
// (tcp_fwmark_accept), and every reply from it to the client's address is
// looked up in table 20555, which says "local": it comes back to our socket
// over lo. Packets without the mark, i.e. all of the container's own
// traffic, never see the rule.
//
// UDP (opt-in), per child port P:
//
//	ip rule add iif lo ipproto udp sport P lookup 20556 priority 20556   (and -6)
//	ip route add local default dev lo src 127.0.0.1 table 20556          (and -6, without src)
//
// UDP has no accept to carry a mark, so the rule matches every datagram the
// child sends from port P: replies to a client reach our transparent flow
// socket, but so would anything else the service sends from that port.
// That side effect is why UDP source IP is opt-in. The rule goes with the port.

import (
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport/netns"
)

const (
	// tcpMark marks transparent TCP sockets ("PK"); tcpTable and
	// tcpRulePriority use the same number so the rule is easy to recognise.
	tcpMark         = 0x504b
	tcpTable        = 0x504b
	tcpRulePriority = 0x504b
	udpTable        = 0x504c
	udpRulePriority = 0x504c
)

type routing struct {
	src  netns.SocketSource
	logf func(string, ...any)

	mu       sync.Mutex
	nl       *rtnl
	tcpTried bool
	tcp4     atomic.Bool // TCP source IP works for IPv4 clients
	tcp6     atomic.Bool
	udpBase  map[int]bool       // family -> the udpTable route exists
	udpRules map[udpRuleKey]int // references per (family, child port)
	udpFail  map[int]bool       // family -> set-up failed, logged once
	closed   bool
}

type udpRuleKey struct {
	family int
	port   uint16
}

func newRouting(src netns.SocketSource, logf func(string, ...any)) *routing {
	return &routing{src: src, logf: logf, udpBase: map[int]bool{}, udpRules: map[udpRuleKey]int{}, udpFail: map[int]bool{}}
}

// netlink returns the driver's NETLINK_ROUTE socket in the child, opening it
// on first use. Callers hold r.mu.
func (r *routing) netlink() (*rtnl, error) {
	if r.closed {
		return nil, fmt.Errorf("driver closed")
	}
	if r.nl == nil {
		nl, err := openRtnl(r.src)
		if err != nil {
			return nil, err
		}
		r.nl = nl
	}
	return r.nl, nil
}

// tcpReady reports whether a TCP client of family can keep its address.
func (r *routing) tcpReady(is4 bool) bool {
	if is4 {
		return r.tcp4.Load()
	}
	return r.tcp6.Load()
}

// enableTCP sets up TCP source IP in the child, once. On failure it says so
// once in the log; connections are then dialed from the child's loopback.
func (r *routing) enableTCP() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.tcpTried {
		return
	}
	r.tcpTried = true
	fallback := "clients will show up in the child as its own address, not their own"
	if err := r.src.Sysctl("net/ipv4/tcp_fwmark_accept", "1"); err != nil {
		r.logf("builtin: TCP source IP is off: %v; %s", err, fallback)
		return
	}
	nl, err := r.netlink()
	if err != nil {
		r.logf("builtin: TCP source IP is off: %v; %s", err, fallback)
		return
	}
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		err := nl.addRoute(localRoute{family: family, table: tcpTable})
		if err == nil {
			err = nl.addRule(rule{family: family, priority: tcpRulePriority, table: tcpTable, fwmark: tcpMark})
		}
		name := familyName(family)
		if err != nil {
			r.logf("builtin: TCP source IP is off for %s clients: fwmark routing in the child netns: %v; %s", name, err, fallback)
			continue
		}
		if family == unix.AF_INET {
			r.tcp4.Store(true)
		} else {
			r.tcp6.Store(true)
		}
	}
}

// addUDPPort sets up UDP source IP for replies from child port in family,
// and reports whether it works. Each successful call is undone by removeUDPPort.
func (r *routing) addUDPPort(family int, port uint16) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	key := udpRuleKey{family, port}
	if r.udpRules[key] > 0 {
		r.udpRules[key]++
		return true
	}
	err := r.setUDPPort(family, port)
	if err != nil {
		if !r.udpFail[family] {
			r.udpFail[family] = true
			r.logf("builtin: UDP source IP is off for %s: %v; clients will show up in the child as its own address", familyName(family), err)
		}
		return false
	}
	r.udpRules[key] = 1
	return true
}

func (r *routing) setUDPPort(family int, port uint16) error {
	nl, err := r.netlink()
	if err != nil {
		return err
	}
	if !r.udpBase[family] {
		route := localRoute{family: family, table: udpTable}
		if family == unix.AF_INET {
			// Replies from a service bound to 0.0.0.0 take their source
			// from this route: make it loopback, not the client's own address.
			route.prefsrc = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		}
		if err := nl.addRoute(route); err != nil {
			return fmt.Errorf("local route in table %d of the child netns: %w", udpTable, err)
		}
		r.udpBase[family] = true
	}
	if err := nl.addRule(udpRule(family, port)); err != nil {
		return fmt.Errorf("rule for UDP source port %d in the child netns: %w", port, err)
	}
	return nil
}

func udpRule(family int, port uint16) rule {
	return rule{family: family, priority: udpRulePriority, table: udpTable, udpSport: port}
}

// removeUDPPort drops one reference to the rule for child port, deleting the
// rule with the last one.
func (r *routing) removeUDPPort(family int, port uint16) {
	r.mu.Lock()
	defer r.mu.Unlock()
	key := udpRuleKey{family, port}
	if r.udpRules[key] == 0 {
		return
	}
	r.udpRules[key]--
	if r.udpRules[key] > 0 {
		return
	}
	delete(r.udpRules, key)
	nl, err := r.netlink()
	if err == nil {
		err = nl.delRule(udpRule(family, port))
	}
	if err != nil {
		r.logf("builtin: removing the rule for UDP source port %d from the child netns: %v", port, err)
	}
}

// close releases the netlink socket. The TCP rule and both local routes stay:
// they only touch marked sockets or ports with a rule, and a forwarder
// started again for the same netns finds them in place.
func (r *routing) close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	if r.nl == nil {
		return nil
	}
	err := r.nl.close()
	r.nl = nil
	return err
}

func familyName(family int) string {
	if family == unix.AF_INET {
		return "IPv4"
	}
	return "IPv6"
}
