// Package testenv gives portkit's tests the real things they need: an
// unprivileged user to drop to, a child user+network namespace owned by that
// user, servers listening inside it, "host" peers on veth pairs, and built
// binaries. Tests run as root in CI and drop privileges for the code under test.
package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// UserName is the unprivileged user tests create and drop to when run as root.
const UserName = "portkit-test"

// IsRoot reports whether the test process is root.
func IsRoot() bool { return os.Geteuid() == 0 }

// RequireRoot skips t, naming the reason, unless the process is root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if !IsRoot() {
		t.Skip("needs root to set up test hosts (CI runs as root)")
	}
}

// RequireBinary skips t unless name is on PATH; CI installs every one.
func RequireBinary(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s is not installed (make test installs it as root)", name)
	}
	return p
}

// User is the unprivileged user that code under test runs as.
type User struct {
	Name     string
	UID, GID int
	Home     string
}

var userOnce struct {
	sync.Once
	u   *User
	err error
}

// Unprivileged returns the user to run code under test as. As root it creates
// UserName (with /etc/subuid and /etc/subgid ranges) and makes /dev/net/tun
// usable from user namespaces; otherwise it is the current user.
func Unprivileged(t testing.TB) *User {
	t.Helper()
	userOnce.Do(func() { userOnce.u, userOnce.err = setupUser() })
	if userOnce.err != nil {
		t.Fatalf("test user: %v", userOnce.err)
	}
	return userOnce.u
}

func setupUser() (*User, error) {
	if !IsRoot() {
		cur, err := user.Current()
		if err != nil {
			return nil, err
		}
		return lookupUser(cur.Username)
	}
	if _, err := user.Lookup(UserName); err != nil {
		out, err := exec.Command("useradd", "--create-home", "--shell", "/bin/sh", UserName).CombinedOutput()
		if err != nil && !bytes.Contains(out, []byte("already exists")) {
			return nil, fmt.Errorf("useradd %s: %v: %s", UserName, err, out)
		}
	}
	for _, f := range []string{"/etc/subuid", "/etc/subgid"} {
		if err := ensureSubIDs(f, UserName); err != nil {
			return nil, err
		}
	}
	// Rootless slirp4netns and pasta open the tun device from inside the
	// user namespace; these machines ship it 0600 (a desktop has 0666).
	if err := os.Chmod("/dev/net/tun", 0o666); err != nil {
		return nil, fmt.Errorf("chmod /dev/net/tun: %w", err)
	}
	return lookupUser(UserName)
}

func ensureSubIDs(file, name string) error {
	data, err := os.ReadFile(file)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, name+":") {
			return nil
		}
	}
	f, err := os.OpenFile(file, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = fmt.Fprintf(f, "%s:231072:65536\n", name)
	return err
}

func lookupUser(name string) (*User, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return nil, err
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &User{Name: u.Username, UID: uid, GID: gid, Home: u.HomeDir}, nil
}

// Cmd returns a command that runs as u, with u's HOME and no inherited
// XDG_RUNTIME_DIR (these machines have no logind).
func (u *User) Cmd(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = u.Env()
	if u.UID != os.Geteuid() {
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Credential: &syscall.Credential{Uid: uint32(u.UID), Gid: uint32(u.GID), Groups: []uint32{}},
		}
	}
	return cmd
}

// Env is the environment commands run as u get.
func (u *User) Env() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "HOME=") || strings.HasPrefix(kv, "USER=") || strings.HasPrefix(kv, "LOGNAME=") ||
			strings.HasPrefix(kv, "XDG_RUNTIME_DIR=") || strings.HasPrefix(kv, "ROOTLESSKIT_") || strings.HasPrefix(kv, "PORTKIT_") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "HOME="+u.Home, "USER="+u.Name, "LOGNAME="+u.Name)
}

// Dir returns a new empty directory owned by u (mode 0700), removed at cleanup.
func (u *User) Dir(t testing.TB) string {
	t.Helper()
	base, err := os.MkdirTemp("", "portkit-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(base, "d")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, u.UID, u.GID); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Start starts cmd, fails t on error, and kills and reaps it at cleanup.
func Start(t testing.TB, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Path, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
}

// Netns is a child user+network namespace held by a sleeping process.
type Netns struct {
	PID  int
	Path string // /proc/PID/ns/net
	cmd  *exec.Cmd
}

// ChildNetns makes a user+network namespace owned by u (as `unshare -Urn`
// does for a rootless container), with loopback up, and removes it at cleanup.
func ChildNetns(t testing.TB, u *User) *Netns {
	t.Helper()
	RequireBinary(t, "unshare")
	cmd := u.Cmd("unshare", "--user", "--map-root-user", "--net", "sleep", "infinity")
	Start(t, cmd)
	n := &Netns{PID: cmd.Process.Pid, Path: fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid), cmd: cmd}
	self, _ := os.Readlink("/proc/self/ns/net")
	deadline := time.Now().Add(5 * time.Second)
	for {
		// unshare writes the ID maps after making the namespaces; it execs
		// sleep only once they are written, so wait for the exec too.
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", n.PID))
		if cur, err := os.Readlink(n.Path); err == nil && cur != self && strings.TrimSpace(string(comm)) == "sleep" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("unshare (pid %d) did not make a network namespace", n.PID)
		}
		time.Sleep(2 * time.Millisecond)
	}
	n.Run(t, u, "ip", "link", "set", "lo", "up")
	return n
}

// Run runs a command inside n's namespaces as u (via nsenter) and fails t
// if it fails. It returns the combined output.
func (n *Netns) Run(t testing.TB, u *User, name string, args ...string) string {
	t.Helper()
	full := append([]string{"-t", strconv.Itoa(n.PID), "-U", "-n", "--preserve-credentials", name}, args...)
	out, err := u.Cmd("nsenter", full...).CombinedOutput()
	if err != nil {
		t.Fatalf("in netns %d: %s %s: %v: %s", n.PID, name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// Command returns a command that runs inside n's namespaces as u.
func (n *Netns) Command(u *User, name string, args ...string) *exec.Cmd {
	full := append([]string{"-t", strconv.Itoa(n.PID), "-U", "-n", "--preserve-credentials", name}, args...)
	return u.Cmd("nsenter", full...)
}

// Do runs fn on an OS thread that has joined the network namespace at path;
// sockets fn makes stay in that namespace. Needs root (or rights over path).
func Do(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// The thread is never unlocked: if switching back fails it must die.
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := os.Open(path)
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns back: %w", err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Listen opens a listener inside the namespace at path and closes it at cleanup.
func Listen(t testing.TB, path, network, addr string) net.Listener {
	t.Helper()
	RequireRoot(t)
	var l net.Listener
	err := Do(path, func() (err error) { l, err = net.Listen(network, addr); return })
	if err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, path, err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// ListenPacket opens a packet socket inside the namespace at path and closes it at cleanup.
func ListenPacket(t testing.TB, path, network, addr string) net.PacketConn {
	t.Helper()
	RequireRoot(t)
	var c net.PacketConn
	err := Do(path, func() (err error) { c, err = net.ListenPacket(network, addr); return })
	if err != nil {
		t.Fatalf("listen %s %s in %s: %v", network, addr, path, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Kill ends the process holding n (the "container" exits); the namespace
// goes away once nothing else holds it.
func (n *Netns) Kill() error {
	if err := n.cmd.Process.Kill(); err != nil {
		return err
	}
	_, err := n.cmd.Process.Wait()
	return err
}
