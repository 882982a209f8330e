// Command portdriver is a chained CNI plugin, in the manner of portmap: it
// publishes runtimeConfig.portMappings on the host through one of portkit's
// port drivers, forwarding to the container address from prevResult, and
// passes prevResult on.
//
// Where the forwarder usernet started for this attachment already serves the
// requested driver (implicit: ports pasta took at start), the ports are added
// to it through its API socket. Otherwise portdriver spawns a forwarder of its
// own for CNI_NETNS (builtin, socat; slirp4netns through usernet's slirp4netns
// API socket), e.g. behind a bridge network from containernetworking-plugins.
// DEL removes exactly the ports this plugin published, and is idempotent.
//
// Limitation: the listeners bind in the namespace portdriver runs in. Under
// Podman's CNI backend that is Podman's rootless-netns, unreachable from the
// host; there Podman publishes ports itself (use usernet alone).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/portkit/portkit/plugins/internal/cniconf"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/api"
	"github.com/portkit/portkit/libport/forwarder"
	"github.com/portkit/portkit/libport/state"
	"github.com/portkit/portkit/plugins/internal/attachment"
)

const pluginName = "portdriver"

// apiTimeout bounds each call to a forwarder's API socket.
const apiTimeout = 10 * time.Second

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    cmdAdd,
		Check:  cmdCheck,
		Del:    cmdDel,
		GC:     cmdGC,
		Status: cmdStatus,
	}, version.All, "CNI portdriver plugin (portkit): publishes portMappings through a portkit port driver")
}

func keys(cfg *Config, args *skel.CmdArgs) (own, usernet attachment.Key) {
	own = attachment.Key{Plugin: pluginName, Network: cfg.Name, ContainerID: args.ContainerID, IfName: args.IfName}
	usernet = own
	usernet.Plugin = "usernet"
	return own, usernet
}

func cmdAdd(args *skel.CmdArgs) error {
	cfg, err := parseConfig(args.StdinData)
	if err != nil {
		return cniconf.Error(err)
	}
	if cfg.prev == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "portdriver is a chained plugin: prevResult is missing: put it after a main plugin (usernet, bridge, …) in a conflist", "")
	}
	if err := add(cfg, args); err != nil {
		return cniconf.Error(err)
	}
	return types.PrintResult(cfg.prev, cfg.CNIVersion)
}

func add(cfg *Config, args *skel.CmdArgs) error {
	if len(cfg.RuntimeConfig.PortMappings) == 0 {
		return nil
	}
	if underRootlessPodman(os.Getenv) {
		explainPodman(os.Stderr, len(cfg.RuntimeConfig.PortMappings))
		return nil
	}
	if cfg.Driver == "none" {
		return &cniconf.FieldError{Plugin: pluginName, Field: "driver", Err: fmt.Errorf("none publishes no ports, but the runtime asked for %d port mappings (first %s): choose builtin, slirp4netns, implicit or socat",
			len(cfg.RuntimeConfig.PortMappings), cfg.RuntimeConfig.PortMappings[0])}
	}
	if args.Netns == "" {
		return types.NewError(types.ErrInvalidNetNS, "portdriver ADD: CNI_NETNS is empty: the runtime must give the container's network namespace", "")
	}
	specs, err := cfg.specs(args.Netns, args.IfName)
	if err != nil {
		return &cniconf.FieldError{Plugin: pluginName, Field: "runtimeConfig.portMappings", Err: err}
	}
	store, err := attachment.Open()
	if err != nil {
		return fmt.Errorf("portdriver ADD: state: %w", err)
	}
	defer store.Close()
	own, usernetKey := keys(cfg, args)
	if old, err := store.Load(own); err == nil {
		// An ADD without DEL: the runtime lost track. Replace what we had.
		if err := teardown(store, old); err != nil {
			return fmt.Errorf("portdriver ADD: clear the previous %s: %w", own, err)
		}
	}
	usernetRec, _ := store.Load(usernetKey)
	usernetDriver := ""
	if usernetRec != nil {
		usernetDriver = forwarderDriver(usernetRec.StateDir)
	}

	rec := &attachment.Record{Key: own, Netns: args.Netns}
	switch {
	case usernetDriver == cfg.Driver:
		rec.APISocket = usernetRec.StateDir + "/" + state.APISocket
	case cfg.Driver == "implicit":
		return &cniconf.FieldError{Plugin: pluginName, Field: "driver", Err: errors.New("implicit publishes the ports pasta took at start: chain portdriver after usernet with \"backend\": \"pasta\" and \"capabilities\": {\"portMappings\": true}")}
	case cfg.Driver == "slirp4netns" && (usernetRec == nil || !exists(usernetRec.StateDir+"/slirp4netns.sock")):
		return &cniconf.FieldError{Plugin: pluginName, Field: "driver", Err: errors.New("slirp4netns publishes through the slirp4netns usernet started: chain portdriver after usernet with \"backend\": \"slirp4netns\"")}
	default:
		rec.StateDir = store.StateDir(own)
	}
	if err := store.Save(rec); err != nil {
		return fmt.Errorf("portdriver ADD: %w", err)
	}
	if err := publish(cfg, args, rec, usernetRec, specs); err != nil {
		if terr := teardown(store, rec); terr != nil {
			err = fmt.Errorf("%w (and cleaning up: %v)", err, terr)
		}
		return err
	}
	return store.Save(rec)
}

