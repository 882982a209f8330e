package forwarder

import (
	"fmt"
	"time"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/builtin"
	"github.com/portkit/portkit/libport/implicit"
	"github.com/portkit/portkit/libport/netns"
	"github.com/portkit/portkit/libport/slirp4netns"
	"github.com/portkit/portkit/libport/socat"
)

// BuiltinOptions tunes the builtin driver: builtin.Options without its
// Logf (the forwarder's log), so that config.json round-trips through JSON.
type BuiltinOptions struct {
	SourceIP       builtin.SourceIP `json:"sourceIP"`                 // TCP on by default, UDP opt-in
	UDPIdleTimeout time.Duration    `json:"udpIdleTimeout,omitempty"` // default: the driver's
	UDPMaxFlows    int              `json:"udpMaxFlows,omitempty"`    // default: the driver's
}

// startDriver builds the port driver cfg.PortDriver names.
func (f *forwarder) startDriver() error {
	d, err := f.newDriver()
	if err != nil {
		return fmt.Errorf("forwarder: port driver %s: %w", f.cfg.PortDriver, err)
	}
	f.driver = d
	return nil
}

func (f *forwarder) newDriver() (libport.Driver, error) {
	switch f.cfg.PortDriver {
	case "none":
		return libport.NoneDriver{}, nil
	case "slirp4netns":
		socket := f.cfg.SlirpAPISocket
		if socket == "" {
			if f.net == nil || f.net.Backend != "slirp4netns" {
				return nil, fmt.Errorf("no slirp4netns to drive: start the slirp4netns network here (--net slirp4netns) or name the API socket of a running one")
			}
			socket = f.dir.Join(slirpSocketName)
		}
		childIP := ""
		if ip := f.childIP(); ip != nil {
			childIP = ip.String()
		}
		return slirp4netns.New(socket, childIP)
	case "builtin":
		src, err := f.openSource()
		if err != nil {
			return nil, err
		}
		o := f.cfg.Builtin
		return builtin.New(src, builtin.Options{SourceIP: o.SourceIP, UDPIdleTimeout: o.UDPIdleTimeout, UDPMaxFlows: o.UDPMaxFlows, Logf: f.opts.logf})
	case "implicit":
		if f.net == nil || f.net.Backend != "pasta" {
			return nil, fmt.Errorf("no pasta to report: the implicit driver needs --net pasta started by this forwarder")
		}
		return implicit.New(f.netCfg.Ports), nil
	case "socat":
		d, err := socat.New(f.cfg.netnsPath())
		if err != nil {
			return nil, err
		}
		d.SetLogf(f.opts.logf)
		return d, nil
	}
	return nil, fmt.Errorf("unknown port driver %q", f.cfg.PortDriver)
}

// openSource opens the child netns socket source, logging to the forwarder's log.
func (f *forwarder) openSource() (netns.SocketSource, error) {
	path := f.cfg.netnsPath()
	src, err := netns.Open(path, netns.WithLogf(f.opts.logf))
	if err != nil {
		return nil, fmt.Errorf("open child netns %s: %w", path, err)
	}
	f.source = src
	return src, nil
}
