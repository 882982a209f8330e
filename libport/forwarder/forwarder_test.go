package forwarder

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/api"
	"github.com/portkit/portkit/libport/network"
	"github.com/portkit/portkit/libport/state"
)

// Actions the test binary performs when re-executed as another user (see
// asUser): the code under test runs unprivileged, as in real use.
const envAction = "FORWARDER_TEST_ACTION"

func TestMain(m *testing.M) {
	if act := os.Getenv(envAction); act != "" {
		os.Exit(testAction(act, os.Getenv("FORWARDER_TEST_ARG")))
	}
	testenv.Main(m)
}

func testAction(act, arg string) int {
	var err error
	switch act {
	case "spawn":
		var cfg Config
		if err = json.Unmarshal([]byte(arg), &cfg); err == nil {
			var pid int
			if pid, err = Spawn(cfg); err == nil {
				fmt.Println(pid)
			}
		}
	case "stop":
		err = Stop(arg)
	case "check":
		err = Check(arg)
	case "dial":
		var c net.Conn
		if c, err = net.Dial("unix", arg); err == nil {
			c.Close()
		}
	case "addport":
		dir, spec, _ := strings.Cut(arg, " ")
		var specs []libport.Spec
		if specs, err = libport.ParseSpec(spec); err == nil {
			var st libport.Status
			st, err = api.NewClient(filepath.Join(dir, state.APISocket)).AddPort(context.Background(), specs[0])
			fmt.Println(st.ID)
		}
	default:
		err = fmt.Errorf("unknown action %q", act)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// runner re-executes the test binary as a user.
type runner struct {
	bin string
	u   *testenv.User
}

func newRunner(t *testing.T, u *testenv.User) *runner {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "portkit-fwdbin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "forwarder.test")
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return &runner{bin: bin, u: u}
}

func (r *runner) cmd(act, arg string) *exec.Cmd {
	cmd := r.u.Cmd(r.bin)
	cmd.Env = append(cmd.Env, envAction+"="+act, "FORWARDER_TEST_ARG="+arg)
	return cmd
}

func (r *runner) run(t *testing.T, act, arg string) (string, error) {
	t.Helper()
	cmd := r.cmd(act, arg)
	done := make(chan struct{})
	var out []byte
	var err error
	go func() { out, err = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(90 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%s %s: hung", act, arg)
	}
	return strings.TrimSpace(string(out)), err
}

// spawn runs Spawn as the runner's user with stdout a pipe, reads that pipe
// to EOF (which must come although the forwarder lives on) and returns the
// supervisor's PID. Stop runs at cleanup.
func (r *runner) spawn(t *testing.T, cfg Config) int {
	pid, _ := r.spawnPipes(t, cfg)
	return pid
}

// spawnPipes is spawn that also returns the "pipe:[INODE]" names of the
// spawning process's stdout and stderr.
func (r *runner) spawnPipes(t *testing.T, cfg Config) (int, []string) {
	t.Helper()
	js, _ := json.Marshal(cfg)
	cmd := r.cmd("spawn", string(js))
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer outR.Close()
	defer errR.Close()
	var pipes []string
	for _, f := range []*os.File{outR, errR} {
		var st syscall.Stat_t
		syscall.Fstat(int(f.Fd()), &st)
		pipes = append(pipes, fmt.Sprintf("pipe:[%d]", st.Ino))
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	err = cmd.Start()
	outW.Close()
	errW.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if o, err := r.run(t, "stop", cfg.StateDir); err != nil {
			t.Errorf("cleanup stop: %v: %s", err, o)
		}
	})
	type result struct{ out, err []byte }
	got := make(chan result, 1)
	go func() {
		errc := make(chan []byte, 1)
		go func() { b, _ := io.ReadAll(errR); errc <- b }()
		b, _ := io.ReadAll(outR)
		got <- result{b, <-errc}
	}()
	var res result
	select {
	case res = <-got:
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("the spawning process's stdout/stderr pipes never reached EOF: the forwarder holds them")
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("spawn: %v: %s", err, res.err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(res.out)))
	if err != nil {
		t.Fatalf("spawn printed %q: %v (stderr %s)", res.out, err, res.err)
	}
	return pid, pipes
}

func fileMode(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode()
}

// readProcess reads a process record of dir as root would (no ownership check).
func readProcess(t *testing.T, dir, name string) state.Process {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatalf("read %s: %v", name, err)
	}
	p, err := state.ParseProcess(string(b))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func startRun(t *testing.T, cfg Config) (cancel func() error) {
	t.Helper()
	ctx, stop := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		stop()
		t.Fatalf("Run: %v", err)
	case <-time.After(30 * time.Second):
		stop()
		t.Fatal("Run not ready after 30 s")
	}
	var once bool
	var result error
	cancel = func() error {
		if !once {
			once = true
			stop()
			select {
			case result = <-done:
			case <-time.After(20 * time.Second):
				result = errors.New("Run did not return 20 s after cancel")
			}
		}
		return result
	}
	t.Cleanup(func() { cancel() })
	return cancel
}

func TestRunNoneServesInfoAndRemovesItsFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "attachment")
	cancel := startRun(t, Config{StateDir: dir, PortDriver: "none"})

	if m := fileMode(t, dir); m.Perm() != 0o700 {
		t.Errorf("state dir mode %v, want 0700", m)
	}
	sock := filepath.Join(dir, state.APISocket)
	if m := fileMode(t, sock); m.Type() != os.ModeSocket || m.Perm() != 0o600 {
		t.Errorf("api.sock mode %v, want a 0600 socket", m)
	}
	c := api.NewClient(sock)
	info, err := c.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.PortDriver == nil || info.PortDriver.Driver != "none" || info.NetworkDriver == nil || info.NetworkDriver.Driver != "host" || info.StateDir != dir {
		t.Errorf("info = %+v", info)
	}
	_, err = c.AddPort(context.Background(), libport.Spec{Proto: "tcp", ParentPort: 8080, ChildPort: 80})
	if err == nil || !strings.Contains(err.Error(), libport.ErrNoPortDriver.Error()) {
		t.Errorf("add through none: %v", err)
	}
	var pf portsFile
	b, _ := os.ReadFile(filepath.Join(dir, state.PortsFile))
	if err := json.Unmarshal(b, &pf); err != nil || len(pf.Ports) != 0 {
		t.Errorf("ports.json = %s (%v)", b, err)
	}

	if err := cancel(); err != nil {
		t.Fatalf("Run after cancel: %v", err)
	}
	if _, err := os.Lstat(dir); !os.IsNotExist(err) {
		entries, _ := os.ReadDir(dir)
		t.Errorf("state dir left behind (%v): %v", err, entries)
	}
}

