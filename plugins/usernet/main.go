// Command usernet is a CNI main plugin that gives CNI_NETNS an uplink through
// slirp4netns or pasta, without root: the network process runs as the
// caller, joined to the netns (and the user namespace owning it).
//
// ADD spawns a detached forwarder (setsid, no inherited stdio: libcni waits
// for EOF on the plugin's pipes) that owns the network process; its state
// directory is named after (network name, container ID, ifname). With
// slirp4netns the forwarder publishes nothing itself but starts slirp4netns
// with an API socket, which a chained portdriver (driver slirp4netns) uses;
// with pasta it serves the implicit driver over the ports pasta took at
// start. DEL stops it and removes every file; it is idempotent.
//
// Limitation: pasta (Debian 12's build) cannot change ports after start, so
// with backend pasta the ports must come in the portMappings capability at ADD.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"github.com/portkit/portkit/plugins/internal/cniconf"
	"net"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/portkit/portkit/libport/forwarder"
	"github.com/portkit/portkit/libport/netns"
	"github.com/portkit/portkit/libport/network"
	"github.com/portkit/portkit/plugins/internal/attachment"
	"github.com/portkit/portkit/plugins/internal/portmapping"
)

const pluginName = "usernet"

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    cmdAdd,
		Check:  cmdCheck,
		Del:    cmdDel,
		GC:     cmdGC,
		Status: cmdStatus,
	}, version.All, "CNI usernet plugin (portkit): slirp4netns or pasta networking for rootless containers")
}

func key(cfg *Config, args *skel.CmdArgs) attachment.Key {
	return attachment.Key{Plugin: pluginName, Network: cfg.Name, ContainerID: args.ContainerID, IfName: args.IfName}
}

func cmdAdd(args *skel.CmdArgs) error {
	cfg, err := parseConfig(args.StdinData)
	if err != nil {
		return cniconf.Error(err)
	}
	res, err := add(cfg, args)
	if err != nil {
		return cniconf.Error(err)
	}
	return types.PrintResult(res, cfg.CNIVersion)
}

func add(cfg *Config, args *skel.CmdArgs) (*current.Result, error) {
	if args.Netns == "" {
		return nil, types.NewError(types.ErrInvalidNetNS, "usernet ADD: CNI_NETNS is empty: the runtime must give the container's network namespace", "")
	}
	store, err := attachment.Open()
	if err != nil {
		return nil, fmt.Errorf("usernet ADD: state: %w", err)
	}
	defer store.Close()
	k := key(cfg, args)
	if old, err := store.Load(k); err == nil {
		// ADD again without DEL (a runtime that lost track, or a failed ADD
		// it never rolled back): replace the old attachment, never cross it.
		if err := teardown(store, old); err != nil {
			return nil, fmt.Errorf("usernet ADD: clear the previous %s: %w", k, err)
		}
	}

	netCfg := &network.Config{
		Backend:             cfg.Backend,
		NetnsPath:           args.Netns,
		MTU:                 cfg.MTU,
		CIDR:                cfg.CIDR,
		IPv6:                cfg.IPv6,
		DisableHostLoopback: cfg.DisableHostLoopback,
		Sandbox:             cfg.Sandbox,
		Seccomp:             cfg.Seccomp,
		OutboundAddr:        cfg.OutboundAddr,
		IfName:              args.IfName,
	}
	// slirp4netns gets an API socket that a chained portdriver with the
	// slirp4netns driver publishes through; this forwarder publishes nothing.
	portDriver := "none"
	if cfg.Backend == "pasta" {
		portDriver = "implicit"
		// pasta forwards to the child's own address: no child IP in the specs.
		if netCfg.Ports, err = portmapping.Specs(cfg.RuntimeConfig.PortMappings, nil); err != nil {
			return nil, &cniconf.FieldError{Plugin: pluginName, Field: "runtimeConfig.portMappings", Err: err}
		}
	}

	rec := &attachment.Record{Key: k, Netns: args.Netns, StateDir: store.StateDir(k)}
	if cfg.Backend == "slirp4netns" {
		netCfg.APISocket = rec.StateDir + "/slirp4netns.sock"
	}
	// The record goes first so that DEL and GC find whatever a failed ADD left.
	if err := store.Save(rec); err != nil {
		return nil, fmt.Errorf("usernet ADD: %w", err)
	}
	res, err := spawn(cfg, args, rec, netCfg, portDriver)
	if err != nil {
		if terr := teardown(store, rec); terr != nil {
			err = fmt.Errorf("%w (and cleaning up: %v)", err, terr)
		}
		return nil, err
	}
	return res, nil
}

