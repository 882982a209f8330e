package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/portkit/portkit/plugins/internal/cniconf"
	"net"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/plugins/internal/portmapping"
)

// Drivers lists the port drivers portdriver publishes through.
var Drivers = []string{"builtin", "slirp4netns", "implicit", "socat", "none"}

// DefaultDriver is the driver used when the config names none.
const DefaultDriver = "builtin"

// Config is portdriver's entry in a conflist.
type Config struct {
	types.PluginConf

	Driver string `json:"driver"` // builtin (default), slirp4netns, implicit, socat, none

	RuntimeConfig struct {
		PortMappings []portmapping.Mapping `json:"portMappings,omitempty"`
	} `json:"runtimeConfig"`

	prev *current.Result // prevResult in the current version
}

// Default fills the fields the user left out.
func (c *Config) Default() {
	if c.Driver == "" {
		c.Driver = DefaultDriver
	}
}

// bad is a config error naming field; main turns it into CNI error 7.
func bad(field, format string, args ...any) error {
	return cniconf.Bad(pluginName, field, format, args...)
}

// Validate checks c after Default; every error names the JSON field.
func (c *Config) Validate() error {
	known := false
	for _, d := range Drivers {
		known = known || c.Driver == d
	}
	if !known {
		return bad("driver", "%q is not a port driver: want one of %s", c.Driver, strings.Join(Drivers, ", "))
	}
	if _, err := portmapping.Specs(c.RuntimeConfig.PortMappings, nil); err != nil {
		return &cniconf.FieldError{Plugin: pluginName, Field: "runtimeConfig.portMappings", Err: err}
	}
	return nil
}

// parseConfig reads stdin into a defaulted, validated Config; prevResult,
// when present, is converted to the current result version.
func parseConfig(stdin []byte) (*Config, error) {
	if err := cniconf.CheckFields(pluginName, stdin, "driver"); err != nil {
		return nil, err
	}
	c := &Config{}
	if err := json.NewDecoder(bytes.NewReader(stdin)).Decode(c); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return nil, bad(te.Field, "got a JSON %s, want %s", te.Value, te.Type.Kind())
		}
		return nil, &cniconf.FieldError{Plugin: pluginName, Field: "runtimeConfig.portMappings", Err: err}
	}
	if err := version.ParsePrevResult(&c.PluginConf); err != nil {
		return nil, bad("prevResult", "%v", err)
	}
	if c.PrevResult != nil {
		prev, err := current.NewResultFromResult(c.PrevResult)
		if err != nil {
			return nil, bad("prevResult", "cannot convert to CNI %s: %v", current.ImplementedSpecVersion, err)
		}
		c.prev = prev
	}
	c.Default()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// childIPs returns the container's addresses from prevResult: those on the
// interface whose sandbox is netnsPath (named ifName when several are), else
// every address the result gives.
func childIPs(prev *current.Result, netnsPath, ifName string) []net.IP {
	pick := func(match func(*current.Interface) bool) []net.IP {
		var ips []net.IP
		for _, ip := range prev.IPs {
			if ip.Interface == nil || *ip.Interface < 0 || *ip.Interface >= len(prev.Interfaces) {
				continue
			}
			if match(prev.Interfaces[*ip.Interface]) {
				ips = append(ips, ip.Address.IP)
			}
		}
		return ips
	}
	if ips := pick(func(i *current.Interface) bool { return i.Sandbox != "" && i.Sandbox == netnsPath && i.Name == ifName }); len(ips) > 0 {
		return ips
	}
	if ips := pick(func(i *current.Interface) bool { return i.Sandbox != "" && i.Sandbox == netnsPath }); len(ips) > 0 {
		return ips
	}
	var ips []net.IP
	for _, ip := range prev.IPs {
		ips = append(ips, ip.Address.IP)
	}
	return ips
}

// specs turns the port mappings into the specs driver publishes. builtin and
// socat dial the container address of the host address's family (IPv4 when
// the host address is unspecified); slirp4netns dials its guest address and
// pasta (implicit) its own, so those take no child IP.
func (c *Config) specs(netnsPath, ifName string) ([]libport.Spec, error) {
	if c.Driver == "slirp4netns" || c.Driver == "implicit" {
		return portmapping.Specs(c.RuntimeConfig.PortMappings, nil)
	}
	ips := childIPs(c.prev, netnsPath, ifName)
	if len(ips) == 0 {
		return nil, fmt.Errorf("prevResult gives no address for %s in %s: nothing to forward the ports to", ifName, netnsPath)
	}
	var missing error
	specs, err := portmapping.Specs(c.RuntimeConfig.PortMappings, func(host net.IP) string {
		want6 := host != nil && host.To4() == nil && !host.IsUnspecified()
		for _, ip := range ips {
			if (ip.To4() == nil) == want6 {
				return ip.String()
			}
		}
		if want6 {
			missing = fmt.Errorf("host address %s is IPv6 but the container has no IPv6 address in prevResult", host)
		}
		return ips[0].String()
	})
	if err != nil {
		return nil, err
	}
	return specs, missing
}
