// Package socat is the deprecated socat port driver, kept for parity with
// RootlessKit's --port-driver=socat: per published port one socat listens in
// the parent netns and, per connection (or per UDP client), runs
//
//	nsenter --preserve-credentials --user=<owner userns> --net=<child netns> socat STDIO TCP4:<childIP>:<childPort>
//
// It costs a process per connection and a userspace copy in each direction;
// use the builtin driver instead. What it keeps: the child sees every client
// as the child IP's loopback (127.0.0.1 or ::1), not the real client.
//
// Each listening socat is supervised: started in its own session with no
// inherited stdio and SIGKILL on our death, restarted (with a log line) if it
// dies, and killed with its connection processes when the port is removed.
// If the forwarder itself is killed, the listener dies with it but
// connections already open live until they end (UDP ones after UDPIdleTimeout).
package socat

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/netns"
)

// UDPIdleTimeout ends a UDP client's socat after this long without traffic.
const UDPIdleTimeout = 60 * time.Second

// startTimeout bounds how long Add waits for socat to listen.
const startTimeout = 5 * time.Second

// Driver publishes ports with socat processes.
type Driver struct {
	netnsPath string
	userns    *os.File // the child netns's owning userns; nil when it is our own
	socat     string
	nsenter   string

	logMu sync.Mutex
	logf  func(format string, args ...any)

	mu     sync.Mutex
	ports  map[int]*port
	closed bool
}

// New returns a driver that forwards into the network namespace at
// netnsPath (e.g. /proc/PID/ns/net or a CNI netns path). It checks that socat
// and nsenter are installed and that this process can enter that namespace.
func New(netnsPath string) (*Driver, error) {
	socatPath, err := exec.LookPath("socat")
	if err != nil {
		return nil, fmt.Errorf("socat port driver: socat is not installed (%w): install it (apt-get install socat) or use --port-driver=builtin", err)
	}
	nsenterPath, err := exec.LookPath("nsenter")
	if err != nil {
		return nil, fmt.Errorf("socat port driver: nsenter is not installed (%w): install util-linux or use --port-driver=builtin", err)
	}
	if i := strings.IndexFunc(netnsPath, unsafePathRune); i >= 0 || netnsPath == "" {
		return nil, fmt.Errorf("socat port driver: netns path %q cannot be passed through socat's EXEC (it splits on spaces and parses quotes): use a path of letters, digits and /._-+@=", netnsPath)
	}
	userns, err := netns.OwnerUserns(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("socat port driver: netns %s: %w", netnsPath, err)
	}
	if own, err := sameNamespace(userns, "/proc/self/ns/user"); err != nil {
		userns.Close()
		return nil, fmt.Errorf("socat port driver: %w", err)
	} else if own {
		// nsenter cannot enter the user namespace it is already in (EINVAL).
		userns.Close()
		userns = nil
	}
	d := &Driver{netnsPath: netnsPath, userns: userns, socat: socatPath, nsenter: nsenterPath, ports: map[int]*port{}, logf: log.Printf}
	if err := d.probe(); err != nil {
		d.closeUserns()
		return nil, fmt.Errorf("socat port driver: %w", err)
	}
	return d, nil
}

func unsafePathRune(r rune) bool {
	return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/._-+@=", r))
}

func sameNamespace(f *os.File, path string) (bool, error) {
	var a, b unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &a); err != nil {
		return false, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	if err := unix.Stat(path, &b); err != nil {
		return false, fmt.Errorf("stat %s: %w", path, err)
	}
	return a.Dev == b.Dev && a.Ino == b.Ino, nil
}

// probe runs the per-connection command once with socat -V, so a netns we
// cannot enter fails here rather than on every connection.
func (d *Driver) probe() error {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	args := append(d.nsenterArgs(), "socat", "-V")
	cmd := exec.CommandContext(ctx, d.nsenter, args...)
	if d.userns != nil {
		cmd.ExtraFiles = []*os.File{d.userns}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("cannot run socat inside netns %s (nsenter %s): %w: %s", d.netnsPath, strings.Join(args, " "), err, lastLines(out, 3))
	}
	return nil
}

