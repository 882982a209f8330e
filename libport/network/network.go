// Package network gives a child network namespace its uplink: it starts
// slirp4netns or pasta attached to an existing netns (given by path, joined
// together with the user namespace that owns it), returns once traffic can
// flow, reports what the child got, and stops the process so that nothing
// outlives its owner.
//
// Every line here runs in the parent (the caller's namespaces); the network
// process joins the child's namespaces by itself.
package network

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/netns"
)

// Backends lists the network processes Start knows.
var Backends = []string{"slirp4netns", "pasta"}

// Defaults filled in by Config.Default.
const (
	DefaultMTU    = 65520
	DefaultCIDR   = "10.0.2.0/24"
	DefaultIfName = "tap0"
)

// Addresses inside CIDR, as slirp4netns and RootlessKit lay them out.
const (
	gatewayOffset = 2
	dnsOffset     = 3
	childOffset   = 100
)

// startTimeout bounds Start when ctx has no earlier deadline.
const startTimeout = 30 * time.Second

// Config says which network process to start and how.
type Config struct {
	Backend             string         // slirp4netns or pasta
	NetnsPath           string         // the child netns: /proc/PID/ns/net, a bind mount, a CNI_NETNS path
	MTU                 int            // default 65520
	CIDR                string         // IPv4 network of the child, default 10.0.2.0/24
	IPv6                bool           // give the child IPv6 too
	DisableHostLoopback bool           // the child may not reach the parent's loopback through the gateway
	Sandbox             bool           // slirp4netns --enable-sandbox
	Seccomp             bool           // slirp4netns --enable-seccomp
	OutboundAddr        string         // source address for the child's outbound traffic
	APISocket           string         // slirp4netns --api-socket (the slirp4netns port driver needs it)
	Ports               []libport.Spec // pasta -t/-u at start (pasta cannot change ports later)
	IfName              string         // interface in the child, default tap0
	MAC                 string         // of IfName; default a random locally administered one
}

// Default fills the zero fields of c with their defaults.
func (c *Config) Default() {
	if c.MTU == 0 {
		c.MTU = DefaultMTU
	}
	if c.CIDR == "" {
		c.CIDR = DefaultCIDR
	}
	if c.IfName == "" {
		c.IfName = DefaultIfName
	}
}

// Validate checks c (after Default) without starting anything.
func (c *Config) Validate() error {
	switch c.Backend {
	case "slirp4netns", "pasta":
	case "":
		return fmt.Errorf("network backend is empty: want one of %s", strings.Join(Backends, ", "))
	default:
		return fmt.Errorf("unknown network backend %q: want one of %s", c.Backend, strings.Join(Backends, ", "))
	}
	if c.MAC != "" {
		if _, err := net.ParseMAC(c.MAC); err != nil {
			return fmt.Errorf("network MAC %q: %w", c.MAC, err)
		}
	}
	if c.NetnsPath == "" {
		return errors.New("network namespace path is empty: give the child's /proc/PID/ns/net or a bind mount of it")
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
		return fmt.Errorf("MTU %d is out of range %d-%d for %s", c.MTU, minMTU, maxMTU, c.Backend)
	}
	if _, err := childNet(c.CIDR); err != nil {
		return err
	}
	if len(c.IfName) > unix.IFNAMSIZ-1 || strings.ContainsAny(c.IfName, "/ \t\n:") {
		return fmt.Errorf("interface name %q is not a valid Linux interface name (at most 15 characters, no '/', ':' or spaces)", c.IfName)
	}
	if c.OutboundAddr != "" && net.ParseIP(c.OutboundAddr) == nil {
		return fmt.Errorf("outbound address %q is not an IP address", c.OutboundAddr)
	}
	if c.Backend == "pasta" {
		if c.Sandbox || c.Seccomp {
			return errors.New("sandbox and seccomp are slirp4netns options: pasta always sandboxes itself")
		}
		if c.APISocket != "" {
			return errors.New("an API socket is a slirp4netns option: pasta takes its ports at start (Ports)")
		}
		if _, err := pastaPortArgs(c.Ports); err != nil {
			return err
		}
	} else if len(c.Ports) > 0 {
		return errors.New("slirp4netns takes no ports at start: publish them through its API socket (the slirp4netns port driver)")
	}
	return nil
}

// childNet parses cidr and checks it leaves room for the child's address.
func childNet(cidr string) (*net.IPNet, error) {
	ip, ipnet, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, fmt.Errorf("CIDR %q: %w", cidr, err)
	}
	if ip.To4() == nil {
		return nil, fmt.Errorf("CIDR %q is not IPv4: the child network is IPv4 (IPv6 is switched on separately)", cidr)
	}
	if ones, _ := ipnet.Mask.Size(); ones > 25 {
		return nil, fmt.Errorf("CIDR %q is too small: the child gets the 100th address, so use a /25 or larger (e.g. 10.0.2.0/24)", cidr)
	}
	ipnet.IP = ipnet.IP.To4()
	return ipnet, nil
}

