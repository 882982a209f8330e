// Package libport holds the port model every portkit driver shares: a Spec
// names one published port, a Driver forwards it, and a Table assigns IDs and
// refuses conflicts before any driver touches a socket.
//
// Words: parent = the host side (where listeners live), child = the
// container's network namespace (where the service runs), as in RootlessKit.
package libport

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// Spec is one published port. Its JSON form is RootlessKit's port.Spec,
// fields in RootlessKit's order (childPort before childIP), so our JSON is
// byte-identical to what RootlessKit and rootlessctl --json print.
type Spec struct {
	Proto      string `json:"proto,omitempty"`      // tcp tcp4 tcp6 udp udp4 udp6
	ParentIP   string `json:"parentIP,omitempty"`   // empty means 0.0.0.0 (dual-stack for tcp/udp)
	ParentPort int    `json:"parentPort,omitempty"` // 1-65535
	ChildPort  int    `json:"childPort,omitempty"`  // 1-65535
	ChildIP    string `json:"childIP,omitempty"`    // empty means the driver's default
}

// Protos lists every protocol a Spec may name.
var Protos = []string{"tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"}

// String formats s in the grammar ParseSpec reads.
func (s Spec) String() string {
	var b strings.Builder
	if s.ParentIP != "" {
		b.WriteString(bracket(s.ParentIP))
		b.WriteByte(':')
	}
	b.WriteString(strconv.Itoa(s.ParentPort))
	b.WriteByte(':')
	if s.ChildIP != "" {
		b.WriteString(bracket(s.ChildIP))
		b.WriteByte(':')
	}
	b.WriteString(strconv.Itoa(s.ChildPort))
	b.WriteByte('/')
	b.WriteString(s.Proto)
	return b.String()
}

func bracket(ip string) string {
	if strings.Contains(ip, ":") {
		return "[" + ip + "]"
	}
	return ip
}

// Transport is "tcp" or "udp": s.Proto without its family suffix.
func (s Spec) Transport() string { return strings.TrimRight(s.Proto, "46") }

// Family is 4 or 6 when s.Proto picks one, else 0 (both, where the address allows).
func (s Spec) Family() int {
	switch {
	case strings.HasSuffix(s.Proto, "4"):
		return 4
	case strings.HasSuffix(s.Proto, "6"):
		return 6
	}
	return 0
}

// ParseSpec reads RootlessKit's grammar, "[parentIP:]parentPort:[childIP:]childPort/proto",
// with IPv6 addresses in brackets. Port ranges ("8000-8009:9000-9009/tcp", equal
// lengths) are portkit's addition and expand to one Spec per port, in order.
func ParseSpec(text string) ([]Spec, error) {
	specs, err := parseSpec(text)
	if err != nil {
		return nil, fmt.Errorf("port spec %q: %w", text, err)
	}
	return specs, nil
}

func parseSpec(text string) ([]Spec, error) {
	body, proto, ok := strings.Cut(text, "/")
	if !ok {
		return nil, fmt.Errorf("missing protocol: end the spec with /tcp or /udp (or tcp4, tcp6, udp4, udp6)")
	}
	fields, err := splitFields(body)
	if err != nil {
		return nil, err
	}
	var parentIP, parentPorts, childIP, childPorts string
	switch len(fields) {
	case 2:
		parentPorts, childPorts = fields[0], fields[1]
	case 3:
		// "ip:port:port" or "port:ip:port": the address is the field that is not a port (range).
		if isPortField(fields[0]) && !isPortField(fields[1]) {
			parentPorts, childIP, childPorts = fields[0], fields[1], fields[2]
		} else {
			parentIP, parentPorts, childPorts = fields[0], fields[1], fields[2]
		}
	case 4:
		parentIP, parentPorts, childIP, childPorts = fields[0], fields[1], fields[2], fields[3]
	default:
		return nil, fmt.Errorf("want [parentIP:]parentPort:[childIP:]childPort/proto (bracket IPv6 addresses)")
	}
	pLo, pHi, err := parsePortRange("parent port", parentPorts)
	if err != nil {
		return nil, err
	}
	cLo, cHi, err := parsePortRange("child port", childPorts)
	if err != nil {
		return nil, err
	}
	if pHi-pLo != cHi-cLo {
		return nil, fmt.Errorf("parent range %s has %d ports but child range %s has %d: ranges must be the same length",
			parentPorts, pHi-pLo+1, childPorts, cHi-cLo+1)
	}
	specs := make([]Spec, 0, pHi-pLo+1)
	for i := 0; i <= pHi-pLo; i++ {
		s := Spec{Proto: proto, ParentIP: parentIP, ParentPort: pLo + i, ChildIP: childIP, ChildPort: cLo + i}
		if err := s.Validate(); err != nil {
			return nil, err
		}
		specs = append(specs, s)
	}
	return specs, nil
}