// nsenterArgs enter the child's user namespace (passed as fd 3) and netns.
func (d *Driver) nsenterArgs() []string {
	args := []string{"--preserve-credentials"}
	if d.userns != nil {
		args = append(args, "--user=/proc/self/fd/3")
	}
	return append(args, "--net="+d.netnsPath)
}

// SetLogf sets where the driver reports socat's errors and restarts
// (default: the standard logger).
func (d *Driver) SetLogf(logf func(format string, args ...any)) {
	d.logMu.Lock()
	defer d.logMu.Unlock()
	d.logf = logf
}

func (d *Driver) log(format string, args ...any) {
	d.logMu.Lock()
	logf := d.logf
	d.logMu.Unlock()
	if logf != nil {
		logf(format, args...)
	}
}

// Info names the driver; socat reaches the child's loopback.
func (d *Driver) Info() libport.DriverInfo {
	return libport.DriverInfo{Driver: "socat", Protos: append([]string(nil), libport.Protos...)}
}

// Add starts a supervised socat for spec and returns once it listens.
func (d *Driver) Add(ctx context.Context, id int, spec libport.Spec) error {
	args, err := d.socatArgs(spec)
	if err != nil {
		return fmt.Errorf("port spec %s: %w", spec, err)
	}
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return fmt.Errorf("port spec %s: socat port driver is closed", spec)
	}
	if _, dup := d.ports[id]; dup {
		d.mu.Unlock()
		return fmt.Errorf("port spec %s: id %d is already forwarded", spec, id)
	}
	p := &port{d: d, id: id, spec: spec, args: args, stop: make(chan struct{}), done: make(chan struct{})}
	d.ports[id] = p
	d.mu.Unlock()

	ready := make(chan error, 1)
	go p.supervise(ready)
	ctx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	select {
	case err = <-ready:
	case <-ctx.Done():
		err = fmt.Errorf("socat did not start listening: %w", ctx.Err())
	}
	if err != nil {
		p.shutdown()
		d.mu.Lock()
		delete(d.ports, id)
		d.mu.Unlock()
		return fmt.Errorf("port spec %s: %w", spec, err)
	}
	return nil
}

// socatArgs builds the listening socat's command line for spec.
func (d *Driver) socatArgs(spec libport.Spec) ([]string, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	parent := net.ParseIP(spec.ParentIP)
	var listen string
	switch {
	case spec.Family() == 4 || parent.To4() != nil:
		if parent == nil {
			parent = net.IPv4zero
		}
		listen = fmt.Sprintf("%s4-LISTEN:%d,bind=%s", upper(spec), spec.ParentPort, parent)
	case spec.Family() == 6 || parent != nil && !parent.IsUnspecified():
		if parent == nil {
			parent = net.IPv6unspecified
		}
		listen = fmt.Sprintf("%s6-LISTEN:%d,bind=[%s],ipv6only=1", upper(spec), spec.ParentPort, parent)
	default:
		// Plain tcp/udp on no address or "::" is dual-stack, as in every portkit driver.
		listen = fmt.Sprintf("%s6-LISTEN:%d,bind=[::],ipv6only=0", upper(spec), spec.ParentPort)
	}
	listen += ",reuseaddr,fork"

	child := net.ParseIP(spec.ChildIP)
	if child == nil {
		child = net.IPv4(127, 0, 0, 1)
		if spec.Family() == 6 || parent != nil && parent.To4() == nil && !parent.IsUnspecified() {
			child = net.IPv6loopback
		}
	}
	var connect string
	if child.To4() != nil {
		connect = fmt.Sprintf("%s4:%s:%d", upper(spec), child, spec.ChildPort)
	} else {
		connect = fmt.Sprintf("%s6:[%s]:%d", upper(spec), child, spec.ChildPort)
	}
	inner := []string{d.nsenter}
	inner = append(inner, d.nsenterArgs()...)
	inner = append(inner, d.socat)
	if spec.Transport() == "udp" {
		// UDP has no end: a client's socat ends after this much silence.
		inner = append(inner, "-T", strconv.Itoa(int(UDPIdleTimeout.Seconds())))
	}
	inner = append(inner, "STDIO", connect)
	// nofork: the per-connection child execs nsenter with the accepted
	// socket as its stdio (one process per connection, datagram boundaries
	// kept for UDP). The quotes keep socat from parsing ':' and ','.
	exec := `EXEC:"` + strings.Join(inner, " ") + `",nofork`
	return []string{"-d", "-d", listen, exec}, nil
}

