package main

import (
	"bufio"
	"bytes"
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
)

// runAs runs `portkit run ARGS...` as u and returns its exit code and output.
func portkitRunAs(t *testing.T, u *testenv.User, args ...string) (int, string, string) {
	t.Helper()
	bin := testenv.Binary(t, "portkit")
	cmd := u.Cmd("timeout", append([]string{"60", bin, "run"}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("portkit run: %v", err)
	}
	return cmd.ProcessState.ExitCode(), out.String(), errb.String()
}

func requireRunTools(t *testing.T, net string) {
	t.Helper()
	if net == "slirp4netns" || net == "pasta" {
		testenv.RequireBinary(t, net)
	}
	testenv.RequireBinary(t, "busybox")
}

// stateDir is a path for --state-dir, inside a directory owned by u.
func runStateDir(t *testing.T, u *testenv.User) string {
	return filepath.Join(u.Dir(t), "state")
}

func TestRunPassesExitCodeAndRootlessKitEnvironment(t *testing.T) {
	for _, netMode := range []string{"slirp4netns", "pasta", "none"} {
		t.Run(netMode, func(t *testing.T) {
			requireRunTools(t, netMode)
			u := testenv.Unprivileged(t)
			sd := runStateDir(t, u)
			script := `set -e
test -S "$ROOTLESSKIT_STATE_DIR/api.sock"
test "$(cat "$ROOTLESSKIT_STATE_DIR/child_pid")" = "$$"
test "$PORTKIT_STATE_DIR" = "$ROOTLESSKIT_STATE_DIR"
echo "euid=$ROOTLESSKIT_PARENT_EUID egid=$ROOTLESSKIT_PARENT_EGID dir=$ROOTLESSKIT_STATE_DIR"
echo "id=$(id -u)"
busybox ip -o link show lo | grep -q UP && echo lo-up
grep nameserver /etc/resolv.conf || true
exit 7`
			code, out, errOut := portkitRunAs(t, u, "--state-dir="+sd, "--net="+netMode, "--port-driver=none", "--", "sh", "-c", script)
			if code != 7 {
				t.Fatalf("exit code %d, want 7; stdout %q, stderr %q", code, out, errOut)
			}
			for _, want := range []string{
				fmt.Sprintf("euid=%d egid=%d dir=%s", u.UID, u.GID, sd),
				"id=0", "lo-up",
			} {
				if !strings.Contains(out, want) {
					t.Errorf("output lacks %q:\n%s", want, out)
				}
			}
			if netMode != "none" && !strings.Contains(out, "nameserver 10.0.2.3") {
				t.Errorf("/etc/resolv.conf in the child does not point at 10.0.2.3:\n%s", out)
			}
			if _, err := os.Lstat(sd); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("state dir %s still there after run: %v", sd, err)
			}
		})
	}
}

// hostServer greets every client on the host's loopback.
func runHostServer(t *testing.T, greeting string) int {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	serveRunGreeting(l, greeting)
	return l.Addr().(*net.TCPAddr).Port
}

func serveRunGreeting(l net.Listener, greeting string) {
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			// Read the client's line first: closing with unread data
			// would reset the connection under the greeting.
			c.SetDeadline(time.Now().Add(5 * time.Second))
			bufio.NewReader(c).ReadString('\n')
			io.WriteString(c, greeting)
			c.Close()
		}
	}()
}

func TestRunChildReachesHostLoopback(t *testing.T) {
	for _, netMode := range []string{"slirp4netns", "pasta"} {
		t.Run(netMode, func(t *testing.T) {
			requireRunTools(t, netMode)
			u := testenv.Unprivileged(t)
			bin := testenv.Binary(t, "portkit")
			// With --disable-host-loopback, pasta sends gateway traffic to
			// the real network: run inside a host stand-in with a dead-end
			// uplink (needs root; as a user only slirp4netns is safe).
			var host *testenv.IsolatedHost
			var port int
			if testenv.IsRoot() {
				host = testenv.NewIsolatedHost(t)
				l := testenv.Listen(t, host.Path, "tcp4", "127.0.0.1:0")
				serveRunGreeting(l, "hello from the host")
				port = l.Addr().(*net.TCPAddr).Port
			} else {
				port = runHostServer(t, "hello from the host")
			}
			run := func(extra ...string) (int, string, string) {
				args := append([]string{"60", bin, "run", "--state-dir=" + runStateDir(t, u), "--net=" + netMode, "--port-driver=none"}, extra...)
				// The client speaks first: pasta's tap path stalls
				// server-speaks-first connections until the client sends;
				// and this pasta may never pass the server's FIN on, so the
				// client is cut off after 3 s (the greeting is what counts).
				args = append(args, "--", "sh", "-c", "echo hi | timeout 3 busybox nc 10.0.2.2 "+strconv.Itoa(port))
				cmd := u.Cmd("timeout", args...)
				if host != nil {
					cmd = host.Cmd(u, "timeout", args...)
				}
				var out, errb bytes.Buffer
				cmd.Stdout, cmd.Stderr = &out, &errb
				cmd.Run()
				return cmd.ProcessState.ExitCode(), out.String(), errb.String()
			}
			code, out, errOut := run()
			if !strings.Contains(out, "hello from the host") {
				t.Fatalf("child -> host 10.0.2.2:%d: exit %d, stdout %q, stderr %q", port, code, out, errOut)
			}
			if host == nil && netMode == "pasta" {
				t.Skip("pasta --disable-host-loopback forwards to the real network: checked only as root, in an isolated host namespace")
			}
			code, out, _ = run("--disable-host-loopback")
			if strings.Contains(out, "hello from the host") {
				t.Fatalf("--disable-host-loopback: the child still reached the host's loopback (exit %d)", code)
			}
		})
	}
}

