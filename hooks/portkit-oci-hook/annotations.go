package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/portkit/portkit/libport"
)

// Annotation keys a bundle's config.json uses to ask for networking.
const (
	keyPrefix              = "io.portkit."
	keyNet                 = keyPrefix + "net"
	keyPortDriver          = keyPrefix + "port-driver"
	keyPorts               = keyPrefix + "ports"
	keyMTU                 = keyPrefix + "mtu"
	keyCIDR                = keyPrefix + "cidr"
	keyIPv6                = keyPrefix + "ipv6"
	keyDisableHostLoopback = keyPrefix + "disable-host-loopback"
)

var knownKeys = []string{keyNet, keyPortDriver, keyPorts, keyMTU, keyCIDR, keyIPv6, keyDisableHostLoopback}

// settings is what the annotations ask for.
type settings struct {
	Net                 string // slirp4netns, pasta or none
	PortDriver          string // builtin, slirp4netns, implicit, socat or none
	Ports               []libport.Spec
	MTU                 int
	CIDR                string
	IPv6                bool
	DisableHostLoopback bool
}

// wanted reports whether the annotations ask portkit for anything at all; a
// hook installed for every container leaves the others alone.
func wanted(annotations map[string]string) bool {
	for k := range annotations {
		if strings.HasPrefix(k, keyPrefix) {
			return true
		}
	}
	return false
}

// parseSettings reads the io.portkit.* annotations. Every error names the
// annotation and its value.
func parseSettings(annotations map[string]string) (settings, error) {
	s := settings{Net: "slirp4netns", MTU: 65520}
	for k, v := range annotations {
		if !strings.HasPrefix(k, keyPrefix) {
			continue
		}
		if err := s.set(k, v); err != nil {
			return settings{}, fmt.Errorf("annotation %s=%q: %w", k, v, err)
		}
	}
	if s.PortDriver == "" {
		s.PortDriver = "builtin"
		if s.Net == "pasta" {
			s.PortDriver = "implicit"
		}
	}
	if err := s.validate(); err != nil {
		return settings{}, err
	}
	return s, nil
}

func (s *settings) set(key, value string) error {
	var err error
	switch key {
	case keyNet:
		s.Net, err = oneOf(value, "slirp4netns", "pasta", "none")
	case keyPortDriver:
		s.PortDriver, err = oneOf(value, "builtin", "slirp4netns", "implicit", "socat", "none")
	case keyPorts:
		for _, field := range strings.Split(value, ",") {
			field = strings.TrimSpace(field)
			if field == "" {
				continue
			}
			specs, perr := libport.ParseSpec(field)
			if perr != nil {
				return perr
			}
			s.Ports = append(s.Ports, specs...)
		}
	case keyMTU:
		s.MTU, err = strconv.Atoi(value)
		if err != nil || s.MTU < 1280 || s.MTU > 65521 {
			return fmt.Errorf("want an MTU from 1280 to 65521")
		}
	case keyCIDR:
		s.CIDR = value
	case keyIPv6:
		s.IPv6, err = parseBool(value)
	case keyDisableHostLoopback:
		s.DisableHostLoopback, err = parseBool(value)
	default:
		return fmt.Errorf("unknown portkit annotation: known ones are %s", strings.Join(knownKeys, ", "))
	}
	return err
}

func parseBool(value string) (bool, error) {
	b, err := strconv.ParseBool(value)
	if err != nil {
		return false, fmt.Errorf("want true or false")
	}
	return b, nil
}

func oneOf(value string, allowed ...string) (string, error) {
	for _, a := range allowed {
		if value == a {
			return value, nil
		}
	}
	return "", fmt.Errorf("want one of %s", strings.Join(allowed, ", "))
}

// validate checks the combinations annotations cannot express on their own.
func (s settings) validate() error {
	switch {
	case s.Net == "none" && len(s.Ports) > 0 && s.PortDriver != "builtin" && s.PortDriver != "socat":
		return fmt.Errorf("annotation %s=none: ports need %s=builtin or socat without a network driver", keyNet, keyPortDriver)
	case s.PortDriver == "implicit" && s.Net != "pasta":
		return fmt.Errorf("annotation %s=implicit needs %s=pasta: only pasta forwards ports itself", keyPortDriver, keyNet)
	case s.PortDriver == "slirp4netns" && s.Net != "slirp4netns":
		return fmt.Errorf("annotation %s=slirp4netns needs %s=slirp4netns", keyPortDriver, keyNet)
	}
	return nil
}