func spawn(cfg *Config, args *skel.CmdArgs, rec *attachment.Record, netCfg *network.Config, portDriver string) (*current.Result, error) {
	_, err := forwarder.Spawn(forwarder.Config{
		StateDir:   rec.StateDir,
		PortDriver: portDriver,
		NetnsPath:  args.Netns,
		Network:    netCfg,
	})
	if err != nil {
		return nil, fmt.Errorf("usernet ADD: start %s for %s: %w", cfg.Backend, args.Netns, err)
	}
	link, err := waitLink(cfg, args)
	if err != nil {
		return nil, fmt.Errorf("usernet ADD: %s started but %w", cfg.Backend, err)
	}
	return buildResult(cfg, args, link)
}

// slirp4netns gives IPv6 by router advertisement: the address (fd00::/64,
// from the MAC) and the route come seconds after start, once duplicate
// address detection is done. ADD returns what traffic can use, so it waits.
const ipv6Wait = 15 * time.Second

func waitLink(cfg *Config, args *skel.CmdArgs) (*linkState, error) {
	src, err := netns.Open(args.Netns)
	if err != nil {
		return nil, fmt.Errorf("open the child netns %s: %w", args.Netns, err)
	}
	defer src.Close()
	deadline := time.Now().Add(ipv6Wait)
	for {
		link, err := readLink(src, args.IfName)
		if err != nil {
			return nil, err
		}
		if !cfg.IPv6 || cfg.Backend != "slirp4netns" || link.has(6) {
			return link, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s in %s got no usable IPv6 address and default route within %s (router advertisement from slirp4netns missing? is net.ipv6.conf.%s.accept_ra on?)",
				args.IfName, args.Netns, ipv6Wait, args.IfName)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func inspect(netnsPath, ifName string) (*linkState, error) {
	src, err := netns.Open(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("open the child netns %s: %w", netnsPath, err)
	}
	defer src.Close()
	return readLink(src, ifName)
}

// buildResult reports what the child netns shows, plus DNS, which is the
// backend's forwarder at the 3rd address of the CIDR (fd00::3 with slirp4netns IPv6).
func buildResult(cfg *Config, args *skel.CmdArgs, link *linkState) (*current.Result, error) {
	res := &current.Result{CNIVersion: current.ImplementedSpecVersion}
	if cfg.PrevResult != nil {
		prev, err := current.NewResultFromResult(cfg.PrevResult)
		if err != nil {
			return nil, fmt.Errorf("usernet ADD: convert prevResult: %w", err)
		}
		res = prev
	}
	idx := len(res.Interfaces)
	res.Interfaces = append(res.Interfaces, &current.Interface{Name: link.Name, Mac: link.MAC, Mtu: link.MTU, Sandbox: args.Netns})
	if len(link.Addrs) == 0 {
		return nil, fmt.Errorf("usernet ADD: %s in %s has no address", link.Name, args.Netns)
	}
	for _, a := range link.Addrs {
		res.IPs = append(res.IPs, &current.IPConfig{Interface: current.Int(idx), Address: a, Gateway: link.gateway(a.IP)})
	}
	for _, gw := range link.Gateways {
		dst := net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}
		if gw.To4() == nil {
			dst = net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		res.Routes = append(res.Routes, &types.Route{Dst: dst, GW: gw})
	}
	_, ipnet, _ := net.ParseCIDR(cfg.CIDR)
	dns := ipnet.IP.To4()
	dns = net.IPv4(dns[0], dns[1], dns[2], dns[3]+3)
	res.DNS.Nameservers = append(res.DNS.Nameservers, dns.String())
	if cfg.IPv6 && cfg.Backend == "slirp4netns" {
		res.DNS.Nameservers = append(res.DNS.Nameservers, "fd00::3")
	}
	return res, nil
}

// teardown stops rec's forwarder (and with it the network process) and
// removes its state directory and record.
func teardown(store *attachment.Store, rec *attachment.Record) error {
	if err := forwarder.Stop(rec.StateDir); err != nil {
		return fmt.Errorf("stop the forwarder of %s in %s: %w", rec.Key, rec.StateDir, err)
	}
	return store.Delete(rec.Key)
}

func cmdDel(args *skel.CmdArgs) error {
	// DEL needs only the network name to find the attachment, and must
	// clean up even when the rest of the config has gone bad since ADD.
	cfg, err := parseName(args.StdinData)
	if err != nil {
		return cniconf.Error(err)
	}
	store, err := attachment.OpenForDel()
	if err != nil {
		return cniconf.Error(fmt.Errorf("usernet DEL: state: %w", err))
	}
	if store == nil {
		return nil // nothing was ever recorded
	}
	defer store.Close()
	k := key(cfg, args)
	rec, err := store.Load(k)
	if errors.Is(err, os.ErrNotExist) {
		// Never added, or already deleted; the directory may still be there
		// if an ADD died between spawning and saving.
		rec, err = &attachment.Record{Key: k, StateDir: store.StateDir(k)}, nil
	}
	if err != nil {
		return cniconf.Error(fmt.Errorf("usernet DEL: %w", err))
	}
	return cniconf.Error(teardown(store, rec))
}

func cmdCheck(args *skel.CmdArgs) error {
	cfg, err := parseConfig(args.StdinData)
	if err != nil {
		return cniconf.Error(err)
	}
	return cniconf.Error(check(cfg, args))
}

func check(cfg *Config, args *skel.CmdArgs) error {
	if cfg.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "usernet CHECK: prevResult is missing: the runtime must pass the ADD result", "")
	}
	prev, err := current.NewResultFromResult(cfg.PrevResult)
	if err != nil {
		return fmt.Errorf("usernet CHECK: convert prevResult: %w", err)
	}
	store, err := attachment.Open()
	if err != nil {
		return fmt.Errorf("usernet CHECK: state: %w", err)
	}
	defer store.Close()
	k := key(cfg, args)
	rec, err := store.Load(k)
	if err != nil {
		return types.NewError(types.ErrUnknownContainer, fmt.Sprintf("usernet CHECK: no %s: %v", k, err), "")
	}
	if err := forwarder.Check(rec.StateDir); err != nil {
		return fmt.Errorf("usernet CHECK: %s: %w", k, err)
	}
	link, err := inspect(args.Netns, args.IfName)
	if err != nil {
		return fmt.Errorf("usernet CHECK: %w", err)
	}
	return compare(prev, args, link)
}

