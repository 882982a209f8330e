package main

// `portkit run`: a RootlessKit-like launcher. The parent (this process)
// stays in the caller's namespaces and serves the forwarder (network
// process, port driver, API socket); the child is a re-exec of this binary
// in new user, mount and network namespaces that sets up its mounts and
// then becomes the command (run_child.go).

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/forwarder"
	"github.com/portkit/portkit/libport/network"
	"github.com/portkit/portkit/libport/state"
)

const runUsage = `Usage: portkit run [flags] [--] COMMAND [ARG...]

Runs COMMAND as root in new user, mount and network namespaces, gives the
network namespace an uplink (slirp4netns or pasta), publishes ports into it,
and serves RootlessKit's API on STATE_DIR/api.sock. Exits with COMMAND's
exit code. Accepts RootlessKit's flags, so it can stand in for rootlesskit.

Flags:
`

// runOptions are the parsed flags of `portkit run`.
type runOptions struct {
	stateDir            string
	net                 string
	mtu                 int
	cidr                string
	ipv6                bool
	disableHostLoopback bool
	portDriver          string
	slirpSandbox        string
	slirpSeccomp        string
	outboundAddr        string
	copyUp              []string
	propagation         string
	publish             []libport.Spec
	argv                []string
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

// specList is a repeatable -p/--publish flag.
type specList []libport.Spec

func (l *specList) String() string { return fmt.Sprint(len(*l)) }
func (l *specList) Set(v string) error {
	specs, err := libport.ParseSpec(v)
	if err != nil {
		return err
	}
	*l = append(*l, specs...)
	return nil
}

var netModes = []string{"slirp4netns", "pasta", "host", "none"}

func parseRunFlags(args []string, helpOut io.Writer) (*runOptions, error) {
	o := &runOptions{}
	fs := flag.NewFlagSet("portkit run", flag.ContinueOnError)
	var usage bytes.Buffer
	fs.SetOutput(&usage)
	fs.StringVar(&o.stateDir, "state-dir", "", "state directory (api.sock, child_pid); default: a new directory under the user's runtime directory, removed at exit")
	fs.StringVar(&o.net, "net", "slirp4netns", "network: "+strings.Join(netModes, ", "))
	fs.IntVar(&o.mtu, "mtu", 0, "MTU of the child's interface (default 65520)")
	fs.StringVar(&o.cidr, "cidr", network.DefaultCIDR, "IPv4 network of the child")
	fs.BoolVar(&o.ipv6, "ipv6", false, "give the child IPv6 too")
	fs.BoolVar(&o.disableHostLoopback, "disable-host-loopback", false, "forbid the child to reach the host's loopback through the gateway")
	portDriver := fs.String("port-driver", "", "port driver: builtin, slirp4netns, implicit (pasta only), socat, none (default builtin; none with --net=host)")
	fs.StringVar(&o.slirpSandbox, "slirp4netns-sandbox", "auto", "slirp4netns --enable-sandbox: auto, true, false")
	fs.StringVar(&o.slirpSeccomp, "slirp4netns-seccomp", "auto", "slirp4netns --enable-seccomp: auto, true, false")
	fs.StringVar(&o.outboundAddr, "outbound-addr", "", "source address for the child's outbound connections")
	var copyUp stringList
	fs.Var(&copyUp, "copy-up", "replace DIR in the child with a writable tmpfs copy (repeatable), e.g. --copy-up=/etc")
	fs.StringVar(&o.propagation, "propagation", "rprivate", "mount propagation of the child's /: rprivate, rslave, rshared, private, slave, shared")
	var publish specList
	fs.Var(&publish, "p", "publish a port: [parentIP:]parentPort:[childIP:]childPort/proto (repeatable)")
	fs.Var(&publish, "publish", "same as -p")
	fs.Usage = func() {
		fmt.Fprint(&usage, runUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			io.Copy(helpOut, &usage)
			return nil, err
		}
		msg := err.Error()
		if name, ok := strings.CutPrefix(msg, "flag provided but not defined: -"); ok {
			msg = fmt.Sprintf("unknown flag --%s (see portkit run --help for the flags it accepts)", strings.TrimPrefix(name, "-"))
		}
		return nil, errors.New(msg)
	}
	o.copyUp, o.publish, o.argv = copyUp, publish, fs.Args()
	o.portDriver = *portDriver
	return o, o.validate()
}

func (o *runOptions) validate() error {
	if len(o.argv) == 0 {
		return errors.New("no command: give one after the flags, e.g. portkit run -- sh")
	}
	if !contains(netModes, o.net) {
		return fmt.Errorf("--net=%s: want one of %s", o.net, strings.Join(netModes, ", "))
	}
	if o.portDriver == "" {
		o.portDriver = "builtin"
		if o.net == "host" {
			o.portDriver = "none"
		}
	}
	if !contains(forwarder.PortDrivers, o.portDriver) {
		return fmt.Errorf("--port-driver=%s: want one of %s", o.portDriver, strings.Join(forwarder.PortDrivers, ", "))
	}
	switch {
	case o.net == "host" && o.portDriver != "none":
		return fmt.Errorf("--port-driver=%s needs a child network namespace: --net=host has none (use --port-driver=none)", o.portDriver)
	case o.portDriver == "implicit" && o.net != "pasta":
		return fmt.Errorf("--port-driver=implicit needs --net=pasta (pasta forwards the ports itself)")
	case o.portDriver == "slirp4netns" && o.net != "slirp4netns":
		return fmt.Errorf("--port-driver=slirp4netns needs --net=slirp4netns")
	}
	if len(o.publish) > 0 && o.portDriver == "none" {
		return errors.New("-p needs a port driver: --port-driver=none publishes nothing")
	}
	for _, v := range []struct{ flag, val string }{{"slirp4netns-sandbox", o.slirpSandbox}, {"slirp4netns-seccomp", o.slirpSeccomp}} {
		if !contains([]string{"auto", "true", "false"}, v.val) {
			return fmt.Errorf("--%s=%s: want auto, true or false", v.flag, v.val)
		}
	}
	if _, ok := propagationFlags[o.propagation]; !ok {
		return fmt.Errorf("--propagation=%s: want one of rprivate, rslave, rshared, private, slave, shared", o.propagation)
	}
	for _, d := range o.copyUp {
		if !filepath.IsAbs(d) || filepath.Clean(d) == "/" {
			return fmt.Errorf("--copy-up=%s: want an absolute directory other than /", d)
		}
	}
	if o.net == "slirp4netns" || o.net == "pasta" {
		n := o.networkConfig("")
		n.NetnsPath = "/proc/self/ns/net" // checked for real at start
		n.Default()
		if err := n.Validate(); err != nil {
			return err
		}
	}
	return nil
}

func contains(list []string, v string) bool {
	for _, s := range list {
		if s == v {
			return true
		}
	}
	return false
}

// networkConfig is the network the flags ask for; sandbox and seccomp
// "auto" become true where the installed slirp4netns supports them.
func (o *runOptions) networkConfig(netnsPath string) network.Config {
	n := network.Config{
		Backend: o.net, NetnsPath: netnsPath, MTU: o.mtu, CIDR: o.cidr, IPv6: o.ipv6,
		DisableHostLoopback: o.disableHostLoopback, OutboundAddr: o.outboundAddr,
	}
	if o.net == "slirp4netns" {
		feat, _ := network.DetectSlirp4netns()
		n.Sandbox = o.slirpSandbox == "true" || (o.slirpSandbox == "auto" && feat.Sandbox)
		n.Seccomp = o.slirpSeccomp == "true" || (o.slirpSeccomp == "auto" && feat.Seccomp)
	}
	return n
}

func init() {
	commands["run"] = command{
		summary: "run a command in new user, mount and network namespaces with published ports (RootlessKit's place)",
		run:     exitWith(runMain),
	}
}

// runMain is `portkit run ARGS...`; it returns the exit code.
func runMain(args []string) int {
	o, err := parseRunFlags(args, stdout)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		return 1
	}
	code, err := o.run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// stateFiles may be in a --state-dir that already exists: RootlessKit's and
// portkit's own names, left by an earlier run. Anything else means the
// directory is not a state directory and is refused (it is removed at exit).
var stateFiles = map[string]bool{
	state.APISocket: true, state.ChildPIDFile: true, state.LockFile: true, state.ForwarderFile: true,
	state.SupervisorPID: true, state.NetworkPID: true, state.ConfigFile: true, state.PortsFile: true,
	state.LogFile: true, "slirp4netns.sock": true, resolvConfFile: true,
	"netns": true, // RootlessKit 2 --detach-netns leaves this
}

// resolvConfFile is the child's generated resolv.conf, in the state dir.
const resolvConfFile = "resolv.conf"

func openRunStateDir(path string) (*state.Dir, error) {
	if path == "" {
		base, err := state.BaseDir()
		if err != nil {
			return nil, err
		}
		if path, err = os.MkdirTemp(base, "run-"); err != nil {
			return nil, fmt.Errorf("create a state dir under %s: %w", base, err)
		}
		return state.Open(path)
	}
	if ents, err := os.ReadDir(path); err == nil {
		for _, e := range ents {
			if !stateFiles[e.Name()] {
				return nil, fmt.Errorf("--state-dir=%s holds %s, which is not a state file: portkit run removes its state dir at exit, so give an empty or new directory", path, e.Name())
			}
		}
	}
	return state.Create(path)
}

// run starts the child and the forwarder, waits for the command, and
// cleans up. It returns the command's exit code.
func (o *runOptions) run() (code int, err error) {
	dir, err := openRunStateDir(o.stateDir)
	if err != nil {
		return 1, err
	}
	defer func() {
		if rerr := dir.RemoveAll(); rerr != nil && err == nil {
			err = rerr
		}
	}()

	// Signals that arrive during set-up are forwarded once the child exists.
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT,
		syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH)
	defer signal.Stop(sigc)

	// Orphans of the command (daemons it leaves) are re-parented to us, so
	// we can reap them after killing them (PID 1 here does not reap).
	_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	child, err := o.startChild()
	if err != nil {
		return 1, err
	}
	userns, nsErr := nsID(child.cmd.Process.Pid, "user")
	// Whatever way the command ends, nothing that runs in its user
	// namespace may outlive run: it would keep the namespaces alive.
	defer func() {
		if nsErr == nil {
			killUserns(userns)
		}
	}()
	exited := make(chan struct{})
	go func() { _ = child.cmd.Wait(); close(exited) }()
	forwardDone := make(chan struct{})
	go func() {
		defer close(forwardDone)
		for {
			select {
			case s := <-sigc:
				_ = child.cmd.Process.Signal(s)
			case <-exited:
				return
			}
		}
	}()
	abort := func(err error) (int, error) {
		child.syncW.Close()
		_ = child.cmd.Process.Kill()
		<-exited
		<-forwardDone
		return 1, err
	}

	if err := child.mapping.mapChild(child.cmd.Process.Pid); err != nil {
		return abort(err)
	}
	if _, err := io.WriteString(child.syncW, "mapped\n"); err != nil {
		return abort(fmt.Errorf("child exited before it was mapped: %w", err))
	}

	// The forwarder serves until the command ends.
	fwdCtx, stopForwarder := context.WithCancel(context.Background())
	fwdErr := make(chan error, 1)
	fwdReady := make(chan struct{})
	fcfg := o.forwarderConfig(dir.Path(), child.cmd.Process.Pid)
	go func() { fwdErr <- forwarder.Run(fwdCtx, fcfg, func() { close(fwdReady) }) }()
	stopFwd := func() error {
		stopForwarder()
		return <-fwdErr
	}
	select {
	case <-fwdReady:
	case err := <-fwdErr:
		stopForwarder()
		return abort(err)
	case <-exited:
		stopFwd()
		return abort(errors.New("the child exited during set-up"))
	}

	plan := childPlan{Net: o.net, CopyUp: o.copyUp, Propagation: o.propagation, Argv: o.argv}
	plan.Env = append(childEnv(), "ROOTLESSKIT_STATE_DIR="+dir.Path(), "PORTKIT_STATE_DIR="+dir.Path(),
		"ROOTLESSKIT_PARENT_EUID="+strconv.Itoa(os.Geteuid()), "ROOTLESSKIT_PARENT_EGID="+strconv.Itoa(os.Getegid()))
	plan.Dir, _ = os.Getwd()
	if o.net == "slirp4netns" || o.net == "pasta" {
		conf, err := o.resolvConf()
		if err == nil {
			plan.ResolvConf = dir.Join(resolvConfFile)
			err = writeWorldReadable(plan.ResolvConf, conf)
		}
		if err != nil {
			stopFwd()
			return abort(fmt.Errorf("child resolv.conf: %w", err))
		}
	}
	b, _ := json.Marshal(plan)
	_, werr := child.syncW.Write(append(b, '\n'))
	child.syncW.Close()
	if werr != nil {
		stopFwd()
		return abort(fmt.Errorf("child exited during set-up: %w", werr))
	}
	// The status pipe reaches EOF when the child execs the command.
	status, _ := io.ReadAll(child.statusR)
	child.statusR.Close()
	if len(status) > 0 {
		stopFwd()
		<-exited
		<-forwardDone
		return parseChildStatus(string(status))
	}

	fwdReturned := false
	select {
	case <-exited:
	case err := <-fwdErr:
		// The forwarder returns by itself when the command has exited (it
		// watches the child), or when the network process or the API server
		// died under the command: then say so, and keep the command running
		// (as RootlessKit does).
		fwdReturned = true
		if err != nil {
			fmt.Fprintf(os.Stderr, "portkit run: warning: %v\n", err)
		}
		<-exited
	}
	<-forwardDone
	if fwdReturned {
		stopForwarder()
	} else if err := stopFwd(); err != nil {
		fmt.Fprintf(os.Stderr, "portkit run: warning: stopping the forwarder: %v\n", err)
	}
	return commandExitCode(child.cmd.ProcessState), nil
}

