package netns

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// The root side of a test hands the user side (this test binary re-executed
// as the unprivileged user) what it made, through these variables.
const (
	envSide  = "NETNS_TEST_SIDE" // "cases" or "hold"
	envPath  = "NETNS_TEST_PATH" // the child netns
	envAddr4 = "NETNS_TEST_ADDR4"
	envAddr6 = "NETNS_TEST_ADDR6"
)

// fixture is a child user+net namespace owned by the test user, with echo
// servers that exist only inside it.
type fixture struct {
	path         string
	addr4, addr6 string // echo listeners in the child: 127.0.0.1:P and [::1]:P
	// open makes another source of the kind under test.
	open func(path string) (SocketSource, error)
}

// newFixture makes the child namespace and its servers. Needs root.
func newFixture(t *testing.T) (*fixture, *testenv.User, *testenv.Netns) {
	t.Helper()
	testenv.RequireRoot(t)
	u := testenv.Unprivileged(t)
	n := testenv.ChildNetns(t, u)
	l4 := testenv.Listen(t, n.Path, "tcp4", "127.0.0.1:0")
	l6 := testenv.Listen(t, n.Path, "tcp6", "[::1]:0")
	go echo(l4)
	go echo(l6)
	return &fixture{path: n.Path, addr4: l4.Addr().String(), addr6: l6.Addr().String()}, u, n
}

func echo(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(c, c)
		}()
	}
}

// sourceCase is a property every SocketSource must have, whichever way it
// reaches the child.
type sourceCase struct {
	name string
	run  func(t *testing.T, src SocketSource, fx *fixture)
}

var sourceCases = []sourceCase{
	{"SocketsAreInChildNetnsWithFlags", testSocketsInChild},
	{"ConnectTCP4ToServerOnlyInChild", func(t *testing.T, src SocketSource, fx *fixture) { testConnect(t, src, "tcp4", fx.addr4) }},
	{"ConnectTCP6ToServerOnlyInChild", func(t *testing.T, src SocketSource, fx *fixture) { testConnect(t, src, "tcp6", fx.addr6) }},
	{"ListenInChildUnreachableFromHost", testListenInChild},
	{"NetlinkRouteListsChildLinks", testNetlinkLinks},
	{"SysctlInChildOnly", testSysctl},
	{"SysctlBadKeys", testSysctlBadKeys},
	{"TransparentAndMarkOnChildSocket", testTransparent},
	{"ConcurrentSockets", testConcurrent},
	{"BadSocketArguments", testBadSocket},
	{"NoFdLeftAfterClose", testNoFdLeak},
}

func runSourceCases(t *testing.T, src SocketSource, fx *fixture) {
	for _, c := range sourceCases {
		t.Run(c.name, func(t *testing.T) { c.run(t, src, fx) })
	}
}