func TestRunKeepsAPreexistingDirAndOthersFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "attachment")
	os.Mkdir(dir, 0o700)
	os.WriteFile(filepath.Join(dir, "users-file"), []byte("x"), 0o600)
	cancel := startRun(t, Config{StateDir: dir, PortDriver: "none", ChildPID: os.Getpid()})
	if b, _ := os.ReadFile(filepath.Join(dir, state.ChildPIDFile)); string(b) != strconv.Itoa(os.Getpid()) {
		t.Errorf("child_pid = %q", b)
	}
	if err := cancel(); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 || entries[0].Name() != "users-file" {
		t.Errorf("after stop the dir holds %v, want only users-file", entries)
	}
}

func TestSecondForwarderOnOneStateDirIsRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "attachment")
	startRun(t, Config{StateDir: dir, PortDriver: "none"})
	err := Run(context.Background(), Config{StateDir: dir, PortDriver: "none"}, nil)
	if err == nil || !strings.Contains(err.Error(), "already served") || !strings.Contains(err.Error(), "pid "+strconv.Itoa(os.Getpid())) {
		t.Fatalf("second Run: %v", err)
	}
	if _, err := Spawn(Config{StateDir: dir, PortDriver: "none"}); err == nil || !strings.Contains(err.Error(), "already served") {
		if err == nil {
			Stop(dir) // never leave a stray supervisor behind
		}
		t.Fatalf("Spawn on a served dir: %v", err)
	}
	// The first one is untouched.
	if _, err := api.NewClient(filepath.Join(dir, state.APISocket)).Info(context.Background()); err != nil {
		t.Fatalf("first forwarder after the refusals: %v", err)
	}
}