func parseChildStatus(s string) (int, error) {
	s = strings.TrimSpace(s)
	if rest, ok := strings.CutPrefix(s, "error "); ok {
		codeText, msg, _ := strings.Cut(rest, " ")
		if code, err := strconv.Atoi(codeText); err == nil {
			return code, errors.New(msg)
		}
	}
	return 1, fmt.Errorf("child: %s", s)
}

func commandExitCode(ps *os.ProcessState) int {
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ps.ExitCode()
}

// childEnv is our environment for the command, without our internal
// variables and without a stale state dir of an outer launcher.
func childEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch name {
		case runChildEnv, "ROOTLESSKIT_STATE_DIR", "PORTKIT_STATE_DIR", "ROOTLESSKIT_PARENT_EUID", "ROOTLESSKIT_PARENT_EGID":
			continue
		}
		env = append(env, kv)
	}
	return env
}

func (o *runOptions) forwarderConfig(stateDir string, childPID int) forwarder.Config {
	c := forwarder.Config{StateDir: stateDir, PortDriver: o.portDriver, Ports: o.publish}
	if o.net != "host" {
		c.ChildPID = childPID
		c.NetnsPath = fmt.Sprintf("/proc/%d/ns/net", childPID)
	}
	if o.net == "slirp4netns" || o.net == "pasta" {
		n := o.networkConfig(c.NetnsPath)
		c.Network = &n
	}
	return c
}

