package state_test

import (
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	. "github.com/portkit/portkit/libport/state"
)

func TestMain(m *testing.M) {
	if os.Getenv("STATE_TEST_BASEDIR") != "" {
		// Re-executed as the unprivileged user by TestBaseDirUnprivileged.
		dir, err := BaseDir()
		if err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.WriteString(dir + "\n")
		os.Exit(0)
	}
	testenv.Main(m)
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	st, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode()
}

func TestCreateMakesPrivateDirsWithParents(t *testing.T) {
	base := t.TempDir()
	path := filepath.Join(base, "a", "b", "attachment")
	d, err := Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, p := range []string{filepath.Join(base, "a"), filepath.Join(base, "a", "b"), path} {
		if m := mode(t, p); m.Perm() != 0o700 || !m.IsDir() {
			t.Errorf("%s: mode %v, want drwx------", p, m)
		}
	}
	// Creating it again opens the same directory.
	d2, err := Create(path)
	if err != nil {
		t.Fatalf("create existing: %v", err)
	}
	d2.Close()
}

func TestOpenRefusesLooseSymlinkedAndForeignDirs(t *testing.T) {
	base := t.TempDir()

	loose := filepath.Join(base, "loose")
	if err := os.Mkdir(loose, 0o700); err != nil {
		t.Fatal(err)
	}
	os.Chmod(loose, 0o755)
	if _, err := Create(loose); err == nil || !strings.Contains(err.Error(), "chmod 700") {
		t.Errorf("loose dir: got %v, want an error telling to chmod 700", err)
	}

	real := filepath.Join(base, "real")
	if err := os.Mkdir(real, 0o700); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(link); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("symlinked dir: got %v, want a symlink refusal", err)
	}
	if _, err := Create(link); err == nil {
		t.Errorf("Create through a symlink succeeded")
	}

	if _, err := Open(filepath.Join(base, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing dir: got %v, want os.ErrNotExist", err)
	}

	if testenv.IsRoot() {
		u := testenv.Unprivileged(t)
		foreign := u.Dir(t) // 0700, owned by the test user, not by us
		if _, err := Open(foreign); err == nil || !strings.Contains(err.Error(), "owned by uid "+strconv.Itoa(u.UID)) {
			t.Errorf("foreign dir: got %v, want an ownership refusal", err)
		}
	}
}

