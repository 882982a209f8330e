// Command portkit-oci-hook gives a runc or crun container portkit's network
// and published ports without CNI. It is an OCI hook: the runtime runs it
// with the container's state on stdin.
//
//	createRuntime (or prestart): start slirp4netns or pasta for the
//	    container's netns and a detached forwarder that publishes the ports
//	    the bundle's io.portkit.* annotations ask for; return once traffic
//	    can flow.
//	createContainer: only needed where the runtime hides the container's
//	    namespaces from the createRuntime hook (rootless crun runs the
//	    container process non-dumpable until it execs the user's program):
//	    from inside the container, hand its netns to the receiver that
//	    createRuntime left waiting, and return once traffic can flow.
//	poststop: stop all of it; running it twice is fine.
//
// A container without io.portkit.* annotations is left alone, so the hook
// may be installed for every container.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/portkit/portkit/libport/forwarder"
	"github.com/portkit/portkit/libport/network"
	"github.com/portkit/portkit/libport/state"
)

const usage = `usage: portkit-oci-hook createRuntime|prestart|createContainer|poststop < OCI-STATE

An OCI runtime hook (runc, crun, oci-hooks directories). Settings come from
the bundle's annotations:
  io.portkit.net                    slirp4netns (default), pasta or none
  io.portkit.port-driver            builtin (default; implicit with pasta), slirp4netns, implicit, socat, none
  io.portkit.ports                  comma-separated port specs: [parentIP:]parentPort:[childIP:]childPort/proto
  io.portkit.mtu                    default 65520
  io.portkit.cidr                   default 10.0.2.0/24
  io.portkit.ipv6                   true or false
  io.portkit.disable-host-loopback  true or false
`

// maxState bounds what is read from stdin: an OCI state is a few hundred bytes.
const maxState = 1 << 20