// resolvConf points the child at the network's DNS forwarder.
func (o *runOptions) resolvConf() ([]byte, error) {
	_, _, dns, err := network.ChildAddresses(o.cidr)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# generated by portkit run (--net=%s)\nnameserver %s\n", o.net, dns)
	if o.ipv6 && o.net == "slirp4netns" {
		b.WriteString("nameserver fd00::3\n")
	}
	return b.Bytes(), nil
}

// writeWorldReadable writes a new file readable by every user in the child
// (its non-root users need /etc/resolv.conf too); the 0700 state dir still
// keeps it from everyone else on the host.
func writeWorldReadable(path string, data []byte) error {
	_ = os.Remove(path)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// runChild is the started child and our ends of its pipes.
type runChild struct {
	cmd     *exec.Cmd
	mapping idMapping
	syncW   *os.File
	statusR *os.File
}

func (o *runOptions) startChild() (*runChild, error) {
	syncR, syncW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	statusR, statusW, err := os.Pipe()
	if err != nil {
		syncR.Close()
		syncW.Close()
		return nil, err
	}
	defer syncR.Close()
	defer statusW.Close()
	c := &runChild{mapping: planIDMapping(), syncW: syncW, statusR: statusR}
	flags := uintptr(syscall.CLONE_NEWUSER | syscall.CLONE_NEWNS)
	if o.net != "host" {
		flags |= syscall.CLONE_NEWNET
	}
	cmd := exec.Command("/proc/self/exe")
	cmd.Args = []string{"portkit-run-child"}
	cmd.Env = append(os.Environ(), runChildEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{syncR, statusW} // fds 3 and 4: childSyncFD, childStatusFD
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: flags,
		// The command must not outlive us, even if we are killed.
		Pdeathsig: syscall.SIGKILL,
	}
	c.mapping.apply(cmd.SysProcAttr)
	if err := cmd.Start(); err != nil {
		syncW.Close()
		statusR.Close()
		return nil, fmt.Errorf("start the child in new user+mount+network namespaces: %w%s", err, usernsHint(err))
	}
	c.cmd = cmd
	return c, nil
}

// usernsHint explains the usual reasons a user namespace cannot be made.
func usernsHint(err error) string {
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EINVAL) {
		return " (unprivileged user namespaces may be disabled: check sysctl kernel.unprivileged_userns_clone and user.max_user_namespaces)"
	}
	return ""
}

// nsInode identifies a namespace.
type nsInode struct{ dev, ino uint64 }

func nsID(pid int, kind string) (nsInode, error) {
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/%d/ns/%s", pid, kind), &st); err != nil {
		return nsInode{}, err
	}
	return nsInode{st.Dev, st.Ino}, nil
}

// killUserns SIGKILLs every process left in the user namespace ns (we own
// it, so we may) and reaps those that were re-parented to us.
func killUserns(ns nsInode) {
	self := os.Getpid()
	for range 100 {
		found := 0
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == self {
				continue
			}
			if id, err := nsID(pid, "user"); err != nil || id != ns {
				continue
			}
			if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && isZombie(st) {
				reapIfOurs(pid)
				continue
			}
			found++
			_ = unix.Kill(pid, unix.SIGKILL)
			reapIfOurs(pid)
		}
		if found == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func isZombie(stat []byte) bool {
	i := bytes.LastIndexByte(stat, ')')
	return i >= 0 && i+2 < len(stat) && (stat[i+2] == 'Z' || stat[i+2] == 'X')
}

// reapIfOurs collects pid's exit status if it is our (adopted) child.
func reapIfOurs(pid int) {
	var ws unix.WaitStatus
	_, _ = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
}