// TestSetnsSource runs the cases in this (root) process, which may setns.
func TestSetnsSource(t *testing.T) {
	fx, u, n := newFixture(t)
	fx.open = NewSetnsSource
	hostFwmark := readSysctl(t, "net/ipv4/tcp_fwmark_accept")
	src, err := Open(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := src.(*setnsSource); !ok {
		t.Fatalf("Open as root gave %T, want the setns source", src)
	}
	runSourceCases(t, src, fx)
	checkSysctlInChild(t, u, n, hostFwmark)
	testClosed(t, src)
	t.Run("ProcessStaysInHostNetns", func(t *testing.T) {
		// The thread that joins the child must never be the main thread,
		// whose namespaces /proc/self shows and which Go never ends.
		host, err := os.Readlink("/proc/self/ns/net")
		if err != nil {
			t.Fatal(err)
		}
		// Which thread a goroutine lands on is up to the scheduler: try
		// often, from several goroutines, with the main thread idle.
		var wg sync.WaitGroup
		errs := make(chan error, 4)
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range 100 {
					s, err := NewSetnsSource(fx.path)
					if err != nil {
						errs <- err
						return
					}
					now, _ := os.Readlink("/proc/self/ns/net")
					s.Close()
					after, _ := os.Readlink("/proc/self/ns/net")
					if now != host || after != host {
						errs <- fmt.Errorf("source %d: the process's netns is %s while open, %s after Close, want %s", i, now, after, host)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	})
}

// TestHelperSourceAsUser runs the cases in a process owned by the test user,
// which owns the child user namespace but may not setns into it: Open must
// pick the helper there, and the helper-only cases (restart, close) run too.
func TestHelperSourceAsUser(t *testing.T) {
	fx, u, n := newFixture(t)
	hostFwmark := readSysctl(t, "net/ipv4/tcp_fwmark_accept")
	cmd := userSide(t, u, "cases", fx, "-test.run=^TestEntryUserSide$", "-test.v", "-test.timeout=120s")
	out, err := cmd.CombinedOutput()
	t.Logf("user side:\n%s", out)
	if err != nil {
		t.Fatalf("user side failed: %v", err)
	}
	want := append([]string{"TestEntryUserSide"}, helperOnlyCaseNames...)
	for _, c := range sourceCases {
		want = append(want, "TestEntryUserSide/"+c.name)
	}
	for _, name := range want {
		if !strings.Contains(string(out), "--- PASS: "+name+" ") {
			t.Errorf("user side did not pass %s", name)
		}
	}
	checkSysctlInChild(t, u, n, hostFwmark)
}

var helperOnlyCaseNames = []string{
	"TestEntryUserSide/OpenChoseHelper",
	"TestEntryUserSide/RestartAfterHelperKilled",
	"TestEntryUserSide/CloseLeavesNoHelper",
	"TestEntryUserSide/NamespaceNotOwnedIsAClearError",
}

// TestEntryUserSide is the user side of TestHelperSourceAsUser; it does nothing
// unless that test started it.
func TestEntryUserSide(t *testing.T) {
	if os.Getenv(envSide) != "cases" {
		t.Skip("runs only as the user side of TestHelperSourceAsUser")
	}
	if os.Geteuid() == 0 {
		t.Fatal("the user side must run unprivileged")
	}
	fx := &fixture{path: os.Getenv(envPath), addr4: os.Getenv(envAddr4), addr6: os.Getenv(envAddr6),
		open: func(path string) (SocketSource, error) { return NewHelperSource(path) }}
	logs := &logLines{}
	src, err := Open(fx.path, WithLogf(logs.logf))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	t.Run("OpenChoseHelper", func(t *testing.T) {
		if _, ok := src.(*helperSource); !ok {
			t.Fatalf("Open as an unprivileged user gave %T, want the helper source", src)
		}
		if _, err := NewSetnsSource(fx.path); !errors.Is(err, unix.EPERM) {
			t.Fatalf("setns as the user: %v, want EPERM (the fact the helper exists for)", err)
		}
	})
	hs, ok := src.(*helperSource)
	if !ok {
		t.FailNow()
	}
	runSourceCases(t, src, fx)
	t.Run("RestartAfterHelperKilled", func(t *testing.T) { testRestart(t, hs, fx, logs) })
	t.Run("CloseLeavesNoHelper", func(t *testing.T) {
		other, err := NewHelperSource(fx.path)
		if err != nil {
			t.Fatal(err)
		}
		pid := other.(*helperSource).helperPID()
		if _, err := other.Socket(unix.AF_INET, unix.SOCK_STREAM, 0); err != nil {
			t.Fatal(err) // so that the pool holds sockets when it closes
		}
		if err := other.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("helper pid %d still in /proc after Close (%v): not reaped", pid, err)
		}
		testClosed(t, other)
	})
	t.Run("NamespaceNotOwnedIsAClearError", func(t *testing.T) {
		// The host netns belongs to the initial user namespace, which the
		// user does not own: setns says EPERM and the helper cannot enter.
		before := childHelpers(t)
		_, err := Open("/proc/self/ns/net")
		if err == nil || !strings.Contains(err.Error(), "/proc/self/ns/net") {
			t.Fatalf("Open of a netns the user does not own: %v, want an error naming the path", err)
		}
		t.Logf("error: %v", err)
		if after := childHelpers(t); after != before {
			t.Fatalf("a failed Open left processes behind: %d children before, %d after", before, after)
		}
	})
}

// TestHelperDiesWithParent kills a forwarder (the test binary as the user,
// holding a helper source) with SIGKILL and checks that its helper dies too.
func TestHelperDiesWithParent(t *testing.T) {
	fx, u, _ := newFixture(t)
	// The helper will be orphaned; become its reaper so it cannot linger as
	// a zombie (PID 1 here does not reap) and so we can see it exit.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	cmd := userSide(t, u, "hold", fx, "-test.run=^TestEntryUserHold$", "-test.v", "-test.timeout=60s")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	testenv.Start(t, cmd)
	helperPID := 0
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "HELPER_PID="); ok {
			helperPID, _ = strconv.Atoi(v)
			break
		}
		t.Logf("user side: %s", sc.Text())
	}
	if helperPID <= 0 {
		t.Fatal("the user side did not report its helper's pid")
	}
	go func() { _, _ = io.Copy(io.Discard, stdout) }()
	if comm := readComm(helperPID); comm != "portkit-netns" {
		t.Fatalf("pid %d is %q, want the helper portkit-netns", helperPID, comm)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	deadline := time.Now().Add(5 * time.Second)
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(helperPID, &ws, unix.WNOHANG, nil)
		if pid == helperPID {
			t.Logf("helper %d ended with %v after its parent was killed", helperPID, ws)
			return
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			t.Fatalf("wait4 helper %d: %v", helperPID, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("helper %d (%s) still running 5 s after its parent was SIGKILLed", helperPID, readComm(helperPID))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestEntryUserHold is the user side of TestHelperDiesWithParent: a forwarder
// with a live helper that waits to be killed.
func TestEntryUserHold(t *testing.T) {
	if os.Getenv(envSide) != "hold" {
		t.Skip("runs only as the user side of TestHelperDiesWithParent")
	}
	src, err := NewHelperSource(os.Getenv(envPath))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	fmt.Printf("HELPER_PID=%d\n", src.(*helperSource).helperPID())
	time.Sleep(50 * time.Second)
	t.Fatal("not killed")
}

// TestBadPaths checks that a path that is not a netns gives an error naming
// it, from every constructor, and leaves no helper behind.
func TestBadPaths(t *testing.T) {
	before := childHelpers(t)
	dir := t.TempDir()
	for _, path := range []string{filepath.Join(dir, "missing"), dir, "/proc/self/status", ""} {
		for name, open := range map[string]func(string, ...Option) (SocketSource, error){
			"Open":            Open,
			"NewHelperSource": NewHelperSource,
			"NewSetnsSource":  func(p string, _ ...Option) (SocketSource, error) { return NewSetnsSource(p) },
		} {
			src, err := open(path)
			if err == nil {
				src.Close()
				t.Errorf("%s(%q) succeeded, want an error", name, path)
				continue
			}
			if !strings.Contains(err.Error(), fmt.Sprintf("%s:", path)) && !strings.Contains(err.Error(), path+" ") {
				t.Errorf("%s(%q): %v: the error does not name the path", name, path, err)
			}
		}
	}
	if after := childHelpers(t); after != before {
		t.Fatalf("failed opens left processes behind: %d children before, %d after", before, after)
	}
}

// userSide returns the test binary re-executed as u, in the given side.
// The binary is copied where u can read it (go test builds it under a
// root-only directory).
func userSide(t *testing.T, u *testenv.User, side string, fx *fixture, args ...string) *exec.Cmd {
	t.Helper()
	bin := userBinary(t, u)
	cmd := u.Cmd(bin, args...)
	cmd.Dir = filepath.Dir(bin)
	cmd.Env = append(cmd.Env, envSide+"="+side, envPath+"="+fx.path, envAddr4+"="+fx.addr4, envAddr6+"="+fx.addr6)
	return cmd
}

var userBin struct {
	sync.Mutex
	path string
}

func userBinary(t *testing.T, u *testenv.User) string {
	t.Helper()
	userBin.Lock()
	defer userBin.Unlock()
	if userBin.path != "" {
		if _, err := os.Stat(userBin.path); err == nil {
			return userBin.path
		}
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "portkit-netns-test-")
	if err != nil {
		t.Fatal(err)
	}
	// Removed when the test process ends (testenv.Main exits; t.Cleanup
	// would remove it before a later test reuses it).
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "netns.test")
	if err := os.WriteFile(p, data, 0o755); err != nil {
		t.Fatal(err)
	}
	userBin.path = p
	t.Cleanup(func() {
		userBin.Lock()
		defer userBin.Unlock()
		os.RemoveAll(dir)
		userBin.path = ""
	})
	return p
}

// childHelpers counts this process's children that are helpers or nsenter.
func childHelpers(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	self := strconv.Itoa(os.Getpid())
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		status, err := os.ReadFile("/proc/" + e.Name() + "/status")
		if err != nil {
			continue
		}
		if !strings.Contains(string(status), "\nPPid:\t"+self+"\n") {
			continue
		}
		if c := readComm(mustAtoi(e.Name())); c == "portkit-netns" || c == "nsenter" || c == "6" {
			n++
		}
	}
	return n
}

func mustAtoi(s string) int { n, _ := strconv.Atoi(s); return n }

func readComm(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.TrimSpace(string(b))
}

func readSysctl(t *testing.T, key string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/sys/" + key)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// checkSysctlInChild checks, from outside, what testSysctl did: the child
// sees tcp_fwmark_accept=1 and the host keeps its value.
func checkSysctlInChild(t *testing.T, u *testenv.User, n *testenv.Netns, hostBefore string) {
	t.Helper()
	if got := strings.TrimSpace(n.Run(t, u, "cat", "/proc/sys/net/ipv4/tcp_fwmark_accept")); got != "1" {
		t.Errorf("tcp_fwmark_accept in the child is %q after Sysctl, want 1", got)
	}
	if got := readSysctl(t, "net/ipv4/tcp_fwmark_accept"); got != hostBefore {
		t.Errorf("tcp_fwmark_accept on the host changed from %q to %q", hostBefore, got)
	}
}

// logLines collects a source's log lines.
type logLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *logLines) logf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
}

func (l *logLines) count(substr string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, line := range l.lines {
		if strings.Contains(line, substr) {
			n++
		}
	}
	return n
}
