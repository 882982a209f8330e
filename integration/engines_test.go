package integration

// Shared pieces of the engine tests (engines_*_test.go): finding the engine
// tools scripts/engines-deps.sh installs and builds, running them bounded in
// time, and asking what is left of us when an engine is done.

import (
	"bufio"
	"bytes"
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
	"github.com/portkit/portkit/libport/state"
)

// Versions scripts/engines-deps.sh builds into the tools cache.
const (
	nerdctlVersion = "v1.7.7"
	crictlVersion  = "v1.34.0"
)

// toolsDir is where scripts/engines-deps.sh caches what it builds.
func toolsDir() string {
	if d := os.Getenv("PORTKIT_TOOLS_DIR"); d != "" {
		return d
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "portkit-tools")
}

// engineTool finds a tool the engine tests need: in the tools cache under
// subdir (built by scripts/engines-deps.sh), else on PATH. It skips t,
// naming the fix, when the tool is nowhere.
func engineTool(t *testing.T, subdir, name string) string {
	t.Helper()
	if subdir != "" {
		p := filepath.Join(toolsDir(), subdir, name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	where := "on PATH"
	if subdir != "" {
		where = fmt.Sprintf("in %s or on PATH", filepath.Join(toolsDir(), subdir))
	}
	t.Skipf("%s is not installed (%s): run scripts/engines-deps.sh as root (CI does)", name, where)
	return ""
}

// runBounded runs cmd with a deadline and returns its combined output
// (only stderr's when the caller set cmd.Stdout). On timeout the whole
// process group is killed.
func runBounded(t *testing.T, timeout time.Duration, cmd *exec.Cmd) (string, error) {
	t.Helper()
	var out bytes.Buffer
	if cmd.Stdout == nil {
		cmd.Stdout = &out
	}
	cmd.Stderr = &out
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return out.String(), err
	case <-time.After(timeout):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return out.String(), fmt.Errorf("%s timed out after %v", strings.Join(cmd.Args, " "), timeout)
	}
}

// httpGet fetches path from addr with a bare HTTP/1.0 request (busybox
// httpd's dialect) and returns the status line and the body.
func httpGet(addr, path string) (status, body string, err error) {
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, addr); err != nil {
		return "", "", err
	}
	data, err := io.ReadAll(c)
	if err != nil && len(data) == 0 {
		return "", "", err
	}
	r := bufio.NewReader(bytes.NewReader(data))
	status, _ = r.ReadString('\n')
	for {
		line, err := r.ReadString('\n')
		if err != nil || strings.TrimSpace(line) == "" {
			break
		}
	}
	rest, _ := io.ReadAll(r)
	return strings.TrimSpace(status), string(rest), nil
}

// httpGetRetry retries httpGet until the page comes or timeout passes.
func httpGetRetry(addr, path string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		status, body, err := httpGet(addr, path)
		if err == nil && strings.Contains(status, " 200") {
			return body, nil
		}
		if err == nil {
			err = fmt.Errorf("status %q", status)
		}
		if time.Now().After(deadline) {
			return "", err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitClosed waits until nothing accepts TCP connections on addr.
func waitClosed(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return nil
		}
		c.Close()
		if time.Now().After(deadline) {
			return fmt.Errorf("%s still accepts connections %v later", addr, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// listening reports whether a socket of the host netns listens on port
// (TCP) or is bound to it (UDP), from /proc/net: it sees sockets of every
// user without connecting to them.
func listening(proto string, port int) []string {
	var out []string
	for _, f := range []string{proto, proto + "6"} {
		data, err := os.ReadFile("/proc/net/" + f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n")[1:] {
			fields := strings.Fields(line)
			if len(fields) < 4 {
				continue
			}
			_, hexPort, _ := strings.Cut(fields[1], ":")
			p, _ := strconv.ParseUint(hexPort, 16, 16)
			// TCP: state 0A is LISTEN; UDP: every bound socket counts.
			if int(p) == port && (proto == "udp" || fields[3] == "0A") {
				out = append(out, f+" "+fields[1])
			}
		}
	}
	return out
}

// requirePortsFree fails t, naming the port, when a fixed host port the
// test must use is taken (the examples use fixed ports).
func requirePortsFree(t *testing.T, tcp, udp []int) {
	t.Helper()
	for _, p := range tcp {
		if l := listening("tcp", p); len(l) > 0 {
			t.Fatalf("host TCP port %d is taken (%v): stop what listens there and rerun", p, l)
		}
	}
	for _, p := range udp {
		if l := listening("udp", p); len(l) > 0 {
			t.Fatalf("host UDP port %d is taken (%v): stop what holds it and rerun", p, l)
		}
	}
}

// processesOf lists live processes (not in before) whose executable or
// command line mentions one of marks: what an engine test checks is gone.
func processesOf(before map[int]bool, marks ...string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() || before[pid] {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		exe, _ := os.Readlink("/proc/" + e.Name() + "/exe")
		cmdline, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		args := strings.TrimSpace(strings.ReplaceAll(string(cmdline), "\x00", " "))
		if i := bytes.LastIndexByte(stat, ')'); i > 0 && len(stat) > i+2 && stat[i+2] == 'Z' {
			args = "zombie " + string(stat[:i+1])
		}
		for _, m := range marks {
			if strings.Contains(exe, m) || strings.Contains(args, m) {
				out = append(out, fmt.Sprintf("%d %s (%s)", pid, args, exe))
				break
			}
		}
	}
	return out
}

// pluginProcesses are the live processes started from a plugin binary in
// cniBin (detached forwarders) and everything below them (slirp4netns,
// helpers), to check with testenv.WaitGone once the engine is done.
func pluginProcesses(cniBin string) []state.Process {
	var roots []state.Process
	for _, line := range processesOf(nil, cniBin) {
		pid, _ := strconv.Atoi(strings.Fields(line)[0])
		if p, err := state.ProcessOf(pid); err == nil {
			roots = append(roots, p)
		}
	}
	return testenv.Descendants(roots...)
}

// pidSet is every process alive now.
func pidSet() map[int]bool {
	s := map[int]bool{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			s[pid] = true
		}
	}
	return s
}

// waitNoProcesses fails t unless processesOf(before, marks...) is empty
// within timeout.
func waitNoProcesses(t *testing.T, timeout time.Duration, before map[int]bool, marks ...string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		left := processesOf(before, marks...)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("processes of ours left behind:\n%s", strings.Join(left, "\n"))
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitFile waits until path exists.
func waitFile(path string, timeout time.Duration, alive func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if alive != nil {
			if err := alive(); err != nil {
				return err
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %v", path, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stepTimer logs how long each step of an engine test takes, so the report
// and CI logs show where the time goes.
type stepTimer struct {
	t     *testing.T
	start time.Time
	last  time.Time
}

func newStepTimer(t *testing.T) *stepTimer {
	now := time.Now()
	st := &stepTimer{t: t, start: now, last: now}
	t.Cleanup(func() { t.Logf("total %v", time.Since(st.start).Round(time.Millisecond)) })
	return st
}

func (s *stepTimer) step(name string) {
	now := time.Now()
	s.t.Logf("%-40s %v", name, now.Sub(s.last).Round(time.Millisecond))
	s.last = now
}