func addIP(base net.IP, n int) net.IP {
	ip := make(net.IP, len(base))
	copy(ip, base)
	for i := len(ip) - 1; i >= 0 && n > 0; i-- {
		sum := int(ip[i]) + n
		ip[i] = byte(sum)
		n = sum >> 8
	}
	return ip
}

// Network is a running network process and what the child got from it.
type Network struct {
	Backend string
	IfName  string
	IP      net.IPNet // the child's IPv4 address and prefix
	Gateway net.IP    // reaches the parent (and its loopback unless DisableHostLoopback)
	DNS     net.IP    // forwarded to the parent's resolver
	// IPv6 fields are zero unless Config.IPv6 and the backend set IPv6 up.
	IP6      net.IPNet
	Gateway6 net.IP
	DNS6     net.IP
	MTU      int
	MAC      string // of IfName in the child
	PID      int    // of the network process

	cmd      *exec.Cmd
	pidfd    int
	exitW    *os.File // slirp4netns --exit-fd: closing it stops slirp4netns
	stderr   *tailBuffer
	done     chan struct{}
	waitErr  error
	stopOnce sync.Once
	stopErr  error
}

// Done is closed when the network process has exited (stopped or died).
func (n *Network) Done() <-chan struct{} { return n.done }

// Err is how the network process ended; valid after Done is closed.
func (n *Network) Err() error {
	<-n.done
	if n.waitErr != nil {
		return fmt.Errorf("%s (pid %d) exited: %w%s", n.Backend, n.PID, n.waitErr, n.stderr.suffix())
	}
	return nil
}

// Alive reports whether the network process is still running.
func (n *Network) Alive() bool {
	select {
	case <-n.done:
		return false
	default:
		return true
	}
}

// Stop ends the network process and waits until it is gone. It is
// idempotent and safe to call after the process died on its own.
func (n *Network) Stop() error {
	n.stopOnce.Do(func() { n.stopErr = n.stop() })
	return n.stopErr
}

func (n *Network) stop() error {
	defer n.closeFiles()
	if n.exitW != nil {
		// slirp4netns stops ~100 ms after the exit fd closes.
		n.exitW.Close()
		n.exitW = nil
		if n.waitFor(time.Second) {
			return nil
		}
	}
	_ = n.signal(unix.SIGTERM)
	if n.waitFor(2 * time.Second) {
		return nil
	}
	_ = n.signal(unix.SIGKILL)
	if n.waitFor(2 * time.Second) {
		return nil
	}
	return fmt.Errorf("stop %s (pid %d): still running after SIGKILL", n.Backend, n.PID)
}

// signal sends sig through the pidfd, so a reused PID is never hit.
func (n *Network) signal(sig unix.Signal) error {
	if !n.Alive() {
		return nil
	}
	if n.pidfd >= 0 {
		err := unix.PidfdSendSignal(n.pidfd, sig, nil, 0)
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		return err
	}
	return n.cmd.Process.Signal(sig)
}

func (n *Network) waitFor(d time.Duration) bool {
	select {
	case <-n.done:
		return true
	case <-time.After(d):
		return false
	}
}

func (n *Network) closeFiles() {
	if n.exitW != nil {
		n.exitW.Close()
		n.exitW = nil
	}
}

// Start starts cfg.Backend attached to cfg.NetnsPath and returns once the
// child's interface is configured and traffic can flow. On error nothing it
// started is left running.
func Start(ctx context.Context, cfg Config) (*Network, error) {
	cfg.Default()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("network %s: %w", cfg.Backend, err)
	}
	if _, err := exec.LookPath(cfg.Backend); err != nil {
		return nil, fmt.Errorf("network %s: %w: install it (apt-get install %s)", cfg.Backend, err, debPackage(cfg.Backend))
	}
	if _, hasDeadline := ctx.Deadline(); !hasDeadline {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, startTimeout)
		defer cancel()
	}
	var n *Network
	var err error
	switch cfg.Backend {
	case "slirp4netns":
		n, err = startSlirp4netns(ctx, &cfg)
	case "pasta":
		n, err = startPasta(ctx, &cfg)
	}
	if err != nil {
		return nil, fmt.Errorf("network %s for %s: %w", cfg.Backend, cfg.NetnsPath, err)
	}
	return n, nil
}

func debPackage(backend string) string {
	if backend == "pasta" {
		return "passt"
	}
	return backend
}

// ChildAddresses is the IPv4 layout both backends give the child in cidr
// (default 10.0.2.0/24): its address (.100), the gateway (.2) and the DNS
// forwarder (.3), known before anything starts (e.g. for resolv.conf).
func ChildAddresses(cidr string) (ip net.IPNet, gateway, dns net.IP, err error) {
	if cidr == "" {
		cidr = DefaultCIDR
	}
	ipnet, err := childNet(cidr)
	if err != nil {
		return net.IPNet{}, nil, nil, err
	}
	return net.IPNet{IP: addIP(ipnet.IP, childOffset), Mask: ipnet.Mask},
		addIP(ipnet.IP, gatewayOffset), addIP(ipnet.IP, dnsOffset), nil
}