func TestBadConfigIsRefusedAndLeavesNothing(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "attachment")
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{StateDir: dir, PortDriver: "bogus"}, "none, builtin, slirp4netns, implicit, socat"},
		{Config{StateDir: dir, PortDriver: ""}, "unknown port driver"},
		{Config{PortDriver: "none"}, "--state-dir"},
		{Config{StateDir: dir, PortDriver: "builtin"}, "--netns PATH or --child-pid PID"},
		{Config{StateDir: dir, PortDriver: "implicit"}, "pasta"},
		{Config{StateDir: dir, PortDriver: "none", Ports: []libport.Spec{{Proto: "tcp", ParentPort: 0, ChildPort: 80}}}, "port"},
		{Config{StateDir: dir, PortDriver: "none", ChildIP: "nope"}, "not an IP"},
	} {
		err := Run(context.Background(), tc.cfg, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Run(%+v) = %v, want an error mentioning %q", tc.cfg, err, tc.want)
		}
		if _, err := Spawn(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Spawn(%+v) = %v, want an error mentioning %q", tc.cfg, err, tc.want)
		}
	}
	// A driver failing at start (none refuses every port) leaves nothing either.
	err := Run(context.Background(), Config{StateDir: dir, PortDriver: "none", Ports: []libport.Spec{{Proto: "tcp", ParentPort: 8080, ChildPort: 80}}}, nil)
	if err == nil || !strings.Contains(err.Error(), "8080:80/tcp") {
		t.Errorf("Run with a port none refuses: %v", err)
	}
	if _, err := Spawn(Config{StateDir: dir, PortDriver: "none", Ports: []libport.Spec{{Proto: "tcp", ParentPort: 8080, ChildPort: 80}}}); err == nil || !strings.Contains(err.Error(), "8080:80/tcp") {
		t.Errorf("Spawn with a port none refuses: %v", err)
	}
	if entries, _ := os.ReadDir(base); len(entries) != 0 {
		t.Errorf("left behind: %v", entries)
	}
}

func TestStateDirAttacksAreRefused(t *testing.T) {
	base := t.TempDir()
	loose := filepath.Join(base, "loose")
	os.Mkdir(loose, 0o755)
	if err := Run(context.Background(), Config{StateDir: loose, PortDriver: "none"}, nil); err == nil || !strings.Contains(err.Error(), "chmod 700") {
		t.Errorf("loose dir: %v", err)
	}
	target := filepath.Join(base, "target")
	os.Mkdir(target, 0o700)
	link := filepath.Join(base, "link")
	os.Symlink(target, link)
	if _, err := Spawn(Config{StateDir: link, PortDriver: "none"}); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("symlinked dir: %v", err)
	}
	if entries, _ := os.ReadDir(target); len(entries) != 0 {
		t.Errorf("wrote through the symlink: %v", entries)
	}
	// A planted symlink where the forwarder writes its pid file.
	dir := filepath.Join(base, "planted")
	os.Mkdir(dir, 0o700)
	victim := filepath.Join(base, "victim")
	os.WriteFile(victim, []byte("precious"), 0o600)
	os.Symlink(victim, filepath.Join(dir, state.ConfigFile))
	os.Symlink(victim, filepath.Join(dir, state.LockFile))
	if err := Run(context.Background(), Config{StateDir: dir, PortDriver: "none"}, nil); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("planted lock symlink: %v", err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious" {
		t.Errorf("victim changed: %q", b)
	}
	if testenv.IsRoot() {
		u := testenv.Unprivileged(t)
		foreign := u.Dir(t)
		if err := Run(context.Background(), Config{StateDir: foreign, PortDriver: "none"}, nil); err == nil || !strings.Contains(err.Error(), "owned by uid") {
			t.Errorf("foreign dir: %v", err)
		}
		if err := Stop(foreign); err == nil || !strings.Contains(err.Error(), "owned by uid") {
			t.Errorf("Stop on a foreign dir: %v", err)
		}
	}
}

