package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/portkit/portkit/plugins/internal/cniconf"
	"net"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/portkit/portkit/plugins/internal/portmapping"
)

// Config is usernet's network configuration (the plugin's entry in a conflist).
type Config struct {
	types.PluginConf

	Backend             string `json:"backend"`             // slirp4netns (default) or pasta
	MTU                 int    `json:"mtu"`                 // default 65520
	CIDR                string `json:"cidr"`                // IPv4 network of the child, default 10.0.2.0/24
	IPv6                bool   `json:"ipv6"`                // give the child IPv6 too
	DisableHostLoopback bool   `json:"disableHostLoopback"` // the gateway does not lead to the host's loopback
	Sandbox             bool   `json:"sandbox"`             // slirp4netns --enable-sandbox
	Seccomp             bool   `json:"seccomp"`             // slirp4netns --enable-seccomp
	OutboundAddr        string `json:"outboundAddr"`        // source address of the child's outbound traffic

	RuntimeConfig struct {
		// Only pasta takes ports, and only at start: they are handed to it
		// here and published by portdriver's implicit driver.
		PortMappings []portmapping.Mapping `json:"portMappings,omitempty"`
	} `json:"runtimeConfig"`
}

// Defaults, as documented in the README.
const (
	DefaultBackend = "slirp4netns"
	DefaultMTU     = 65520
	DefaultCIDR    = "10.0.2.0/24"
)

// Default fills the fields the user left out.
func (c *Config) Default() {
	if c.Backend == "" {
		c.Backend = DefaultBackend
	}
	if c.MTU == 0 {
		c.MTU = DefaultMTU
	}
	if c.CIDR == "" {
		c.CIDR = DefaultCIDR
	}
}

// bad is a config error naming field; main turns it into CNI error 7.
func bad(field, format string, args ...any) error {
	return cniconf.Bad(pluginName, field, format, args...)
}

// Validate checks c after Default. Every error names the JSON field.
func (c *Config) Validate() error {
	switch c.Backend {
	case "slirp4netns", "pasta":
	default:
		return bad("backend", "%q is not a backend: want slirp4netns or pasta", c.Backend)
	}
	maxMTU := 65520
	if c.Backend == "slirp4netns" {
		maxMTU = 65521
	}
	minMTU := 68
	if c.IPv6 {
		minMTU = 1280
	}
	if c.MTU < minMTU || c.MTU > maxMTU {
		return bad("mtu", "%d is out of range %d-%d for %s", c.MTU, minMTU, maxMTU, c.Backend)
	}
	ip, ipnet, err := net.ParseCIDR(c.CIDR)
	switch {
	case err != nil:
		return bad("cidr", "%q is not a CIDR such as 10.0.2.0/24", c.CIDR)
	case ip.To4() == nil:
		return bad("cidr", "%q is not IPv4: the child network is IPv4 (set \"ipv6\": true for IPv6 as well)", c.CIDR)
	}
	if ones, _ := ipnet.Mask.Size(); ones > 25 {
		return bad("cidr", "%q is too small: the child gets the 100th address, so use a /25 or larger", c.CIDR)
	}
	if c.Backend == "pasta" {
		if c.Sandbox {
			return bad("sandbox", "is a slirp4netns option: pasta always sandboxes itself")
		}
		if c.Seccomp {
			return bad("seccomp", "is a slirp4netns option: pasta always sandboxes itself")
		}
	} else if len(c.RuntimeConfig.PortMappings) > 0 {
		// libcni only passes portMappings to a plugin that declares the
		// capability; with slirp4netns ports are published by portdriver.
		return bad("runtimeConfig.portMappings", "slirp4netns takes no ports at start: remove the portMappings capability from usernet and chain portdriver")
	}
	if c.OutboundAddr != "" && net.ParseIP(c.OutboundAddr) == nil {
		return bad("outboundAddr", "%q is not an IP address", c.OutboundAddr)
	}
	if _, err := portmapping.Specs(c.RuntimeConfig.PortMappings, nil); err != nil {
		return &cniconf.FieldError{Plugin: pluginName, Field: "runtimeConfig.portMappings", Err: err}
	}
	return nil
}

// parseConfig reads stdin into a defaulted, validated Config. Unknown keys
// and values of the wrong type or range are errors naming the key.
func parseConfig(stdin []byte) (*Config, error) {
	if err := cniconf.CheckFields(pluginName, stdin, "backend", "mtu", "cidr", "ipv6", "disableHostLoopback", "sandbox", "seccomp", "outboundAddr"); err != nil {
		return nil, err
	}
	c := &Config{}
	if err := json.Unmarshal(stdin, &c.PluginConf); err != nil {
		return nil, fmt.Errorf("usernet config: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(stdin))
	if err := dec.Decode(c); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return nil, bad(te.Field, "got a JSON %s, want a %s", te.Value, jsonKind(te.Type.Kind().String()))
		}
		return nil, &cniconf.FieldError{Plugin: pluginName, Field: "runtimeConfig.portMappings", Err: err}
	}
	if err := version.ParsePrevResult(&c.PluginConf); err != nil {
		return nil, bad("prevResult", "%v", err)
	}
	c.Default()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

func jsonKind(goKind string) string {
	switch goKind {
	case "int", "int64", "uint", "float64":
		return "number"
	case "bool":
		return "boolean (true or false)"
	case "string":
		return "string"
	}
	return goKind
}
