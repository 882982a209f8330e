package integration

// State under pressure: a full or read-only state directory at ADD, an ADD
// repeated for one container, and many containers added and deleted at once.

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
)

// tinyTmpfs mounts a tmpfs of pages 4 KiB pages owned by u, removed at cleanup.
func tinyTmpfs(t *testing.T, u *testenv.User, pages int) string {
	t.Helper()
	testenv.RequireRoot(t)
	base, err := os.MkdirTemp("", "portkit-tmpfs-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(base, 0o755)
	mnt := filepath.Join(base, "run")
	os.Mkdir(mnt, 0o700)
	opts := fmt.Sprintf("size=%d,mode=0700,uid=%d,gid=%d", pages*4096, u.UID, u.GID)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", opts, "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs (%v: %s): needs root with CAP_SYS_ADMIN", err, out)
	}
	t.Cleanup(func() {
		_ = exec.Command("umount", "-l", mnt).Run()
		os.RemoveAll(base)
	})
	return mnt
}

// fill writes a root-owned file that leaves exactly free pages of a
// tmpfs of total pages.
func fill(t *testing.T, mnt string, total, free int) {
	t.Helper()
	f := filepath.Join(mnt, ".filler")
	if err := os.WriteFile(f, make([]byte, (total-free)*4096), 0o600); err != nil {
		t.Fatalf("fill %s: %v", mnt, err)
	}
}

// filesUnder lists regular files, sockets and symlinks below dir (not directories).
func filesUnder(dir string) []string {
	var out []string
	_ = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() && filepath.Base(p) != ".filler" {
			out = append(out, p)
		}
		return nil
	})
	return out
}

// TestAddWithFullStateDirFailsCleanly runs ADD with the user's runtime dir
// (XDG_RUNTIME_DIR) on a tmpfs left with 0, 1, 2, ... free pages, so the
// failure hits a different file each time. Every ADD either works or
// fails with an error that says the disk is full; a failed ADD (and the
// DEL the runtime sends after it) leaves no file and no process.
func TestAddWithFullStateDirFailsCleanly(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "slirp4netns")
	rt := newCNIRuntime(t, u)
	ns := testenv.ChildNetns(t, u)
	list := conflist("portkit-full", "1.1.0", builtinPlugins)
	const total = 32
	succeeded := -1
	for free := 0; free <= 24 && succeeded < 0; free++ {
		mnt := tinyTmpfs(t, u, total)
		fill(t, mnt, total, free)
		rt.env = []string{"XDG_RUNTIME_DIR=" + mnt}
		a := attachmentArgs{containerID: "ctr-full-" + strconv.Itoa(free), netns: ns.Path, ifName: "eth0",
			caps: map[string]any{"portMappings": []map[string]any{{"hostPort": freePort(t), "containerPort": 80, "protocol": "tcp"}}}}
		old := snapshotState(u).pids // zombies of earlier tests are not ours
		_, err := rt.add(t, list, a)
		if err == nil {
			succeeded = free
			t.Logf("%d free pages: ADD works", free)
			if err := rt.del(t, list, a); err != nil {
				t.Errorf("DEL: %v", err)
			}
		} else {
			t.Logf("%d free pages: ADD: %v", free, err)
			if !strings.Contains(err.Error(), "no space left on device") {
				t.Errorf("%d free pages: ADD failed with %v, want it to say no space left on device", free, err)
			}
			// A failing first plugin (usernet) must leave nothing; when the
			// chained portdriver fails, usernet's attachment stays for the
			// DEL the runtime sends (libcni leaves rollback to the runtime).
			if left := filesUnder(mnt); len(left) > 0 && strings.Contains(err.Error(), "usernet ADD") {
				t.Errorf("%d free pages: the failed ADD left %v", free, left)
			}
			if err := rt.del(t, list, a); err != nil {
				t.Errorf("%d free pages: DEL after the failed ADD: %v", free, err)
			}
		}
		if left := filesUnder(mnt); len(left) > 0 {
			t.Errorf("%d free pages: after DEL: %v", free, left)
		}
		if _, ok := waitFor(3*time.Second, func() bool { return len(ourProcesses(rt.pluginDir, ns.PID, old)) == 0 }); !ok {
			t.Errorf("%d free pages: processes left: %v", free, ourProcesses(rt.pluginDir, ns.PID, old))
		}
	}
	if succeeded < 0 {
		t.Errorf("ADD never succeeded, even with 24 free pages (96 KiB)")
	}
}

