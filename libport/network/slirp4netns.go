package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport/netns"
)

// Slirp4netnsFeatures is what the installed slirp4netns supports, read from
// its --help (older builds lack the newer flags).
type Slirp4netnsFeatures struct {
	Sandbox, Seccomp, NetnsTypePath, UsernsPath, OutboundAddr, MACAddress bool
}

var slirpFeatures struct {
	sync.Once
	f   Slirp4netnsFeatures
	err error
}

// DetectSlirp4netns reads the features of the slirp4netns on PATH, once.
func DetectSlirp4netns() (Slirp4netnsFeatures, error) {
	slirpFeatures.Do(func() {
		out, err := exec.Command("slirp4netns", "--help").CombinedOutput()
		if err != nil {
			slirpFeatures.err = fmt.Errorf("slirp4netns --help: %w: %s", err, strings.TrimSpace(string(out)))
			return
		}
		h := string(out)
		slirpFeatures.f = Slirp4netnsFeatures{
			Sandbox:       strings.Contains(h, "--enable-sandbox"),
			Seccomp:       strings.Contains(h, "--enable-seccomp"),
			NetnsTypePath: strings.Contains(h, "--netns-type"),
			UsernsPath:    strings.Contains(h, "--userns-path"),
			OutboundAddr:  strings.Contains(h, "--outbound-addr"),
			MACAddress:    strings.Contains(h, "--macaddress"),
		}
	})
	return slirpFeatures.f, slirpFeatures.err
}

// slirp4netns lays out IPv6 as fd00::/64 with these offsets (not configurable).
var (
	slirpIP6      = net.ParseIP("fd00::100")
	slirpGateway6 = net.ParseIP("fd00::2")
	slirpDNS6     = net.ParseIP("fd00::3")
)

func startSlirp4netns(ctx context.Context, cfg *Config) (*Network, error) {
	feat, err := DetectSlirp4netns()
	if err != nil {
		return nil, err
	}
	if !feat.NetnsTypePath || !feat.UsernsPath {
		return nil, errors.New("this slirp4netns lacks --netns-type=path and --userns-path: install slirp4netns 1.1 or newer")
	}
	if cfg.Sandbox && !feat.Sandbox {
		return nil, errors.New("this slirp4netns has no --enable-sandbox: turn the sandbox off or upgrade slirp4netns")
	}
	if cfg.Seccomp && !feat.Seccomp {
		return nil, errors.New("this slirp4netns has no --enable-seccomp: turn seccomp off or upgrade slirp4netns")
	}
	n := &Network{pidfd: -1}
	if err := n.addressing(cfg); err != nil {
		return nil, err
	}
	if cfg.IPv6 {
		n.IP6 = net.IPNet{IP: slirpIP6, Mask: net.CIDRMask(64, 128)}
		n.Gateway6, n.DNS6 = slirpGateway6, slirpDNS6
	}

	// slirp4netns joins the namespaces of a PID (its default), or a netns
	// path with a user namespace path. Its sandbox fails in path mode
	// ("setegid(0)"), so a /proc/PID/ns/net whose process lives in the
	// netns's owning user namespace is passed as the PID.
	pid := netnsHolder(cfg.NetnsPath)
	var userns *os.File
	if pid == 0 {
		if cfg.Sandbox {
			return nil, fmt.Errorf("slirp4netns --enable-sandbox fails on a netns given by path: give /proc/PID/ns/net of a process in the netns and its owning user namespace, or turn the sandbox off")
		}
		if userns, err = usernsArg(cfg.NetnsPath); err != nil {
			return nil, err
		}
		if userns != nil {
			defer userns.Close()
		}
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer readyR.Close()
	exitR, exitW, err := os.Pipe()
	if err != nil {
		readyW.Close()
		return nil, err
	}

	// ExtraFiles[i] is fd 3+i in slirp4netns.
	extra := []*os.File{readyW, exitR}
	args := []string{
		"--configure",
		"--mtu=" + strconv.Itoa(cfg.MTU),
		"--cidr=" + cfg.CIDR,
		"--ready-fd=3",
		"--exit-fd=4",
	}
	target := strconv.Itoa(pid)
	if pid == 0 {
		target = cfg.NetnsPath
		args = append(args, "--netns-type=path")
		if userns != nil {
			extra = append(extra, userns)
			args = append(args, "--userns-path=/proc/self/fd/5")
		}
	}
	if feat.MACAddress {
		if n.MAC, err = macFor(cfg); err != nil {
			readyW.Close()
			exitR.Close()
			exitW.Close()
			return nil, err
		}
		args = append(args, "--macaddress="+n.MAC)
	}
	if cfg.IPv6 {
		args = append(args, "--enable-ipv6")
	}
	if cfg.DisableHostLoopback {
		args = append(args, "--disable-host-loopback")
	}
	if cfg.Sandbox {
		args = append(args, "--enable-sandbox")
	}
	if cfg.Seccomp {
		args = append(args, "--enable-seccomp")
	}
	if cfg.OutboundAddr != "" {
		if net.ParseIP(cfg.OutboundAddr).To4() != nil {
			args = append(args, "--outbound-addr="+cfg.OutboundAddr)
		} else {
			args = append(args, "--outbound-addr6="+cfg.OutboundAddr)
		}
	}
	if cfg.APISocket != "" {
		args = append(args, "--api-socket="+cfg.APISocket)
	}
	args = append(args, target, cfg.IfName)

	cmd := exec.Command("slirp4netns", args...)
	cmd.ExtraFiles = extra
	err = n.launch(cmd)
	// Our copies of the child's ends: EOF on readyR must mean slirp4netns is gone.
	readyW.Close()
	exitR.Close()
	if err != nil {
		exitW.Close()
		return nil, err
	}
	n.exitW = exitW

	ready := make(chan error, 1)
	go func() {
		b := make([]byte, 1)
		_, err := readyR.Read(b)
		switch {
		case err != nil:
			ready <- errors.New("slirp4netns exited before it was ready")
		case b[0] != '1':
			ready <- fmt.Errorf("slirp4netns wrote %q on its ready fd, want \"1\"", b[0])
		default:
			ready <- nil
		}
	}()
	select {
	case err := <-ready:
		if err != nil {
			<-n.done // let its stderr arrive
			return nil, n.failed(fmt.Errorf("%w: %v", err, n.waitErr))
		}
	case <-ctx.Done():
		return nil, n.failed(fmt.Errorf("slirp4netns not ready: %w", ctx.Err()))
	}
	if n.MAC == "" {
		n.MAC = "unknown"
	}
	return n, nil
}

// netnsHolder returns PID when path is /proc/PID/ns/net and that process is
// in the user namespace owning the netns (so slirp4netns may take the PID),
// else 0.
func netnsHolder(path string) int {
	rest, ok := strings.CutPrefix(filepath.Clean(path), "/proc/")
	if !ok {
		return 0
	}
	pidText, ok := strings.CutSuffix(rest, "/ns/net")
	if !ok {
		return 0
	}
	pid, err := strconv.Atoi(pidText)
	if err != nil || pid <= 0 {
		return 0
	}
	owner, err := netns.OwnerUserns(path)
	if err != nil {
		return 0
	}
	defer owner.Close()
	var a, b unix.Stat_t
	if unix.Fstat(int(owner.Fd()), &a) != nil || unix.Stat(fmt.Sprintf("/proc/%d/ns/user", pid), &b) != nil {
		return 0
	}
	if a.Dev != b.Dev || a.Ino != b.Ino {
		return 0
	}
	return pid
}