func TestStopIsIdempotentAndSparesReusedPIDs(t *testing.T) {
	base := t.TempDir()
	if err := Stop(filepath.Join(base, "never-existed")); err != nil {
		t.Errorf("Stop of a missing dir: %v", err)
	}
	// Records naming a live process with another start time: the PID was
	// reused by a stranger, who must not be signalled.
	stranger := exec.Command("sleep", "60")
	if err := stranger.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stranger.Process.Kill(); stranger.Wait() }()
	p, err := state.ProcessOf(stranger.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	stale := state.Process{PID: p.PID, StartTime: p.StartTime + 7}
	dir := filepath.Join(base, "stale")
	d, err := state.Create(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{state.SupervisorPID, state.ForwarderFile, state.NetworkPID} {
		d.WriteProcess(name, stale)
	}
	d.Close()
	if err := Stop(dir); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if !p.Alive() {
		t.Fatal("Stop signalled a process whose PID was reused")
	}
	if _, err := os.Lstat(dir); !os.IsNotExist(err) {
		t.Errorf("state dir still there: %v", err)
	}
	if err := Stop(dir); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

// TestSpawnDetachesAsUnprivilegedUser spawns a forwarder as the test user
// from a process whose stdout is a pipe (as libcni and runc run plugins and
// hooks): the pipe reaches EOF, the forwarder runs in its own session with
// no descriptor of the caller's, its files are private, another user cannot
// connect, and Stop (twice) leaves nothing.
func TestSpawnDetachesAsUnprivilegedUser(t *testing.T) {
	testenv.RequireRoot(t)
	u := testenv.Unprivileged(t)
	r := newRunner(t, u)
	dir := filepath.Join(u.Dir(t), "attachment")
	supPID, callerPipes := r.spawnPipes(t, Config{StateDir: dir, PortDriver: "none"})

	sup := readProcess(t, dir, state.SupervisorPID)
	fwd := readProcess(t, dir, state.ForwarderFile)
	if sup.PID != supPID || !sup.Alive() || !fwd.Alive() {
		t.Fatalf("supervisor %v (spawn said %d), forwarder %v: not both alive", sup, supPID, fwd)
	}
	for _, p := range []state.Process{sup, fwd} {
		sid, _ := unixGetsid(p.PID)
		if sid != sup.PID {
			t.Errorf("pid %d: session %d, want its own session %d", p.PID, sid, sup.PID)
		}
		if uid := procUID(t, p.PID); uid != u.UID {
			t.Errorf("pid %d runs as uid %d, want %d", p.PID, uid, u.UID)
		}
		for fd, target := range procFDs(t, p.PID) {
			for _, pipe := range callerPipes {
				if target == pipe {
					t.Errorf("pid %d fd %d is the spawning process's output %s", p.PID, fd, pipe)
				}
			}
			if strings.HasPrefix(target, "/dev/pts") || strings.HasPrefix(target, "/dev/tty") {
				t.Errorf("pid %d fd %d is a terminal %s", p.PID, fd, target)
			}
		}
		if fds := procFDs(t, p.PID); fds[0] != "/dev/null" || fds[1] != filepath.Join(dir, state.LogFile) || fds[2] != fds[1] {
			t.Errorf("pid %d stdio = %q %q %q, want /dev/null and the log", p.PID, fds[0], fds[1], fds[2])
		}
	}
	t.Logf("supervisor VmRSS %d KiB (RssAnon %d KiB); forwarder, none driver, VmRSS %d KiB (RssAnon %d KiB)",
		statusKiB(sup.PID, "VmRSS"), statusKiB(sup.PID, "RssAnon"), statusKiB(fwd.PID, "VmRSS"), statusKiB(fwd.PID, "RssAnon"))
	if m := fileMode(t, dir); m.Perm() != 0o700 {
		t.Errorf("state dir mode %v", m)
	}
	for _, name := range []string{state.APISocket, state.ConfigFile, state.PortsFile, state.ForwarderFile, state.SupervisorPID, state.LogFile, state.LockFile} {
		st, err := os.Lstat(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if st.Mode().Perm() != 0o600 || int(st.Sys().(*syscall.Stat_t).Uid) != u.UID {
			t.Errorf("%s: mode %v uid %d, want 0600 owned by %d", name, st.Mode(), st.Sys().(*syscall.Stat_t).Uid, u.UID)
		}
	}
	if out, err := r.run(t, "check", dir); err != nil {
		t.Errorf("Check: %v: %s", err, out)
	}

	// Another unprivileged user can neither connect nor read the state.
	nobody := &testenv.User{Name: "nobody", UID: 65534, GID: 65534, Home: "/"}
	rn := &runner{bin: r.bin, u: nobody}
	if out, err := rn.run(t, "dial", filepath.Join(dir, state.APISocket)); err == nil || !strings.Contains(out, "permission denied") {
		t.Errorf("nobody dialled the API socket: %v %s", err, out)
	}

	if out, err := r.run(t, "stop", dir); err != nil {
		t.Fatalf("Stop: %v: %s", err, out)
	}
	if sup.Alive() || fwd.Alive() {
		t.Errorf("alive after Stop: supervisor %v, forwarder %v", sup.Alive(), fwd.Alive())
	}
	if _, err := os.Lstat(dir); !os.IsNotExist(err) {
		t.Errorf("state dir after Stop: %v", err)
	}
	if out, err := r.run(t, "stop", dir); err != nil {
		t.Errorf("second Stop: %v: %s", err, out)
	}
}

// TestSupervisorRestartsKilledForwarder kills the forwarder with SIGKILL:
// the supervisor starts a new one within 2 s that serves the API again,
// with the same port table (IDs kept); Check reports the outage meanwhile.
func TestSupervisorRestartsKilledForwarder(t *testing.T) {
	testenv.RequireRoot(t)
	u := testenv.Unprivileged(t)
	r := newRunner(t, u)
	dir := filepath.Join(u.Dir(t), "attachment")
	r.spawn(t, Config{StateDir: dir, PortDriver: "none"})
	before, _ := os.ReadFile(filepath.Join(dir, state.PortsFile))

	// Hold the supervisor (SIGSTOP) so that the outage lasts long enough
	// for Check to see it, then let it go and time the recovery.
	sup := readProcess(t, dir, state.SupervisorPID)
	fwd := readProcess(t, dir, state.ForwarderFile)
	syscall.Kill(sup.PID, syscall.SIGSTOP)
	if err := syscall.Kill(fwd.PID, syscall.SIGKILL); err != nil {
		syscall.Kill(sup.PID, syscall.SIGCONT)
		t.Fatal(err)
	}
	fwd.WaitGone(2 * time.Second)
	out, err := r.run(t, "check", dir)
	syscall.Kill(sup.PID, syscall.SIGCONT)
	killed := time.Now()
	if err == nil || !strings.Contains(out, "not running") || !strings.Contains(out, "restarting") {
		t.Errorf("Check during the outage: %v %q", err, out)
	}
	var back time.Duration
	for {
		if p, err := readProcessNoFail(dir, state.ForwarderFile); err == nil && p != fwd && p.Alive() {
			if c, err := net.Dial("unix", filepath.Join(dir, state.APISocket)); err == nil {
				c.Close()
				back = time.Since(killed)
				break
			}
		}
		if time.Since(killed) > 10*time.Second {
			log, _ := os.ReadFile(filepath.Join(dir, state.LogFile))
			t.Fatalf("no forwarder back 10 s after SIGKILL; log:\n%s", log)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("forwarder back %v after the supervisor resumed", back)
	if back > 2*time.Second {
		t.Errorf("forwarder back after %v, want within 2 s", back)
	}
	if out, err := r.run(t, "check", dir); err != nil {
		t.Errorf("Check after restart: %v: %s", err, out)
	}
	after, _ := os.ReadFile(filepath.Join(dir, state.PortsFile))
	if string(before) != string(after) {
		t.Errorf("ports.json changed across the restart:\n%s\n%s", before, after)
	}
}

func readProcessNoFail(dir, name string) (state.Process, error) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return state.Process{}, err
	}
	return state.ParseProcess(string(b))
}

func unixGetsid(pid int) (int, error) {
	sid, _, errno := syscall.RawSyscall(syscall.SYS_GETSID, uintptr(pid), 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(sid), nil
}

func procUID(t *testing.T, pid int) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), "Uid:"); ok {
			uid, _ := strconv.Atoi(strings.Fields(rest)[1]) // effective
			return uid
		}
	}
	t.Fatalf("no Uid in /proc/%d/status", pid)
	return -1
}