// TestAddWithReadOnlyStateDirFailsCleanly: the runtime dir is a read-only
// mount (and, separately, a 0500 directory): ADD says so and makes nothing.
func TestAddWithReadOnlyStateDirFailsCleanly(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "slirp4netns")
	rt := newCNIRuntime(t, u)
	ns := testenv.ChildNetns(t, u)
	list := conflist("portkit-ro", "1.1.0", builtinPlugins)
	old := snapshotState(u).pids // zombies of earlier tests are not ours
	a := attachmentArgs{containerID: "ctr-ro", netns: ns.Path, ifName: "eth0",
		caps: map[string]any{"portMappings": []map[string]any{{"hostPort": freePort(t), "containerPort": 80, "protocol": "tcp"}}}}

	ro := tinyTmpfs(t, u, 64)
	if out, err := exec.Command("mount", "-o", "remount,ro", ro).CombinedOutput(); err != nil {
		t.Fatalf("remount ro: %v: %s", err, out)
	}
	rt.env = []string{"XDG_RUNTIME_DIR=" + ro}
	_, err := rt.add(t, list, a)
	t.Logf("read-only mount: ADD: %v", err)
	if err == nil || !strings.Contains(err.Error(), "read-only file system") {
		t.Errorf("ADD on a read-only runtime dir: %v, want an error saying read-only file system", err)
	}
	// DEL of an attachment that never got a record succeeds: a state dir
	// that cannot even be made holds nothing to delete.
	if err := rt.del(t, list, a); err != nil {
		t.Errorf("read-only mount: DEL after the failed ADD: %v, want success (nothing was recorded)", err)
	}
	if left := filesUnder(ro); len(left) > 0 {
		t.Errorf("read-only mount: left %v", left)
	}

	// A runtime dir whose portkit/cni directory lost its write bit.
	rw := tinyTmpfs(t, u, 64)
	cni := filepath.Join(rw, "portkit", "cni")
	os.MkdirAll(cni, 0o700)
	exec.Command("chown", "-R", fmt.Sprintf("%d:%d", u.UID, u.GID), filepath.Join(rw, "portkit")).Run()
	os.Chmod(cni, 0o500)
	rt.env = []string{"XDG_RUNTIME_DIR=" + rw}
	_, err = rt.add(t, list, a)
	t.Logf("0500 state dir: ADD: %v", err)
	if err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("ADD with a 0500 state dir: %v, want an error saying permission denied", err)
	}
	if left := filesUnder(rw); len(left) > 0 {
		t.Errorf("0500 state dir: left %v", left)
	}
	if procs := ourProcesses(rt.pluginDir, ns.PID, old); len(procs) > 0 {
		t.Errorf("processes left: %v", procs)
	}
}

// TestDaemonWithFullStateDirFailsCleanly: `portkit daemon` on a full
// state dir exits 1 with a clear error and leaves nothing.
func TestDaemonWithFullStateDirFailsCleanly(t *testing.T) {
	u := testenv.Unprivileged(t)
	mnt := tinyTmpfs(t, u, 8)
	fill(t, mnt, 8, 0)
	_, err := tryDaemon(t, u, filepath.Join(mnt, "st"), "--port-driver", "none")
	t.Logf("daemon on a full state dir: %v", err)
	if err == nil || !strings.Contains(err.Error(), "no space left on device") {
		t.Errorf("daemon on a full state dir: %v, want exit with no space left on device", err)
	}
	if left := filesUnder(mnt); len(left) > 0 {
		t.Errorf("left %v", left)
	}
	if _, err := os.Stat(filepath.Join(mnt, "st")); err == nil {
		t.Errorf("the daemon left its state dir %s behind", filepath.Join(mnt, "st"))
	}
}

// whoServer answers every connection with name.
func whoServer(t *testing.T, nsPath, name string) int {
	t.Helper()
	l := testenv.Listen(t, nsPath, "tcp", ":0")
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(name))
			c.Close()
		}
	}()
	return l.Addr().(*net.TCPAddr).Port
}

func readName(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if n > 0 {
		err = nil
	}
	return string(buf[:n]), err
}

// TestSecondAddForOneContainerReplacesTheFirst: a runtime sends ADD twice
// for one container (it lost track). The second replaces the first: the
// first host port closes, the second serves, and the number of our
// processes and state entries is what one attachment needs.
func TestSecondAddForOneContainerReplacesTheFirst(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "slirp4netns")
	rt := newCNIRuntime(t, u)
	ns := testenv.ChildNetns(t, u)
	childPort := whoServer(t, ns.Path, "ctr")
	list := conflist("portkit-twice", "1.1.0", builtinPlugins)
	snap := snapshotState(u)
	ports := []int{freePort(t), freePort(t)}
	var procs, entries []int
	var args attachmentArgs
	for i, hp := range ports {
		args = attachmentArgs{containerID: "ctr-twice", netns: ns.Path, ifName: "eth0",
			caps: map[string]any{"portMappings": []map[string]any{{"hostPort": hp, "containerPort": childPort, "protocol": "tcp"}}}}
		if _, err := rt.add(t, list, args); err != nil {
			t.Fatalf("ADD %d: %v", i+1, err)
		}
		procs = append(procs, len(ourProcesses(rt.pluginDir, ns.PID, snap.pids)))
		entries = append(entries, len(snap.newEntries()))
	}
	if got, err := readName("127.0.0.1:" + strconv.Itoa(ports[1])); err != nil || got != "ctr" {
		t.Errorf("the second ADD's port: %q %v", got, err)
	}
	if _, err := readName("127.0.0.1:" + strconv.Itoa(ports[0])); err == nil {
		t.Errorf("the first ADD's port %d still answers after the second ADD replaced it", ports[0])
	}
	t.Logf("our processes after ADD 1: %d, after ADD 2: %d; state entries %d, %d", procs[0], procs[1], entries[0], entries[1])
	if procs[0] != procs[1] || entries[0] != entries[1] {
		t.Errorf("a second ADD for one container grew our processes %v or state entries %v", procs, entries)
	}
	if err := rt.del(t, list, args); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	assertClean(t, rt, snap, ns.PID)
}