func runFreePort(t *testing.T) int {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func TestRunPublishesPortToHost(t *testing.T) {
	for _, tc := range []struct{ net, driver string }{
		{"slirp4netns", "builtin"},
		{"slirp4netns", "slirp4netns"},
		{"pasta", "implicit"},
		{"pasta", "builtin"},
	} {
		t.Run(tc.net+"-"+tc.driver, func(t *testing.T) {
			requireRunTools(t, tc.net)
			u := testenv.Unprivileged(t)
			hostPort := runFreePort(t)
			bin := testenv.Binary(t, "portkit")
			// The server answers one client, then the command ends.
			cmd := u.Cmd("timeout", "60", bin, "run", "--state-dir="+runStateDir(t, u), "--net="+tc.net, "--port-driver="+tc.driver,
				"-p", fmt.Sprintf("127.0.0.1:%d:80/tcp", hostPort), "--",
				"sh", "-c", "echo hello from the child | busybox nc -l -p 80")
			var errb bytes.Buffer
			cmd.Stderr = &errb
			testenv.Start(t, cmd)
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			got := ""
			deadline := time.Now().Add(20 * time.Second)
			for !strings.Contains(got, "hello from the child") {
				select {
				case err := <-exited:
					t.Fatalf("portkit run ended before a client got through: %v: %s", err, errb.String())
				default:
				}
				if time.Now().After(deadline) {
					t.Fatalf("no answer through 127.0.0.1:%d (last %q): %s", hostPort, got, errb.String())
				}
				c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", hostPort), time.Second)
				if err == nil {
					c.SetDeadline(time.Now().Add(2 * time.Second))
					b, _ := io.ReadAll(c)
					c.Close()
					got = string(b)
				}
				if !strings.Contains(got, "hello from the child") {
					time.Sleep(50 * time.Millisecond)
				}
			}
			select {
			case err := <-exited:
				if err != nil {
					t.Fatalf("portkit run: %v: %s", err, errb.String())
				}
			case <-time.After(10 * time.Second):
				t.Fatal("portkit run did not end after its command ended")
			}
			if c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", hostPort), time.Second); err == nil {
				c.Close()
				t.Errorf("127.0.0.1:%d still accepts after run ended", hostPort)
			}
		})
	}
}

// processesIn lists live processes whose user namespace is ns.
func runProcessesIn(ns string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if link, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/user", pid)); link == ns && runAlive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func runAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	return !isZombie(b)
}

func TestRunSIGTERMLeavesNothingBehind(t *testing.T) {
	for _, tc := range []struct{ net, driver string }{
		{"slirp4netns", "slirp4netns"},
		{"pasta", "none"},
		{"slirp4netns", "builtin"},
	} {
		t.Run(tc.net+"-"+tc.driver, func(t *testing.T) {
			requireRunTools(t, tc.net)
			u := testenv.Unprivileged(t)
			sd := runStateDir(t, u)
			bin := testenv.Binary(t, "portkit")
			args := []string{"run", "--state-dir=" + sd, "--net=" + tc.net, "--port-driver=" + tc.driver}
			if tc.driver != "none" {
				args = append(args, "-p", fmt.Sprintf("127.0.0.1:%d:80/tcp", runFreePort(t)))
			}
			// A daemon left behind by the command must go too.
			args = append(args, "--", "sh", "-c", "sleep 300 & echo started; sleep 300")
			cmd := u.Cmd(bin, args...)
			var errb bytes.Buffer
			cmd.Stderr = &errb
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			testenv.Start(t, cmd)
			line, err := bufio.NewReader(stdout).ReadString('\n')
			if err != nil || line != "started\n" {
				t.Fatalf("command did not start: %q %v: %s", line, err, errb.String())
			}
			pidText, err := os.ReadFile(filepath.Join(sd, "child_pid"))
			if err != nil {
				t.Fatal(err)
			}
			childPID, _ := strconv.Atoi(strings.TrimSpace(string(pidText)))
			if !runAlive(childPID) {
				t.Fatalf("child_pid %d is not running", childPID)
			}
			userns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/user", childPID))
			if err != nil {
				t.Fatal(err)
			}
			var tracked []int
			for _, f := range []string{"network.pid", "forwarder.pid"} {
				if b, err := os.ReadFile(filepath.Join(sd, f)); err == nil {
					if pid, err := strconv.Atoi(strings.Fields(string(b))[0]); err == nil {
						tracked = append(tracked, pid)
					}
				}
			}
			if tc.net != "none" && len(tracked) == 0 {
				t.Fatalf("no network.pid in the state dir")
			}
			if len(runProcessesIn(userns)) < 2 {
				t.Fatalf("expected the command and its daemon in the child user namespace")
			}

			cmd.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(15 * time.Second):
				t.Fatalf("portkit run still running 15 s after SIGTERM: %s", errb.String())
			}
			if code := cmd.ProcessState.ExitCode(); code != 143 && code != -1 {
				t.Errorf("exit code %d after SIGTERM, want 143 (128+SIGTERM)", code)
			}
			if left := runProcessesIn(userns); len(left) > 0 {
				t.Errorf("processes left in the child user namespace: %v", left)
			}
			for _, pid := range tracked {
				if pid != cmd.Process.Pid && runAlive(pid) {
					t.Errorf("process %d from the state dir still running", pid)
				}
			}
			if _, err := os.Lstat(sd); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("state dir %s still there: %v", sd, err)
			}
		})
	}
}