func procFDs(t *testing.T, pid int) map[int]string {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	fds := map[int]string{}
	for _, e := range entries {
		fd, _ := strconv.Atoi(e.Name())
		target, _ := os.Readlink(filepath.Join(dir, e.Name()))
		fds[fd] = target
	}
	return fds
}

// echoServer answers each connection with what it reads, upper-cased marker first.
func echoServer(t *testing.T, l net.Listener) {
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64)
				n, _ := c.Read(buf)
				c.Write(append([]byte("echo:"), buf[:n]...))
			}()
		}
	}()
}

// roundTrip dials addr, sends msg and returns the reply.
func roundTrip(addr, msg string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestSlirp4netnsPortsComeBackAfterForwarderKill spawns, as the test user, a
// forwarder that starts slirp4netns for a child netns and publishes a port
// through it; after SIGKILL of the forwarder (which takes slirp4netns with
// it) the supervisor brings the network and the port back, same ID, within 2 s.
func TestSlirp4netnsPortsComeBackAfterForwarderKill(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "slirp4netns")
	u := testenv.Unprivileged(t)
	ns := testenv.ChildNetns(t, u)
	l := testenv.Listen(t, ns.Path, "tcp4", "0.0.0.0:0")
	echoServer(t, l)
	childPort := l.Addr().(*net.TCPAddr).Port
	hostPort := freePort(t)
	spec := fmt.Sprintf("127.0.0.1:%d:%d/tcp", hostPort, childPort)
	specs, _ := libport.ParseSpec(spec)

	r := newRunner(t, u)
	dir := filepath.Join(u.Dir(t), "attachment")
	r.spawn(t, Config{StateDir: dir, PortDriver: "slirp4netns", NetnsPath: ns.Path,
		Network: &network.Config{Backend: "slirp4netns"}, Ports: specs})
	addr := fmt.Sprintf("127.0.0.1:%d", hostPort)
	if got, err := roundTrip(addr, "one"); err != nil || got != "echo:one" {
		t.Fatalf("through slirp4netns: %q, %v", got, err)
	}
	// A second port, added over the API, must come back too, with its ID.
	hostPort2 := freePort(t)
	out, err := r.run(t, "addport", dir+" "+fmt.Sprintf("127.0.0.1:%d:%d/tcp", hostPort2, childPort))
	if err != nil || out != "2" {
		t.Fatalf("add port over the API: %v %q", err, out)
	}

	fwd := readProcess(t, dir, state.ForwarderFile)
	slirp := readProcess(t, dir, state.NetworkPID)
	syscall.Kill(fwd.PID, syscall.SIGKILL)
	killed := time.Now()
	if !slirp.WaitGone(3 * time.Second) {
		t.Error("slirp4netns outlived its forwarder")
	}
	// Ports come back one after another: wait for both.
	addr2 := fmt.Sprintf("127.0.0.1:%d", hostPort2)
	var back time.Duration
	for {
		got, err := roundTrip(addr, "two")
		got2, err2 := roundTrip(addr2, "two")
		if err == nil && got == "echo:two" && err2 == nil && got2 == "echo:two" {
			back = time.Since(killed)
			break
		}
		if time.Since(killed) > 15*time.Second {
			log, _ := os.ReadFile(filepath.Join(dir, state.LogFile))
			t.Fatalf("port not back 15 s after SIGKILL; log:\n%s", log)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("both ports back %v after SIGKILL of the forwarder", back)
	if back > 2*time.Second {
		t.Errorf("port back after %v, want within 2 s", back)
	}
	if got, err := roundTrip(addr2, "three"); err != nil || got != "echo:three" {
		t.Errorf("API-added port after restart: %q, %v", got, err)
	}
	var pf portsFile
	b, _ := os.ReadFile(filepath.Join(dir, state.PortsFile))
	if err := json.Unmarshal(b, &pf); err != nil || len(pf.Ports) != 2 || pf.Ports[0].ID != 1 || pf.Ports[1].ID != 2 || pf.NextID != 3 {
		t.Errorf("ports.json after restart = %s (%v)", b, err)
	}
	if out, err := r.run(t, "check", dir); err != nil {
		t.Errorf("Check after restart: %v: %s", err, out)
	}
	newSlirp := readProcess(t, dir, state.NetworkPID)
	if out, err := r.run(t, "stop", dir); err != nil {
		t.Fatalf("Stop: %v %s", err, out)
	}
	if newSlirp.Alive() {
		t.Error("slirp4netns alive after Stop")
	}
	if _, err := roundTrip(addr, "four"); err == nil {
		t.Error("port still open after Stop")
	}
}

// TestBuiltinPublishesIntoChildNetnsAsUser spawns, as the test user, a
// builtin forwarder for a child netns the user owns: traffic flows, the
// unmodified rootlessctl adds, lists and removes ports on it, and after
// SIGKILL of the forwarder its ports are back within 2 s.
func TestBuiltinPublishesIntoChildNetnsAsUser(t *testing.T) {
	testenv.RequireRoot(t)
	rootlessctl := testenv.RequireBinary(t, "rootlessctl")
	u := testenv.Unprivileged(t)
	ns := testenv.ChildNetns(t, u)
	l := testenv.Listen(t, ns.Path, "tcp4", "127.0.0.1:0")
	echoServer(t, l)
	childPort := l.Addr().(*net.TCPAddr).Port
	hostPort := freePort(t)
	specs, _ := libport.ParseSpec(fmt.Sprintf("127.0.0.1:%d:%d/tcp", hostPort, childPort))

	r := newRunner(t, u)
	dir := filepath.Join(u.Dir(t), "attachment")
	r.spawn(t, Config{StateDir: dir, PortDriver: "builtin", NetnsPath: ns.Path, Ports: specs})
	addr := fmt.Sprintf("127.0.0.1:%d", hostPort)
	if got, err := roundTrip(addr, "one"); err != nil || got != "echo:one" {
		t.Fatalf("through builtin: %q, %v", got, err)
	}

	sock := filepath.Join(dir, state.APISocket)
	ctl := func(args ...string) string {
		t.Helper()
		out, err := u.Cmd(rootlessctl, append([]string{"--socket", sock}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("rootlessctl %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	hostPort2 := freePort(t)
	if out := ctl("add-ports", fmt.Sprintf("127.0.0.1:%d:%d/tcp", hostPort2, childPort)); strings.TrimSpace(out) != "2" {
		t.Errorf("rootlessctl add-ports printed %q, want the ID 2", out)
	}
	addr2 := fmt.Sprintf("127.0.0.1:%d", hostPort2)
	if got, err := roundTrip(addr2, "two"); err != nil || got != "echo:two" {
		t.Fatalf("through the port rootlessctl added: %q, %v", got, err)
	}
	list := ctl("list-ports")
	var rows []string
	for _, line := range strings.Split(strings.TrimSpace(list), "\n") {
		rows = append(rows, strings.Join(strings.Fields(line), " "))
	}
	wantRows := []string{
		"ID PROTO PARENTIP PARENTPORT CHILDIP CHILDPORT",
		fmt.Sprintf("1 tcp 127.0.0.1 %d %d", hostPort, childPort),
		fmt.Sprintf("2 tcp 127.0.0.1 %d %d", hostPort2, childPort),
	}
	if strings.Join(rows, "\n") != strings.Join(wantRows, "\n") {
		t.Errorf("rootlessctl list-ports:\n%s\nwant rows:\n%s", list, strings.Join(wantRows, "\n"))
	}
	if info := ctl("info"); !strings.Contains(info, "builtin") {
		t.Errorf("rootlessctl info:\n%s", info)
	}

	// Kill the forwarder: both ports come back, with their IDs.
	fwd := readProcess(t, dir, state.ForwarderFile)
	syscall.Kill(fwd.PID, syscall.SIGKILL)
	killed := time.Now()
	for {
		got1, err1 := roundTrip(addr, "a")
		got2, err2 := roundTrip(addr2, "b")
		if err1 == nil && err2 == nil && got1 == "echo:a" && got2 == "echo:b" {
			break
		}
		if time.Since(killed) > 15*time.Second {
			log, _ := os.ReadFile(filepath.Join(dir, state.LogFile))
			t.Fatalf("ports not back 15 s after SIGKILL (%v, %v); log:\n%s", err1, err2, log)
		}
		time.Sleep(10 * time.Millisecond)
	}
	back := time.Since(killed)
	t.Logf("builtin ports back %v after SIGKILL of the forwarder", back)
	if back > 2*time.Second {
		t.Errorf("ports back after %v, want within 2 s", back)
	}

	ctl("remove-ports", "2")
	if _, err := roundTrip(addr2, "c"); err == nil {
		t.Error("port 2 still open after remove-ports")
	}
	if list := ctl("list-ports"); strings.Contains(list, strconv.Itoa(hostPort2)) || !strings.Contains(list, strconv.Itoa(hostPort)) {
		t.Errorf("list-ports after remove:\n%s", list)
	}
}

// statusKiB reads a "Field:  N kB" line of /proc/PID/status.
func statusKiB(pid int, field string) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			n, _ := strconv.Atoi(strings.Fields(rest)[0])
			return n
		}
	}
	return -1
}