// defaultPath is used when the runtime gives the hook no PATH (runc passes
// only the hook's own env), so slirp4netns, pasta and nsenter are found.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func main() {
	if dir := os.Getenv(envReceiver); dir != "" {
		os.Unsetenv(envReceiver)
		os.Exit(receiverMain(dir))
	}
	if os.Getenv("PATH") == "" {
		os.Setenv("PATH", defaultPath)
	}
	if err := run(os.Args[1:], os.Stdin); err != nil {
		fmt.Fprintf(os.Stderr, "portkit-oci-hook: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string, stdin io.Reader) error {
	if len(args) != 1 || args[0] == "-h" || args[0] == "--help" {
		fmt.Fprint(os.Stderr, usage)
		if len(args) == 1 {
			return nil
		}
		return errors.New("want exactly one argument, the hook stage")
	}
	stage := args[0]
	switch stage {
	case "createRuntime", "prestart", "createContainer", "poststop":
	default:
		return fmt.Errorf("unknown hook stage %q: want createRuntime, prestart, createContainer or poststop", stage)
	}
	st, err := readState(stdin)
	if err != nil {
		return err
	}
	annotations, err := containerAnnotations(st)
	if err != nil {
		return err
	}
	if !wanted(annotations) {
		return nil
	}
	if stage == "createContainer" {
		// We run inside the container's namespaces here: no state dir is
		// made, only the one createRuntime made is looked up.
		return handOverNetns(st)
	}
	dir, err := stateDir(st.ID)
	if err != nil {
		return err
	}
	if stage == "poststop" {
		return detach(st, dir)
	}
	s, err := parseSettings(annotations)
	if err != nil {
		return fmt.Errorf("container %s: %w", st.ID, err)
	}
	return attach(st, s, dir)
}

// readState decodes the runtime's state document.
func readState(r io.Reader) (*specs.State, error) {
	var st specs.State
	dec := json.NewDecoder(io.LimitReader(r, maxState))
	if err := dec.Decode(&st); err != nil {
		return nil, fmt.Errorf("read OCI state from stdin: %w (run me as an OCI hook)", err)
	}
	if err := checkID(st.ID); err != nil {
		return nil, err
	}
	return &st, nil
}

// checkID refuses an ID that could step out of the state base directory.
func checkID(id string) error {
	if id == "" || id == "." || id == ".." || strings.ContainsAny(id, "/\x00") || len(id) > 1024 {
		return fmt.Errorf("OCI state: container id %q cannot name a state directory", id)
	}
	return nil
}

// containerAnnotations are the state's annotations or, for runtimes that
// leave them out of the state, those of the bundle's config.json.
func containerAnnotations(st *specs.State) (map[string]string, error) {
	if len(st.Annotations) > 0 || st.Bundle == "" {
		return st.Annotations, nil
	}
	data, err := os.ReadFile(filepath.Join(st.Bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("container %s: read bundle config: %w", st.ID, err)
	}
	var cfg struct {
		Annotations map[string]string `json:"annotations"`
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, fmt.Errorf("container %s: bundle config %s: %w", st.ID, filepath.Join(st.Bundle, "config.json"), err)
	}
	return cfg.Annotations, nil
}

// stateDir is where the container's forwarder keeps its files.
func stateDir(id string) (string, error) {
	base, err := state.BaseDir()
	if err != nil {
		return "", err
	}
	oci := filepath.Join(base, "oci")
	if err := os.Mkdir(oci, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("create %s: %w", oci, err)
	}
	return filepath.Join(oci, id), nil
}

// attach starts the container's network and forwarder. Where the
// container's netns cannot be opened yet (rootless crun), it leaves a
// receiver waiting for the createContainer hook to hand it over.
func attach(st *specs.State, s settings, dir string) error {
	if st.Pid <= 0 {
		return fmt.Errorf("container %s: the OCI state has no pid: run the hook at createRuntime or prestart", st.ID)
	}
	cfg := forwarderConfig(st, s, dir)
	netnsPath := fmt.Sprintf("/proc/%d/ns/net", st.Pid)
	theirs, err := os.Readlink(netnsPath)
	if errors.Is(err, fs.ErrPermission) {
		return attachLater(st, cfg, netnsPath, err)
	}
	if err != nil {
		return fmt.Errorf("container %s: %w", st.ID, err)
	}
	if ours, _ := os.Readlink("/proc/self/ns/net"); theirs == ours {
		return fmt.Errorf("container %s %w", st.ID, errHostNetns)
	}
	if _, err := forwarder.Spawn(cfg); err != nil {
		return fmt.Errorf("container %s: %w", st.ID, err)
	}
	return nil
}

// errHostNetns says the container has no network namespace of its own.
var errHostNetns = errors.New(`shares the host's network namespace: add {"type":"network"} to linux.namespaces in config.json`)

// forwarderConfig is the forwarder the settings ask for; the child netns
// defaults to /proc/PID/ns/net of the container's process.
func forwarderConfig(st *specs.State, s settings, dir string) forwarder.Config {
	cfg := forwarder.Config{StateDir: dir, PortDriver: s.PortDriver, ChildPID: st.Pid, Ports: s.Ports}
	if s.Net != "none" {
		cfg.Network = &network.Config{
			Backend:             s.Net,
			MTU:                 s.MTU,
			CIDR:                s.CIDR,
			IPv6:                s.IPv6,
			DisableHostLoopback: s.DisableHostLoopback,
		}
	}
	return cfg
}

// detach stops the container's forwarder, network and receiver (if any)
// and removes its state directory. The container is gone by now.
func detach(st *specs.State, dir string) error {
	// Read before forwarder.Stop removes the directory with the file.
	recv, recvErr := readReceiver(dir)
	if err := forwarder.Stop(dir); err != nil {
		return fmt.Errorf("container %s: %w", st.ID, err)
	}
	if recvErr == nil {
		if err := recv.Stop(receiverGrace); err != nil {
			return fmt.Errorf("container %s: stop the netns receiver: %w", st.ID, err)
		}
	}
	return nil
}