func TestRunCopyUpIsPrivateAndWritable(t *testing.T) {
	requireRunTools(t, "none")
	u := testenv.Unprivileged(t)
	name := fmt.Sprintf("portkit-copyup-%d", time.Now().UnixNano())
	code, out, errOut := portkitRunAs(t, u, "--state-dir="+runStateDir(t, u), "--net=none", "--port-driver=none", "--copy-up=/etc", "--",
		"sh", "-c", "echo written > /etc/"+name+" && cat /etc/"+name+" && test -e /etc/passwd && echo passwd-kept")
	if code != 0 || !strings.Contains(out, "written") || !strings.Contains(out, "passwd-kept") {
		t.Fatalf("copy-up /etc: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	if _, err := os.Stat("/etc/" + name); !errors.Is(err, os.ErrNotExist) {
		os.Remove("/etc/" + name)
		t.Fatalf("the child's write reached the host's /etc/%s", name)
	}
}

func TestRunRejectsBadFlags(t *testing.T) {
	u := testenv.Unprivileged(t)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--bogus", "sh"}, "unknown flag --bogus"},
		{[]string{"--net=slirp4netns"}, "no command"},
		{[]string{"--net=vpnkit", "true"}, "--net=vpnkit"},
		{[]string{"--net=slirp4netns", "--port-driver=implicit", "true"}, "implicit needs --net=pasta"},
		{[]string{"--net=host", "--port-driver=builtin", "true"}, "--net=host has none"},
		{[]string{"--slirp4netns-sandbox=maybe", "true"}, "want auto, true or false"},
		{[]string{"--propagation=weird", "true"}, "--propagation=weird"},
		{[]string{"-p", "80:80/sctp", "true"}, "sctp"},
		{[]string{"--mtu=70000", "true"}, "MTU 70000"},
		{[]string{"--copy-up=etc", "true"}, "--copy-up=etc"},
	} {
		code, _, errOut := portkitRunAs(t, u, tc.args...)
		if code != 1 || !strings.Contains(errOut, tc.want) {
			t.Errorf("portkit run %v: exit %d, stderr %q; want exit 1 and %q", tc.args, code, errOut, tc.want)
		}
	}
	// A --state-dir with foreign files is refused and left as it was.
	dir := u.Dir(t)
	keep := filepath.Join(dir, "precious.txt")
	if err := os.WriteFile(keep, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := portkitRunAs(t, u, "--state-dir="+dir, "--net=none", "--port-driver=none", "true")
	if code != 1 || !strings.Contains(errOut, "precious.txt") {
		t.Errorf("state dir with foreign files: exit %d, %q", code, errOut)
	}
	if _, err := os.Stat(keep); err != nil {
		t.Errorf("foreign file removed: %v", err)
	}
	// Exec failures are reported with the shell's codes.
	code, _, errOut = portkitRunAs(t, u, "--state-dir="+runStateDir(t, u), "--net=none", "--port-driver=none", "/nonexistent/cmd")
	if code != 127 || !strings.Contains(errOut, "/nonexistent/cmd") {
		t.Errorf("missing command: exit %d, %q; want 127", code, errOut)
	}
}

// TestRunAsRoot: portkit run also works for root (CI runs as root).
func TestRunAsRoot(t *testing.T) {
	testenv.RequireRoot(t)
	requireRunTools(t, "slirp4netns")
	bin := testenv.Binary(t, "portkit")
	sd := filepath.Join(t.TempDir(), "state")
	port := runHostServer(t, "hello root")
	out, err := exec.Command("timeout", "60", bin, "run", "--state-dir="+sd, "--net=slirp4netns", "--port-driver=slirp4netns", "--",
		"sh", "-c", fmt.Sprintf("echo hi | busybox nc -w 3 10.0.2.2 %d; id -u; exit 5", port)).Output()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 5 {
		t.Fatalf("exit: %v, want 5", err)
	}
	if !strings.Contains(string(out), "hello root") || !strings.HasSuffix(string(out), "0\n") {
		t.Fatalf("output %q", out)
	}
}
