// Package portmapping reads the CNI portMappings capability
// (runtimeConfig.portMappings, CONVENTIONS.md) and turns each entry into a
// libport.Spec.
//
// Runtimes disagree on key case: Podman and libcni users send lowerCamel
// (hostPort), containerd's CRI sends Go field names (HostPort). Both are read.
package portmapping

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"strings"

	"github.com/portkit/portkit/libport"
)

// Mapping is one runtimeConfig.portMappings entry.
type Mapping struct {
	HostPort      int    `json:"hostPort"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol,omitempty"` // tcp (default) or udp
	HostIP        string `json:"hostIP,omitempty"`   // empty: every address
}

// String names the mapping in errors the way a user wrote it.
func (m Mapping) String() string {
	host := ""
	if m.HostIP != "" {
		host = m.HostIP + ":"
		if strings.Contains(m.HostIP, ":") {
			host = "[" + m.HostIP + "]:"
		}
	}
	proto := m.Protocol
	if proto == "" {
		proto = "tcp"
	}
	return fmt.Sprintf("%s%d->%d/%s", host, m.HostPort, m.ContainerPort, proto)
}

// UnmarshalJSON accepts hostPort and HostPort alike (key case is ignored, as
// encoding/json does), and refuses keys that are neither, so a typo is
// reported instead of silently publishing nothing.
func (m *Mapping) UnmarshalJSON(data []byte) error {
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return fmt.Errorf("a port mapping must be an object: %w", err)
	}
	for key, val := range raw {
		var err error
		switch strings.ToLower(key) {
		case "hostport":
			err = json.Unmarshal(val, &m.HostPort)
		case "containerport":
			err = json.Unmarshal(val, &m.ContainerPort)
		case "protocol":
			err = json.Unmarshal(val, &m.Protocol)
		case "hostip":
			err = json.Unmarshal(val, &m.HostIP)
		default:
			return fmt.Errorf("port mapping has unknown key %q: want hostPort, containerPort, protocol, hostIP", key)
		}
		if err != nil {
			return fmt.Errorf("port mapping key %q: %s is not the right type", key, bytes.TrimSpace(val))
		}
	}
	return nil
}

// Spec turns m into the spec a port driver publishes. childIP is where the
// child side dials (empty: the driver's default). Protocol is lower-cased;
// only tcp and udp exist for port drivers (sctp is refused by name).
func (m Mapping) Spec(childIP string) (libport.Spec, error) {
	proto := strings.ToLower(m.Protocol)
	if proto == "" {
		proto = "tcp"
	}
	if proto != "tcp" && proto != "udp" {
		return libport.Spec{}, fmt.Errorf("port mapping %s: protocol %q is not supported: portkit port drivers forward tcp and udp only", m, m.Protocol)
	}
	hostIP := m.HostIP
	if ip := net.ParseIP(hostIP); hostIP != "" && ip == nil {
		return libport.Spec{}, fmt.Errorf("port mapping %s: hostIP %q is not an IP address", m, m.HostIP)
	}
	s := libport.Spec{Proto: proto, ParentIP: hostIP, ParentPort: m.HostPort, ChildIP: childIP, ChildPort: m.ContainerPort}
	if err := s.Validate(); err != nil {
		return libport.Spec{}, fmt.Errorf("port mapping %s: %w", m, err)
	}
	return s, nil
}

// Specs converts every mapping; childIP picks the child address for a
// mapping's host address family (nil: the driver's default).
func Specs(ms []Mapping, childIP func(hostIP net.IP) string) ([]libport.Spec, error) {
	specs := make([]libport.Spec, 0, len(ms))
	for _, m := range ms {
		cip := ""
		if childIP != nil {
			cip = childIP(net.ParseIP(m.HostIP))
		}
		s, err := m.Spec(cip)
		if err != nil {
			return nil, err
		}
		for _, prev := range specs {
			if libport.Conflicts(prev, s) {
				return nil, fmt.Errorf("port mapping %s conflicts with %s: both claim host port %d", m, prev, s.ParentPort)
			}
		}
		specs = append(specs, s)
	}
	return specs, nil
}