func TestFilesAreAtomicPrivateAndNeverFollowSymlinks(t *testing.T) {
	d, err := Create(filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	if err := d.WriteJSON(ConfigFile, map[string]int{"a": 1}); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, d.Join(ConfigFile)); m.Perm() != 0o600 {
		t.Errorf("config.json mode %v, want 0600", m)
	}
	var got map[string]int
	if err := d.ReadJSON(ConfigFile, &got); err != nil || got["a"] != 1 {
		t.Fatalf("ReadJSON = %v, %v", got, err)
	}
	entries, _ := os.ReadDir(d.Path())
	if len(entries) != 1 {
		t.Errorf("temporary files left behind: %v", entries)
	}

	// A symlink planted where a state file goes is neither read through nor
	// written through; the write replaces the link itself.
	victim := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(victim, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, d.Join(PortsFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadFile(PortsFile); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("read through symlink: got %v, want a refusal", err)
	}
	if _, err := d.OpenLog(PortsFile); err == nil {
		t.Errorf("OpenLog followed a symlink")
	}
	if err := d.WriteFile(PortsFile, []byte("new")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious" {
		t.Errorf("write followed the symlink: victim now %q", b)
	}
	if m := mode(t, d.Join(PortsFile)); !m.IsRegular() {
		t.Errorf("ports.json is %v after write, want a regular file", m)
	}

	for _, bad := range []string{"", "..", "../x", "a/b", "x\x00"} {
		if err := d.WriteFile(bad, nil); err == nil {
			t.Errorf("WriteFile(%q) succeeded", bad)
		}
	}

	if err := d.Remove(PortsFile); err != nil {
		t.Fatal(err)
	}
	if err := d.Remove(PortsFile); err != nil {
		t.Errorf("second Remove: %v", err)
	}
}

func TestReadFileRefusesFIFOAndHugeFiles(t *testing.T) {
	d, err := Create(filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := syscall.Mkfifo(d.Join(ConfigFile), 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := d.ReadFile(ConfigFile); done <- err }()
	select {
	case err := <-done:
		if err == nil {
			t.Errorf("read a FIFO as a state file")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadFile blocked on a FIFO")
	}
	big := make([]byte, MaxFileSize+1)
	if err := os.WriteFile(d.Join(PortsFile), big, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadFile(PortsFile); err == nil {
		t.Errorf("read a file larger than MaxFileSize")
	}
}

func TestLockIsExclusiveAndPassesToChildren(t *testing.T) {
	d, err := Create(filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.IsLocked() {
		t.Fatal("fresh dir reported locked")
	}
	l, err := d.Lock()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Lock(); !errors.Is(err, ErrLocked) {
		t.Fatalf("second lock: got %v, want ErrLocked", err)
	}
	if !d.IsLocked() {
		t.Fatal("IsLocked = false while locked")
	}

	// A child that inherits the lock file keeps the lock after we let go.
	cmd := exec.Command("sleep", "30")
	cmd.ExtraFiles = []*os.File{l.File()}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	l.Release()
	if !d.IsLocked() {
		t.Fatal("lock lost although a child holds the file")
	}
	cmd.Process.Kill()
	cmd.Wait()
	l2, err := d.Lock()
	if err != nil {
		t.Fatalf("lock after the holder died: %v", err)
	}
	l2.Release()
}

func TestProcessLivenessSurvivesPIDReuseAndZombies(t *testing.T) {
	self, err := Self()
	if err != nil {
		t.Fatal(err)
	}
	if !self.Alive() {
		t.Fatal("Self not alive")
	}
	back, err := ParseProcess(self.String())
	if err != nil || back != self {
		t.Fatalf("ParseProcess(%q) = %v, %v", self.String(), back, err)
	}
	for _, bad := range []string{"", "12", "x 1", "-1 5", "1 2 3", "1 -2"} {
		if _, err := ParseProcess(bad); err == nil {
			t.Errorf("ParseProcess(%q) succeeded", bad)
		}
	}

	// Same PID, other start time: a stranger now owns the PID. Not alive,
	// and it must not be signalled.
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	p, err := ProcessOf(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	stranger := Process{PID: p.PID, StartTime: p.StartTime - 1}
	if stranger.Alive() {
		t.Error("process with a wrong start time reported alive")
	}
	if err := stranger.Signal(syscall.SIGKILL); !errors.Is(err, ErrGone) {
		t.Errorf("Signal to a reused PID: got %v, want ErrGone", err)
	}
	if !p.Alive() {
		t.Fatal("sleep was signalled through a stale record")
	}

	// A zombie (exited, not reaped) counts as gone.
	if err := p.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !p.WaitGone(5 * time.Second) {
		t.Fatal("killed process still alive")
	}
	if st := ProcState(p.PID); st != 'Z' {
		t.Logf("state %c (expected a zombie before Wait)", st)
	}
	if p.Alive() {
		t.Error("zombie reported alive")
	}
	if err := p.Signal(syscall.SIGTERM); !errors.Is(err, ErrGone) {
		t.Errorf("Signal to a zombie: got %v, want ErrGone", err)
	}
	cmd.Wait()
	if err := p.Stop(time.Second); err != nil {
		t.Errorf("Stop of a reaped process: %v", err)
	}
}

func TestProcessStopEscalatesToKill(t *testing.T) {
	// A shell that ignores SIGTERM must still be stopped.
	cmd := exec.Command("sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done")
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	buf := make([]byte, 6)
	if _, err := io.ReadFull(out, buf); err != nil {
		t.Fatal(err)
	}
	p, err := ProcessOf(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := p.Stop(300 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if p.Alive() {
		t.Fatal("alive after Stop")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Stop took %v", d)
	}
}

func TestProcessFileRoundTrip(t *testing.T) {
	d, err := Create(filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	self, _ := Self()
	if err := d.WriteProcess(ForwarderFile, self); err != nil {
		t.Fatal(err)
	}
	got, err := d.ReadProcess(ForwarderFile)
	if err != nil || got != self {
		t.Fatalf("ReadProcess = %v, %v; want %v", got, err, self)
	}
	if err := d.WriteFile(SupervisorPID, []byte("garbage")); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadProcess(SupervisorPID); err == nil {
		t.Error("garbage process record accepted")
	}
	if err := d.WritePID(ChildPIDFile, 42); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(d.Join(ChildPIDFile)); string(b) != "42" {
		t.Errorf("child_pid = %q, want RootlessKit's bare decimal", b)
	}
	if err := d.RemoveAll(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(d.Path()); !os.IsNotExist(err) {
		t.Errorf("dir still there after RemoveAll: %v", err)
	}
}

// TestBaseDirUnprivileged runs BaseDir as the test user with no
// XDG_RUNTIME_DIR (as on these machines): it gets a private dir of its own,
// and refuses one that another user planted first.
func TestBaseDirUnprivileged(t *testing.T) {
	testenv.RequireRoot(t)
	u := testenv.Unprivileged(t)
	bin := copyTestBinary(t)
	want := filepath.Join(os.TempDir(), "portkit-"+strconv.Itoa(u.UID))
	if _, err := os.Stat("/run/user/" + strconv.Itoa(u.UID)); err == nil {
		want = filepath.Join("/run/user", strconv.Itoa(u.UID), "portkit")
	}
	preexisting := true
	if _, err := os.Lstat(want); os.IsNotExist(err) {
		preexisting = false
	}

	run := func() (string, error) {
		cmd := u.Cmd(bin)
		cmd.Env = append(cmd.Env, "STATE_TEST_BASEDIR=1")
		out, err := cmd.CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	got, err := run()
	if err != nil {
		t.Fatalf("BaseDir as %s: %v: %s", u.Name, err, got)
	}
	if !preexisting {
		t.Cleanup(func() { os.RemoveAll(want) })
	}
	if got != want {
		t.Fatalf("BaseDir as %s = %q, want %q", u.Name, got, want)
	}
	st, err := os.Lstat(got)
	if err != nil {
		t.Fatal(err)
	}
	if sys := st.Sys().(*syscall.Stat_t); int(sys.Uid) != u.UID || st.Mode().Perm() != 0o700 || !st.IsDir() {
		t.Fatalf("%s: uid %d mode %v, want uid %d drwx------", got, sys.Uid, st.Mode(), u.UID)
	}

	if !strings.HasPrefix(want, os.TempDir()) || preexisting {
		return
	}
	// Another user got there first: planted a directory (or a symlink) at
	// the fallback path. BaseDir must refuse, not use it.
	os.RemoveAll(want)
	if err := os.Mkdir(want, 0o700); err != nil { // owned by root, not by u
		t.Fatal(err)
	}
	if out, err := run(); err == nil || !strings.Contains(out, "owned by uid 0") {
		t.Errorf("planted dir: got %v %q, want an ownership refusal", err, out)
	}
	os.Remove(want)
	if err := os.Symlink("/tmp", want); err != nil {
		t.Fatal(err)
	}
	if out, err := run(); err == nil || !strings.Contains(out, "symlink") {
		t.Errorf("planted symlink: got %v %q, want a symlink refusal", err, out)
	}
	os.Remove(want)
}

// copyTestBinary copies the running test binary where the test user may
// execute it (go test builds in a root-only directory).
func copyTestBinary(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "portkit-statebin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "state.test")
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}