// addressing fills the IPv4 fields of n from cfg as slirp4netns lays them out.
func (n *Network) addressing(cfg *Config) error {
	var err error
	if n.IP, n.Gateway, n.DNS, err = ChildAddresses(cfg.CIDR); err != nil {
		return err
	}
	n.MTU = cfg.MTU
	n.IfName = cfg.IfName
	n.Backend = cfg.Backend
	return nil
}

// macFor is cfg.MAC, or a new random one: the MAC we report is always the
// one we told the backend to set.
func macFor(cfg *Config) (string, error) {
	if cfg.MAC != "" {
		return cfg.MAC, nil
	}
	return RandomMAC()
}

// RandomMAC makes a locally administered unicast address. A caller that
// restarts the network (a supervised forwarder) picks one once and passes it
// as Config.MAC, so the container keeps its MAC.
func RandomMAC() (string, error) {
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	b[0] = (b[0] | 0x02) &^ 0x01
	return net.HardwareAddr(b).String(), nil
}

// usernsArg opens the user namespace owning netnsPath. It returns nil when
// that is our own user namespace (joining it again fails with EINVAL).
func usernsArg(netnsPath string) (*os.File, error) {
	owner, err := netns.OwnerUserns(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("find the user namespace owning %s: %w", netnsPath, err)
	}
	var a, b unix.Stat_t
	if err := unix.Fstat(int(owner.Fd()), &a); err != nil {
		owner.Close()
		return nil, err
	}
	if err := unix.Stat("/proc/self/ns/user", &b); err != nil {
		owner.Close()
		return nil, err
	}
	if a.Dev == b.Dev && a.Ino == b.Ino {
		owner.Close()
		return nil, nil
	}
	return owner, nil
}

// launch starts cmd detached from our session and stdio, with its stderr
// kept in n.stderr, and reaps it in the background.
func (n *Network) launch(cmd *exec.Cmd) error {
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer devnull.Close()
	cmd.Stdin, cmd.Stdout = devnull, devnull
	n.stderr = newTailBuffer(8 << 10)
	cmd.Stderr = n.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setsid: true,
		// If our thread dies without Stop, so does the network process.
		Pdeathsig: syscall.SIGKILL,
	}
	pidfd := -1
	cmd.SysProcAttr.PidFD = &pidfd
	if err := startWithDefaultSIGPIPE(cmd.Start); err != nil {
		return fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	n.cmd, n.PID, n.pidfd = cmd, cmd.Process.Pid, pidfd
	n.done = make(chan struct{})
	go func() {
		n.waitErr = cmd.Wait()
		if n.pidfd >= 0 {
			unix.Close(n.pidfd)
		}
		close(n.done)
	}()
	return nil
}

// sigpipeMu serializes starts that briefly stop ignoring SIGPIPE.
var sigpipeMu sync.Mutex

// startWithDefaultSIGPIPE runs start so that the new process begins with
// SIGPIPE at its default disposition even when this process ignores it (the
// forwarder calls signal.Ignore(SIGPIPE)). An ignored signal stays ignored
// across exec, and Debian 12's pasta (2023-03-09) checks the old handler
// that signal(SIGPIPE, SIG_IGN) returns as if it were an error: with SIG_IGN
// inherited it exits with "Couldn't install signal handlers". Go resets
// only the signals it handles to SIG_DFL in the child, and signal.Reset does
// not undo signal.Ignore, so SIGPIPE is handled (Notify) while start forks.
func startWithDefaultSIGPIPE(start func() error) error {
	sigpipeMu.Lock()
	defer sigpipeMu.Unlock()
	if !signal.Ignored(syscall.SIGPIPE) {
		return start()
	}
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGPIPE)
	defer signal.Ignore(syscall.SIGPIPE) // ignored again, and c unregistered
	return start()
}

// failed stops what was started and wraps err with the tool's stderr.
func (n *Network) failed(err error) error {
	_ = n.Stop()
	return fmt.Errorf("%w%s", err, n.stderr.suffix())
}

// tailBuffer keeps the last bytes a process wrote, minus syslog noise.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{max: max} }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append([]byte(nil), t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []string
	for _, line := range bytes.Split(t.b, []byte("\n")) {
		s := strings.TrimSpace(string(line))
		// pasta reports every failed syslog write when /dev/log is absent.
		if s == "" || (strings.HasPrefix(s, "Failed to send ") && strings.HasSuffix(s, " to syslog")) {
			continue
		}
		out = append(out, s)
	}
	return strings.Join(out, "\n")
}

func (t *tailBuffer) suffix() string {
	if t == nil {
		return ""
	}
	if s := t.String(); s != "" {
		return ": " + s
	}
	return ""
}