// TestConcurrentAddDelOfTwentyContainers: 20 containers ADDed at once, each
// port answering with its own container's name (no crossed state); then 10
// DELs and 10 CHECKs at once, then the other 10 DELs. Afterwards our
// processes, state entries and the test process's fds are back where they
// started.
func TestConcurrentAddDelOfTwentyContainers(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "slirp4netns")
	rt := newCNIRuntime(t, u)
	const n = 20
	list := conflist("portkit-many", "1.1.0", builtinPlugins)
	type ctr struct {
		ns   *testenv.Netns
		args attachmentArgs
		addr string
	}
	ctrs := make([]ctr, n)
	for i := range ctrs {
		ns := testenv.ChildNetns(t, u)
		name := fmt.Sprintf("ctr-many-%02d", i)
		hp := freePort(t)
		ctrs[i] = ctr{ns: ns, addr: "127.0.0.1:" + strconv.Itoa(hp), args: attachmentArgs{containerID: name, netns: ns.Path, ifName: "eth0",
			caps: map[string]any{"portMappings": []map[string]any{{"hostPort": hp, "containerPort": whoServer(t, ns.Path, name), "protocol": "tcp"}}}}}
	}
	snap := snapshotState(u)
	fdsBefore := procFDCount(os.Getpid())
	parallel := func(what string, idx []int, f func(c ctr) error) time.Duration {
		start := time.Now()
		var wg sync.WaitGroup
		errs := make([]error, n)
		for _, i := range idx {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = f(ctrs[i])
			}()
		}
		wg.Wait()
		for _, i := range idx {
			if errs[i] != nil {
				t.Errorf("%s %s: %v", what, ctrs[i].args.containerID, errs[i])
			}
		}
		return time.Since(start)
	}
	all, first, second := []int{}, []int{}, []int{}
	for i := 0; i < n; i++ {
		all = append(all, i)
		if i%2 == 0 {
			first = append(first, i)
		} else {
			second = append(second, i)
		}
	}
	took := parallel("ADD", all, func(c ctr) error {
		_, err := rt.add(t, list, c.args)
		return err
	})
	t.Logf("20 ADDs at once: %v", took.Round(time.Millisecond))
	for _, c := range ctrs {
		if got, err := readName(c.addr); err != nil || got != c.args.containerID {
			t.Errorf("%s's port %s answered %q (%v)", c.args.containerID, c.addr, got, err)
		}
	}
	peak := len(ourProcesses(rt.pluginDir, 0, snap.pids))
	took = parallel("DEL+CHECK", all, func(c ctr) error {
		for _, i := range first {
			if ctrs[i].args.containerID == c.args.containerID {
				return rt.del(t, list, c.args)
			}
		}
		return rt.check(t, list, c.args)
	})
	t.Logf("10 DELs and 10 CHECKs at once: %v", took.Round(time.Millisecond))
	for _, i := range second {
		if got, err := readName(ctrs[i].addr); err != nil || got != ctrs[i].args.containerID {
			t.Errorf("%s's port after the others' DEL: %q (%v)", ctrs[i].args.containerID, got, err)
		}
	}
	for _, i := range first {
		if _, err := readName(ctrs[i].addr); err == nil {
			t.Errorf("%s's port still answers after its DEL", ctrs[i].args.containerID)
		}
	}
	took = parallel("DEL", second, func(c ctr) error { return rt.del(t, list, c.args) })
	t.Logf("10 more DELs at once: %v", took.Round(time.Millisecond))
	var left []string
	waitFor(5*time.Second, func() bool {
		left = ourProcesses(rt.pluginDir, 0, snap.pids)
		return len(left) == 0
	})
	t.Logf("our processes at the peak: %d; after all DELs: %d; test process fds %d before, %d after",
		peak, len(left), fdsBefore, procFDCount(os.Getpid()))
	if len(left) > 0 {
		t.Errorf("processes left after every DEL:\n%s", strings.Join(left, "\n"))
	}
	if e := snap.newEntries(); len(e) > 0 {
		t.Errorf("state left after every DEL: %v", e)
	}
	if fds := procFDCount(os.Getpid()); fds > fdsBefore+4 {
		t.Errorf("the test process (libcni's side) went from %d to %d fds", fdsBefore, fds)
	}
}