func upper(spec libport.Spec) string { return strings.ToUpper(spec.Transport()) }

// Remove kills the socat for id and the connections it serves.
func (d *Driver) Remove(ctx context.Context, id int) error {
	d.mu.Lock()
	p, ok := d.ports[id]
	if ok {
		delete(d.ports, id)
	}
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("unknown id: %d", id)
	}
	p.shutdown()
	return nil
}

// Close removes every port and releases the driver.
func (d *Driver) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	ports := d.ports
	d.ports = map[int]*port{}
	d.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range ports {
		wg.Add(1)
		go func() { defer wg.Done(); p.shutdown() }()
	}
	wg.Wait()
	d.closeUserns()
	return nil
}

func (d *Driver) closeUserns() {
	if d.userns != nil {
		d.userns.Close()
	}
}

// Listeners returns the PID of each port's listening socat, by ID (for
// checks and diagnostics); a port between restarts is absent.
func (d *Driver) Listeners() map[int]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[int]int{}
	for id, p := range d.ports {
		if pid := p.pid(); pid > 0 {
			out[id] = pid
		}
	}
	return out
}

// port is one published port and its supervisor.
type port struct {
	d    *Driver
	id   int
	spec libport.Spec
	args []string

	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}

	mu  sync.Mutex
	cur *exec.Cmd
	// old holds the session IDs of listeners that died on their own: their
	// open connections live on and are killed with the port.
	old []int
}

func (p *port) pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cur == nil || p.cur.Process == nil {
		return 0
	}
	return p.cur.Process.Pid
}

func (p *port) shutdown() {
	p.stopOnce.Do(func() { close(p.stop) })
	<-p.done
}