func publish(cfg *Config, args *skel.CmdArgs, rec *attachment.Record, usernetRec *attachment.Record, specs []libport.Spec) error {
	if rec.APISocket != "" {
		ctx, cancel := context.WithTimeout(context.Background(), apiTimeout)
		defer cancel()
		c := api.NewClient(rec.APISocket)
		// pasta's ports are in usernet's table from the start (implicit):
		// those are published already and go away with usernet's forwarder.
		have, err := c.ListPorts(ctx)
		if err != nil {
			return fmt.Errorf("portdriver ADD: list the ports of usernet's forwarder on %s: %w", rec.APISocket, err)
		}
		for _, s := range specs {
			if published(have, s) {
				continue
			}
			st, err := c.AddPort(ctx, s)
			if err != nil {
				return fmt.Errorf("portdriver ADD: publish host port %s (%s) through usernet's forwarder: %w", portName(s), s, err)
			}
			rec.PortIDs = append(rec.PortIDs, st.ID)
		}
		return nil
	}
	fcfg := forwarder.Config{
		StateDir:   rec.StateDir,
		PortDriver: cfg.Driver,
		NetnsPath:  args.Netns,
		Ports:      specs,
	}
	if cfg.Driver == "slirp4netns" {
		fcfg.SlirpAPISocket = usernetRec.StateDir + "/slirp4netns.sock"
		if ips := childIPs(cfg.prev, args.Netns, args.IfName); len(ips) > 0 {
			fcfg.ChildIP = ips[0].String()
		}
	}
	if _, err := forwarder.Spawn(fcfg); err != nil {
		return fmt.Errorf("portdriver ADD: publish %s with the %s driver: %w", portNames(specs), cfg.Driver, err)
	}
	return nil
}

// published reports whether the table holds s (same protocol, addresses and ports).
func published(have []libport.Status, s libport.Spec) bool {
	for _, p := range have {
		if p.Spec == s {
			return true
		}
	}
	return false
}

func portName(s libport.Spec) string {
	ip := s.ParentIP
	if ip == "" {
		ip = "*"
	}
	return fmt.Sprintf("%s:%d/%s", ip, s.ParentPort, s.Proto)
}

func portNames(specs []libport.Spec) string {
	out := "host ports"
	for i, s := range specs {
		if i > 0 {
			out += ","
		}
		out += " " + portName(s)
	}
	return out
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// forwarderDriver is the port driver the forwarder in dir serves, or "" when
// there is none running.
func forwarderDriver(dir string) string {
	d, err := state.Open(dir)
	if err != nil {
		return ""
	}
	defer d.Close()
	if p, err := d.ReadProcess(state.ForwarderFile); err != nil || !p.Alive() {
		return ""
	}
	var fc forwarder.Config
	if err := d.ReadJSON(state.ConfigFile, &fc); err != nil {
		return ""
	}
	return fc.PortDriver
}

// teardown removes what rec published: its ports on another forwarder (a
// forwarder already gone took them with it) or its own forwarder.
func teardown(store *attachment.Store, rec *attachment.Record) error {
	var errs []error
	if rec.APISocket != "" && len(rec.PortIDs) > 0 && exists(rec.APISocket) {
		ctx, cancel := context.WithTimeout(context.Background(), apiTimeout)
		defer cancel()
		c := api.NewClient(rec.APISocket)
		for _, id := range rec.PortIDs {
			if err := c.RemovePort(ctx, id); err != nil && !isGone(err) {
				errs = append(errs, fmt.Errorf("remove port %d from %s: %w", id, rec.APISocket, err))
			}
		}
	}
	if dir := store.StateDir(rec.Key); dir != "" {
		if err := forwarder.Stop(dir); err != nil {
			errs = append(errs, fmt.Errorf("stop the forwarder in %s: %w", dir, err))
		}
	}
	if len(errs) == 0 {
		errs = append(errs, store.Delete(rec.Key))
	}
	return errors.Join(errs...)
}

// isGone says a port or its forwarder is already gone: what DEL wants.
func isGone(err error) bool {
	var ae *api.Error
	if errors.As(err, &ae) && strings.HasPrefix(ae.Message, "unknown id") {
		return true
	}
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED)
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
		return cniconf.Error(fmt.Errorf("portdriver DEL: state: %w", err))
	}
	if store == nil {
		return nil // nothing was ever recorded
	}
	defer store.Close()
	own, _ := keys(cfg, args)
	rec, err := store.Load(own)
	if errors.Is(err, os.ErrNotExist) {
		rec, err = &attachment.Record{Key: own}, nil
	}
	if err != nil {
		return cniconf.Error(fmt.Errorf("portdriver DEL: %w", err))
	}
	if err := teardown(store, rec); err != nil {
		return cniconf.Error(fmt.Errorf("portdriver DEL: %s: %w", own, err))
	}
	return nil
}