// splitFields splits on ':' outside brackets and strips the brackets.
func splitFields(body string) ([]string, error) {
	var fields []string
	for len(body) > 0 {
		if body[0] == '[' {
			end := strings.IndexByte(body, ']')
			if end < 0 {
				return nil, fmt.Errorf("unclosed '[' in IPv6 address")
			}
			fields = append(fields, body[1:end])
			body = body[end+1:]
			if body == "" {
				break
			}
			if body[0] != ':' {
				return nil, fmt.Errorf("want ':' after ']'")
			}
			body = body[1:]
			continue
		}
		f, rest, more := strings.Cut(body, ":")
		fields = append(fields, f)
		body = rest
		if more && rest == "" {
			fields = append(fields, "")
		}
	}
	return fields, nil
}

func isPortField(f string) bool {
	if f == "" {
		return false
	}
	for _, c := range f {
		if (c < '0' || c > '9') && c != '-' {
			return false
		}
	}
	return true
}

func parsePortRange(what, f string) (lo, hi int, err error) {
	loText, hiText, isRange := strings.Cut(f, "-")
	if lo, err = parsePort(what, loText); err != nil {
		return 0, 0, err
	}
	if !isRange {
		return lo, lo, nil
	}
	if hi, err = parsePort(what, hiText); err != nil {
		return 0, 0, err
	}
	if hi < lo {
		return 0, 0, fmt.Errorf("%s range %s runs backwards", what, f)
	}
	return lo, hi, nil
}

func parsePort(what, f string) (int, error) {
	if f == "" || strings.Trim(f, "0123456789") != "" {
		return 0, fmt.Errorf("%s %q is not a number", what, f)
	}
	n, err := strconv.Atoi(f)
	if err != nil || n < 1 || n > 65535 {
		// Atoi fails here only on overflow: still a number, just too big.
		return 0, fmt.Errorf("%s %s is out of range 1-65535", what, f)
	}
	return n, nil
}

// Validate checks s on its own: the protocol, both ports, and that each
// address parses and fits the protocol's family.
func (s Spec) Validate() error {
	known := false
	for _, p := range Protos {
		known = known || s.Proto == p
	}
	if !known {
		return fmt.Errorf("unknown protocol %q: want one of %s", s.Proto, strings.Join(Protos, ", "))
	}
	if s.ParentPort < 1 || s.ParentPort > 65535 {
		return fmt.Errorf("parent port %d is out of range 1-65535", s.ParentPort)
	}
	if s.ChildPort < 1 || s.ChildPort > 65535 {
		return fmt.Errorf("child port %d is out of range 1-65535", s.ChildPort)
	}
	if err := checkIP("parent IP", s.ParentIP, s.Family()); err != nil {
		return err
	}
	return checkIP("child IP", s.ChildIP, s.Family())
}

func checkIP(what, text string, family int) error {
	if text == "" {
		return nil
	}
	ip := net.ParseIP(text)
	if ip == nil {
		return fmt.Errorf("%s %q is not an IP address", what, text)
	}
	is4 := ip.To4() != nil
	if family == 4 && !is4 {
		return fmt.Errorf("%s %s is IPv6 but the protocol is IPv4-only: use tcp6/udp6 or an IPv4 address", what, text)
	}
	if family == 6 && is4 {
		return fmt.Errorf("%s %s is IPv4 but the protocol is IPv6-only: use tcp4/udp4 or an IPv6 address", what, text)
	}
	return nil
}

// Conflicts reports whether a and b cannot both be published: the same
// transport and parent port, on families and addresses that overlap.
func Conflicts(a, b Spec) bool {
	if a.Transport() != b.Transport() || a.ParentPort != b.ParentPort {
		return false
	}
	fa, fb := a.parentFamilies(), b.parentFamilies()
	if fa&fb == 0 {
		return false
	}
	ia, ib := net.ParseIP(a.ParentIP), net.ParseIP(b.ParentIP)
	if ia == nil || ib == nil || ia.IsUnspecified() || ib.IsUnspecified() {
		return true
	}
	return ia.Equal(ib)
}

// parentFamilies is a bit set: 1 for IPv4, 2 for IPv6, of the sockets the
// listener for s occupies. Plain tcp/udp on an unspecified address is dual-stack.
func (s Spec) parentFamilies() int {
	switch s.Family() {
	case 4:
		return 1
	case 6:
		return 2
	}
	ip := net.ParseIP(s.ParentIP)
	switch {
	case ip == nil || ip.IsUnspecified():
		return 3
	case ip.To4() != nil:
		return 1
	default:
		return 2
	}
}
