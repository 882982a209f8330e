package network

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport"
)

// startPasta runs pasta in the foreground (-f) as our own child, so that we
// reap it, it dies with us (Pdeathsig) and Done follows it; Debian 12's pasta
// has no ready fd, but it writes its -P pid file once set-up is done.
func startPasta(ctx context.Context, cfg *Config) (*Network, error) {
	portArgs, err := pastaPortArgs(cfg.Ports)
	if err != nil {
		return nil, err
	}
	n := &Network{pidfd: -1}
	if err := n.addressing(cfg); err != nil {
		return nil, err
	}
	if n.MAC, err = macFor(cfg); err != nil {
		return nil, err
	}
	ones, _ := n.IP.Mask.Size()

	dir, err := os.MkdirTemp("", "portkit-pasta-")
	if err != nil {
		return nil, fmt.Errorf("pid file directory: %w", err)
	}
	defer os.RemoveAll(dir)
	pidFile := filepath.Join(dir, "pid")

	userns, err := usernsArg(cfg.NetnsPath)
	if err != nil {
		return nil, err
	}
	if userns != nil {
		defer userns.Close()
	}

	args := []string{
		"--foreground",
		"--quiet",
		"--pid=" + pidFile,
		"--config-net",
		"--ns-ifname=" + cfg.IfName,
		"--ns-mac-addr=" + n.MAC,
		"--mtu=" + strconv.Itoa(cfg.MTU),
		"--address=" + n.IP.IP.String(),
		"--netmask=" + strconv.Itoa(ones),
		"--gateway=" + n.Gateway.String(),
		"--dns-forward=" + n.DNS.String(),
		// Never let pasta bind the parent's loopback ports inside the child
		// (its default, "auto"): those would shadow the child's own servers
		// and loop back into our port drivers' listeners. The child reaches
		// the parent's loopback through the gateway address instead, as
		// with slirp4netns, unless DisableHostLoopback.
		"--tcp-ns=none",
		"--udp-ns=none",
	}
	if cfg.DisableHostLoopback {
		args = append(args, "--no-map-gw")
	}
	if !cfg.IPv6 {
		args = append(args, "--ipv4-only")
	}
	if cfg.OutboundAddr != "" {
		args = append(args, "--outbound="+cfg.OutboundAddr)
	}
	args = append(args, portArgs...)
	if userns != nil {
		args = append(args, "--userns=/proc/self/fd/3")
	}
	if os.Geteuid() == 0 {
		// pasta started as root switches to nobody, who cannot join the
		// child's namespaces; run it as the owner of the child's user
		// namespace instead (root for a netns in our own user namespace).
		owner := 0
		if userns != nil {
			if uid, err := unix.IoctlGetUint32(int(userns.Fd()), unix.NS_GET_OWNER_UID); err == nil {
				owner = int(uid)
			}
		}
		args = append(args, "--runas="+strconv.Itoa(owner))
	}
	// pasta joins the user namespace before it opens the netns, and from
	// there it may no longer open a path that needs ptrace access to a
	// process outside it (EACCES on /proc/PID/fd/N of a holder in our user
	// namespace, as the OCI hook's netns receiver is): hand it the netns
	// as an inherited descriptor instead.
	netnsFile, err := os.Open(cfg.NetnsPath)
	if err != nil {
		return nil, fmt.Errorf("open the child netns: %w", err)
	}
	defer netnsFile.Close()
	var extra []*os.File
	if userns != nil {
		extra = append(extra, userns) // fd 3, as --userns says
	}
	extra = append(extra, netnsFile)
	args = append(args, fmt.Sprintf("--netns=/proc/self/fd/%d", 2+len(extra)))

	cmd := exec.Command("pasta", args...)
	cmd.ExtraFiles = extra
	if err := n.launch(cmd); err != nil {
		return nil, err
	}

	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for {
		b, err := os.ReadFile(pidFile)
		if err == nil && strings.HasSuffix(string(b), "\n") {
			pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
			if pid != n.PID {
				return nil, n.failed(fmt.Errorf("pasta wrote pid %d to its pid file but runs as %d: did it fork despite --foreground?", pid, n.PID))
			}
			break
		}
		select {
		case <-n.done:
			return nil, n.failed(fmt.Errorf("pasta exited before it was ready: %v", n.waitErr))
		case <-ctx.Done():
			return nil, n.failed(fmt.Errorf("pasta not ready: %w", ctx.Err()))
		case <-tick.C:
		}
	}
	// With IPv6, pasta copies the parent's IPv6 address and gateway from the
	// interface with the IPv6 default route (if any); the IPv6 fields stay
	// empty because that is the parent's choice, not ours.
	return n, nil
}

// pastaPortArgs turns specs into pasta's -t/-u options. pasta forwards to the
// child's own address, so a spec naming a child IP cannot be expressed.
func pastaPortArgs(specs []libport.Spec) ([]string, error) {
	var tcp, udp []string
	for _, s := range specs {
		if err := s.Validate(); err != nil {
			return nil, fmt.Errorf("port %s: %w", s, err)
		}
		if s.ChildIP != "" {
			return nil, fmt.Errorf("port %s: pasta cannot forward to a chosen child IP (%s): drop the child IP, or use the builtin port driver", s, s.ChildIP)
		}
		addr := s.ParentIP
		switch {
		case addr == "" && s.Family() == 4:
			addr = "0.0.0.0"
		case addr == "" && s.Family() == 6:
			addr = "::"
		}
		if ip := net.ParseIP(addr); ip != nil && ip.To4() == nil && s.Family() == 6 && ip.IsUnspecified() {
			// pasta binds [::] dual-stack: it cannot keep a tcp6/udp6 spec IPv6-only.
			return nil, fmt.Errorf("port %s: pasta forwards IPv4 too on an unspecified IPv6 address: name a specific IPv6 parent address, or use %s", s, s.Transport())
		}
		arg := strconv.Itoa(s.ParentPort)
		if s.ChildPort != s.ParentPort {
			arg += ":" + strconv.Itoa(s.ChildPort)
		}
		if addr != "" {
			arg = addr + "/" + arg
		}
		if s.Transport() == "tcp" {
			tcp = append(tcp, arg)
		} else {
			udp = append(udp, arg)
		}
	}
	var args []string
	// An explicit "none" also stops pasta mirroring TCP port numbers onto UDP.
	if len(tcp) == 0 {
		tcp = []string{"none"}
	}
	if len(udp) == 0 {
		udp = []string{"none"}
	}
	for _, a := range tcp {
		args = append(args, "--tcp-ports="+a)
	}
	for _, a := range udp {
		args = append(args, "--udp-ports="+a)
	}
	return args, nil
}