func cmdCheck(args *skel.CmdArgs) error {
	cfg, err := parseConfig(args.StdinData)
	if err != nil {
		return cniconf.Error(err)
	}
	if cfg.prev == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "portdriver CHECK: prevResult is missing", "")
	}
	if len(cfg.RuntimeConfig.PortMappings) == 0 {
		return nil
	}
	specs, err := cfg.specs(args.Netns, args.IfName)
	if err != nil {
		return cniconf.Error(&cniconf.FieldError{Plugin: pluginName, Field: "runtimeConfig.portMappings", Err: err})
	}
	store, err := attachment.Open()
	if err != nil {
		return cniconf.Error(fmt.Errorf("portdriver CHECK: state: %w", err))
	}
	defer store.Close()
	own, _ := keys(cfg, args)
	rec, err := store.Load(own)
	if err != nil {
		return types.NewError(types.ErrUnknownContainer, fmt.Sprintf("portdriver CHECK: no %s: %v", own, err), "")
	}
	sock := rec.APISocket
	if sock == "" {
		if err := forwarder.Check(rec.StateDir); err != nil {
			return cniconf.Error(fmt.Errorf("portdriver CHECK: %s: %w", own, err))
		}
		sock = rec.StateDir + "/" + state.APISocket
	}
	ctx, cancel := context.WithTimeout(context.Background(), apiTimeout)
	defer cancel()
	ports, err := api.NewClient(sock).ListPorts(ctx)
	if err != nil {
		return cniconf.Error(fmt.Errorf("portdriver CHECK: the forwarder serving %s does not answer on %s: %w", own, sock, err))
	}
	for _, want := range specs {
		found := false
		for _, p := range ports {
			found = found || (p.Spec.Transport() == want.Transport() && p.Spec.ParentPort == want.ParentPort && p.Spec.ParentIP == want.ParentIP)
		}
		if !found {
			return cniconf.Error(fmt.Errorf("portdriver CHECK: host port %s is not published by the forwarder on %s", portName(want), sock))
		}
	}
	return nil
}

func cmdStatus(args *skel.CmdArgs) error {
	cfg, err := parseConfig(args.StdinData)
	if err != nil {
		return cniconf.Error(err)
	}
	var need []string
	switch cfg.Driver {
	case "socat":
		need = []string{"socat", "nsenter"}
	case "slirp4netns":
		need = []string{"slirp4netns"}
	case "implicit":
		need = []string{"pasta"}
	}
	for _, bin := range need {
		if _, err := exec.LookPath(bin); err != nil {
			return types.NewError(cniconf.ErrPluginNotAvailable,
				fmt.Sprintf("portdriver: the %s driver needs %s, which is not on PATH (%s): install it", cfg.Driver, bin, os.Getenv("PATH")), "")
		}
	}
	return nil
}

func cmdGC(args *skel.CmdArgs) error {
	cfg, err := parseConfig(args.StdinData)
	if err != nil {
		return cniconf.Error(err)
	}
	store, err := attachment.Open()
	if err != nil {
		return cniconf.Error(fmt.Errorf("portdriver GC: state: %w", err))
	}
	defer store.Close()
	keep := map[types.GCAttachment]bool{}
	for _, a := range cfg.ValidAttachments {
		keep[a] = true
	}
	recs, err := store.List(pluginName, cfg.Name)
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
		return cniconf.Error(fmt.Errorf("portdriver GC: %w", err))
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