// supervise runs socat until stopped, restarting it when it dies. The first
// start's outcome goes to ready.
func (p *port) supervise(ready chan<- error) {
	defer close(p.done)
	// Pdeathsig fires when the thread that started socat exits, not the
	// process: keep this goroutine on one thread that only ends after socat.
	runtime.LockOSThread()
	backoff := 100 * time.Millisecond
	for first := true; ; first = false {
		cmd, exited, tail, err := p.start()
		if err != nil {
			if first {
				ready <- err
				return
			}
			p.d.log("socat port driver: port %d (%s): restart failed: %v; retrying in %v", p.id, p.spec, err, backoff)
		} else {
			if first {
				ready <- nil
			}
			started := time.Now()
			select {
			case <-p.stop:
				p.kill(cmd, exited)
				p.killOld()
				return
			case err := <-exited:
				if time.Since(started) > 10*time.Second {
					backoff = 100 * time.Millisecond
				}
				p.d.log("socat port driver: port %d (%s): socat (pid %d) exited: %v: %s; restarting in %v",
					p.id, p.spec, cmd.Process.Pid, err, tail.String(), backoff)
				p.mu.Lock()
				p.old = append(p.old, cmd.Process.Pid)
				p.mu.Unlock()
			}
		}
		select {
		case <-p.stop:
			p.killOld()
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// start runs socat and waits until it listens. exited delivers its Wait result.
func (p *port) start() (*exec.Cmd, <-chan error, *tailBuffer, error) {
	cmd := exec.Command(p.d.socat, p.args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGKILL}
	if p.d.userns != nil {
		cmd.ExtraFiles = []*os.File{p.d.userns} // fd 3, inherited by every connection's nsenter
	}
	// Our own pipe, not StderrPipe: connection processes inherit the write
	// end and may outlive the listener, and Wait must not wait for them.
	r, w, err := os.Pipe()
	if err != nil {
		return nil, nil, nil, err
	}
	cmd.Stderr = w
	err = cmd.Start()
	w.Close()
	if err != nil {
		r.Close()
		return nil, nil, nil, fmt.Errorf("start socat: %w", err)
	}
	p.mu.Lock()
	p.cur = cmd
	p.mu.Unlock()

	tail := &tailBuffer{}
	listening := make(chan struct{})
	logDone := make(chan struct{})
	go func() {
		defer close(logDone)
		defer r.Close()
		p.readLog(r, tail, listening)
	}()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case <-listening:
		return cmd, exited, tail, nil
	case err := <-exited:
		select { // its last words, for the error
		case <-logDone:
		case <-time.After(100 * time.Millisecond):
		}
		return nil, nil, nil, fmt.Errorf("socat exited before listening (%v): %s", err, tail.String())
	case <-time.After(startTimeout):
		_ = unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
		<-exited
		return nil, nil, nil, fmt.Errorf("socat did not listen within %v: %s", startTimeout, tail.String())
	}
}

// readLog passes socat's warnings and errors on (its notices, one set per
// connection, only mark readiness) and keeps the last lines for errors.
func (p *port) readLog(r io.Reader, tail *tailBuffer, listening chan<- struct{}) {
	sc := bufio.NewScanner(r)
	heard := false
	for sc.Scan() {
		line := sc.Text()
		if !heard && strings.Contains(line, " N listening on ") {
			heard = true
			close(listening)
			continue
		}
		if strings.Contains(line, " N ") {
			continue
		}
		tail.add(line)
		if heard {
			p.d.log("socat port driver: port %d (%s): %s", p.id, p.spec, line)
		}
	}
	_, _ = io.Copy(io.Discard, r)
}

// kill stops the listening socat and every connection process it forked.
// Connection processes go first, while the listener can still reap them:
// orphans would be left to init, which on some machines never reaps.
func (p *port) kill(cmd *exec.Cmd, exited <-chan error) {
	leader := cmd.Process.Pid
	_ = unix.Kill(leader, unix.SIGSTOP) // no new connections while we sweep
	for _, pid := range members(leader, false) {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	_ = unix.Kill(leader, unix.SIGCONT)
	deadline := time.Now().Add(500 * time.Millisecond)
	for len(members(leader, true)) > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	_ = unix.Kill(leader, unix.SIGKILL)
	<-exited
	// Any it forked in the moment it ran again.
	killSession(leader)
}

// killSession kills the live processes of session sid other than its
// leader and waits (briefly) until they are dead.
func killSession(sid int) {
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		pids := members(sid, false)
		if len(pids) == 0 {
			return
		}
		for _, pid := range pids {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// killOld kills the connections left by listeners that died on their own.
func (p *port) killOld() {
	p.mu.Lock()
	old := p.old
	p.old = nil
	p.mu.Unlock()
	for _, sid := range old {
		killSession(sid)
	}
}

// members lists the processes of session sid other than its leader: a
// listening socat's connection processes (Setsid made the listener's PID the
// session ID). Zombies are listed only when asked for.
func members(sid int, zombies bool) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == sid {
			continue
		}
		st, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		state, s, ok := statFields(st)
		if ok && s == sid && (zombies || state != 'Z') {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids
}

// statFields reads the state and session ID from /proc/PID/stat (after the
// command name, which may itself hold spaces and parentheses).
func statFields(st []byte) (state byte, sid int, ok bool) {
	i := bytes.LastIndexByte(st, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(string(st[i+1:]))
	if len(f) < 4 {
		return 0, 0, false
	}
	sid, err := strconv.Atoi(f[3])
	return f[0][0], sid, err == nil
}

// tailBuffer keeps socat's last few log lines for error messages.
type tailBuffer struct {
	mu    sync.Mutex
	lines []string
}

func (t *tailBuffer) add(line string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lines = append(t.lines, line)
	if len(t.lines) > 5 {
		t.lines = t.lines[1:]
	}
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.lines) == 0 {
		return "(socat said nothing)"
	}
	return strings.Join(t.lines, "; ")
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "; ")
}

var _ libport.Driver = (*Driver)(nil)