// compare checks that the interface prevResult names for this attachment is
// in the netns with the MAC, MTU and addresses the result says.
func compare(prev *current.Result, args *skel.CmdArgs, link *linkState) error {
	idx := -1
	for i, ifc := range prev.Interfaces {
		if ifc.Name == args.IfName && ifc.Sandbox == args.Netns {
			idx = i
			if ifc.Mac != "" && !strings.EqualFold(ifc.Mac, link.MAC) {
				return fmt.Errorf("usernet CHECK: %s has MAC %s, prevResult says %s", link.Name, link.MAC, ifc.Mac)
			}
			if ifc.Mtu != 0 && ifc.Mtu != link.MTU {
				return fmt.Errorf("usernet CHECK: %s has MTU %d, prevResult says %d", link.Name, link.MTU, ifc.Mtu)
			}
		}
	}
	if idx < 0 {
		return fmt.Errorf("usernet CHECK: prevResult has no interface %s in %s", args.IfName, args.Netns)
	}
	if !link.Up {
		return fmt.Errorf("usernet CHECK: %s in %s is down", link.Name, args.Netns)
	}
	for _, ip := range prev.IPs {
		if ip.Interface == nil || *ip.Interface != idx {
			continue
		}
		found := false
		for _, a := range link.Addrs {
			found = found || (a.IP.Equal(ip.Address.IP) && a.Mask.String() == ip.Address.Mask.String())
		}
		if !found {
			return fmt.Errorf("usernet CHECK: %s lacks address %s from prevResult", link.Name, ip.Address.String())
		}
	}
	return nil
}

func cmdStatus(args *skel.CmdArgs) error {
	cfg, err := parseConfig(args.StdinData)
	if err != nil {
		return cniconf.Error(err)
	}
	if _, err := exec.LookPath(cfg.Backend); err != nil {
		pkg := cfg.Backend
		if pkg == "pasta" {
			pkg = "passt"
		}
		return types.NewError(cniconf.ErrPluginNotAvailable,
			fmt.Sprintf("usernet: backend %s is not available: %s is not on PATH (%s): install the %s package", cfg.Backend, cfg.Backend, os.Getenv("PATH"), pkg), "")
	}
	return nil
}

// cmdGC removes every attachment of this network that the runtime does not
// list as valid. It goes on past failures and reports them all at the end.
func cmdGC(args *skel.CmdArgs) error {
	cfg, err := parseConfig(args.StdinData)
	if err != nil {
		return cniconf.Error(err)
	}
	store, err := attachment.Open()
	if err != nil {
		return cniconf.Error(fmt.Errorf("usernet GC: state: %w", err))
	}
	defer store.Close()
	return cniconf.Error(gc(store, cfg.Name, cfg.ValidAttachments, pluginName))
}

func gc(store *attachment.Store, networkName string, valid []types.GCAttachment, plugin string) error {
	keep := map[types.GCAttachment]bool{}
	for _, a := range valid {
		keep[a] = true
	}
	recs, err := store.List(plugin, networkName)
	errs := []error{err}
	for i := range recs {
		r := &recs[i]
		if keep[types.GCAttachment{ContainerID: r.ContainerID, IfName: r.IfName}] {
			continue
		}
		if err := teardown(store, r); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", r.Key, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("usernet GC: %w", err)
	}
	return nil
}

// parseName reads just enough of the config for DEL.
func parseName(stdin []byte) (*Config, error) {
	c := &Config{}
	if err := json.Unmarshal(stdin, &c.PluginConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("%s config: %v", pluginName, err), "")
	}
	return c, nil
}
