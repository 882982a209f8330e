package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport/api"
)

// startDaemon runs `portkit daemon ARGS` as u and waits for its API socket.
func startDaemon(t *testing.T, u *testenv.User, dir string, args ...string) *exec.Cmd {
	t.Helper()
	bin := testenv.Binary(t, "portkit")
	cmd := u.Cmd(bin, append([]string{"daemon", "--state-dir", dir}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	testenv.Start(t, cmd)
	exited := make(chan struct{})
	go func() { cmd.Process.Wait(); close(exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", filepath.Join(dir, "api.sock")); err == nil {
			c.Close()
			return cmd
		}
		select {
		case <-exited:
			t.Fatalf("portkit daemon %s exited: %s", strings.Join(args, " "), stderr.String())
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("portkit daemon not serving after 30 s: %s", stderr.String())
		}
	}
}

func TestDaemonNoneServesPrivateSocketAndCleansUpOnSIGTERM(t *testing.T) {
	testenv.RequireRoot(t)
	u := testenv.Unprivileged(t)
	dir := filepath.Join(u.Dir(t), "state")
	cmd := startDaemon(t, u, dir, "--port-driver", "none")

	for path, want := range map[string]os.FileMode{dir: os.ModeDir | 0o700, filepath.Join(dir, "api.sock"): os.ModeSocket | 0o600} {
		st, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode() != want || int(st.Sys().(*syscall.Stat_t).Uid) != u.UID {
			t.Errorf("%s: %v uid %d, want %v owned by %d", path, st.Mode(), st.Sys().(*syscall.Stat_t).Uid, want, u.UID)
		}
	}
	info, err := api.NewClient(filepath.Join(dir, "api.sock")).Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.PortDriver == nil || info.PortDriver.Driver != "none" || info.NetworkDriver == nil || info.StateDir != dir {
		t.Errorf("/v1/info = %+v", info)
	}

	// A second daemon on the same directory is refused, and harms nothing.
	out, err := u.Cmd(testenv.Binary(t, "portkit"), "daemon", "--state-dir", dir, "--port-driver", "none").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "already served") || !strings.HasPrefix(string(out), "error: ") {
		t.Errorf("second daemon: %v: %s", err, out)
	}
	if _, err := api.NewClient(filepath.Join(dir, "api.sock")).Info(context.Background()); err != nil {
		t.Errorf("first daemon after the refusal: %v", err)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { _, err := cmd.Process.Wait(); done <- err }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("daemon still running 15 s after SIGTERM")
	}
	if _, err := os.Lstat(dir); !os.IsNotExist(err) {
		entries, _ := os.ReadDir(dir)
		t.Errorf("state dir after SIGTERM (%v): %v", err, entries)
	}
}

func TestDaemonFlagErrors(t *testing.T) {
	bin := testenv.Binary(t, "portkit")
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--port-driver", "none"}, "--state-dir"},
		{[]string{"--state-dir", dir + "/s", "--port-driver", "bogus"}, "none, builtin, slirp4netns, implicit, socat"},
		{[]string{"--state-dir", dir + "/s", "--port-driver", "builtin"}, "--netns PATH or --child-pid PID"},
		{[]string{"--state-dir", dir + "/s", "--netns", "/x", "--child-pid", "1"}, "give one"},
		{[]string{"--state-dir", dir + "/s", "-p", "8080:80/sctp"}, "sctp"},
		{[]string{"--state-dir", dir + "/s", "--source-ip", "bogus"}, "--source-ip"},
		{[]string{"--state-dir", dir + "/s", "--net", "vpnkit"}, "--net=vpnkit"},
		{[]string{"--state-dir", dir + "/s", "extra"}, "unexpected argument"},
	} {
		cmd := exec.Command(bin, append([]string{"daemon"}, tc.args...)...)
		cmd.Env = append(os.Environ(), "PORTKIT_STATE_DIR=")
		out, err := cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 || !strings.Contains(string(out), tc.want) {
			t.Errorf("daemon %s: %v: %s; want exit != 0 mentioning %q", strings.Join(tc.args, " "), err, out, tc.want)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("bad flags left %v behind", entries)
	}
	out, err := exec.Command(bin, "daemon", "--help").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Usage: portkit daemon") || !strings.Contains(string(out), "-port-driver") {
		t.Errorf("daemon --help: %v: %s", err, out)
	}
}

// TestDaemonBuiltinPublishesIntoChildNetnsWithRootlessctl runs the daemon as
// the test user with the builtin driver into a child netns that user owns;
// a -p port carries traffic, and the unmodified rootlessctl adds, lists and
// removes ports on it.
func TestDaemonBuiltinPublishesIntoChildNetnsWithRootlessctl(t *testing.T) {
	testenv.RequireRoot(t)
	rootlessctl := testenv.RequireBinary(t, "rootlessctl")
	u := testenv.Unprivileged(t)
	ns := testenv.ChildNetns(t, u)
	l := testenv.Listen(t, ns.Path, "tcp4", "127.0.0.1:0")
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b := make([]byte, 64)
				n, _ := c.Read(b)
				c.Write(append([]byte("echo:"), b[:n]...))
			}()
		}
	}()
	childPort := l.Addr().(*net.TCPAddr).Port
	hostPort, hostPort2 := freeTCPPort(t), freeTCPPort(t)
	dir := filepath.Join(u.Dir(t), "state")
	startDaemon(t, u, dir, "--port-driver", "builtin", "--netns", ns.Path,
		"-p", fmt.Sprintf("127.0.0.1:%d:%d/tcp", hostPort, childPort))

	if got, err := echo(fmt.Sprintf("127.0.0.1:%d", hostPort), "one"); err != nil || got != "echo:one" {
		t.Fatalf("through the -p port: %q, %v", got, err)
	}
	sock := filepath.Join(dir, "api.sock")
	ctl := func(args ...string) string {
		t.Helper()
		out, err := u.Cmd(rootlessctl, append([]string{"--socket", sock}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("rootlessctl %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if id := ctl("add-ports", fmt.Sprintf("127.0.0.1:%d:%d/tcp", hostPort2, childPort)); id != "2" {
		t.Errorf("rootlessctl add-ports printed %q, want 2", id)
	}
	if got, err := echo(fmt.Sprintf("127.0.0.1:%d", hostPort2), "two"); err != nil || got != "echo:two" {
		t.Fatalf("through the port rootlessctl added: %q, %v", got, err)
	}
	list := ctl("list-ports")
	if !strings.Contains(list, fmt.Sprint(hostPort)) || !strings.Contains(list, fmt.Sprint(hostPort2)) {
		t.Errorf("list-ports:\n%s", list)
	}
	ctl("remove-ports", "2")
	if _, err := echo(fmt.Sprintf("127.0.0.1:%d", hostPort2), "three"); err == nil {
		t.Error("removed port still answers")
	}
	if list := ctl("list-ports"); strings.Contains(list, fmt.Sprint(hostPort2)) {
		t.Errorf("list-ports after remove:\n%s", list)
	}
	if info := ctl("info"); !strings.Contains(info, "builtin") {
		t.Errorf("rootlessctl info:\n%s", info)
	}
}

func freeTCPPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func echo(addr, msg string) (string, error) {
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
