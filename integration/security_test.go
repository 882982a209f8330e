package integration

// Who can do what through portkit: state private to its user, symlinks
// planted in state directories not followed, recorded PIDs signalled only
// while they still name our process, nothing setuid, and the one
// capability portkit may be given (cap_net_bind_service on the listening
// binary) never passed on to the processes it starts.

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/state"
)

// secondUserName is another unprivileged user, the neighbour who must not
// reach the first user's forwarders or state.
const secondUserName = "portkit-test2"

// secondUser creates (once) and returns secondUserName. Needs root.
func secondUser(t *testing.T) *testenv.User {
	t.Helper()
	testenv.RequireRoot(t)
	if _, err := user.Lookup(secondUserName); err != nil {
		out, err := exec.Command("useradd", "--create-home", "--shell", "/bin/sh", secondUserName).CombinedOutput()
		if err != nil && !bytes.Contains(out, []byte("already exists")) {
			t.Fatalf("useradd %s: %v: %s", secondUserName, err, out)
		}
	}
	u, err := user.Lookup(secondUserName)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &testenv.User{Name: u.Username, UID: uid, GID: gid, Home: u.HomeDir}
}

// checkPrivate fails t unless path is owned by uid with exactly mode perm.
func checkPrivate(t *testing.T, path string, uid int, perm os.FileMode) {
	t.Helper()
	st, err := os.Lstat(path)
	if err != nil {
		t.Errorf("%s: %v", path, err)
		return
	}
	if int(st.Sys().(*syscall.Stat_t).Uid) != uid || st.Mode().Perm() != perm {
		t.Errorf("%s: mode %v owner %d, want %v owned by %d", path, st.Mode(), st.Sys().(*syscall.Stat_t).Uid, perm, uid)
	}
}

// TestStateIsPrivateToItsUser: a CNI attachment and a daemon of the test
// user keep their state in 0700 directories and their API sockets 0600, all
// owned by the user; a second unprivileged user can neither connect to the
// sockets, nor list or read the state, nor take a state directory over.
func TestStateIsPrivateToItsUser(t *testing.T) {
	u := testenv.Unprivileged(t)
	other := secondUser(t)
	rt := newCNIRuntime(t, u)
	_, a, _, addr := builtinAttach(t, rt, u, "ctr-sec-private")
	if err := ping(addr, "x"); err != nil {
		t.Fatal(err)
	}
	d, _ := builtinDaemon(t, u)
	var dirs, sockets, files []string
	for _, plugin := range []string{"usernet", "portdriver"} {
		rec := findAttachment(t, u, plugin, a.containerID)
		dirs = append(dirs, rec.StateDir, filepath.Dir(rec.StateDir), filepath.Dir(filepath.Dir(rec.StateDir)))
		sockets = append(sockets, filepath.Join(rec.StateDir, state.APISocket))
		files = append(files, rec.StateDir+".json", filepath.Join(rec.StateDir, state.PortsFile), filepath.Join(rec.StateDir, state.ConfigFile), filepath.Join(rec.StateDir, state.LogFile))
	}
	dirs = append(dirs, d.dir)
	sockets = append(sockets, d.sock)
	files = append(files, filepath.Join(d.dir, state.PortsFile), filepath.Join(d.dir, state.ConfigFile))
	for _, p := range dirs {
		checkPrivate(t, p, u.UID, 0o700)
	}
	for _, p := range append(sockets, files...) {
		checkPrivate(t, p, u.UID, 0o600)
	}
	// slirp4netns makes its own API socket with the mode its umask gives
	// (0755 here); the 0700 directory around it is what keeps others out,
	// which the second user's attempts below prove.
	slirpSock := filepath.Join(findAttachment(t, u, "usernet", a.containerID).StateDir, "slirp4netns.sock")
	if st, err := os.Lstat(slirpSock); err == nil {
		t.Logf("slirp4netns.sock mode %v (inside a 0700 directory)", st.Mode())
	}

	bin := testenv.Binary(t, "portkit")
	as := func(args ...string) (string, error) {
		out, err := other.Cmd(args[0], args[1:]...).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	for _, sock := range append(sockets, slirpSock) {
		out, err := as(bin, "list-ports", "--socket", sock)
		if err == nil || !strings.Contains(out, "permission denied") {
			t.Errorf("%s ran list-ports on %s: %v %s", other.Name, sock, err, out)
		}
		out, err = as("socat", "-u", "OPEN:/dev/null", "UNIX-CONNECT:"+sock)
		if err == nil {
			t.Errorf("%s connected to %s with socat: %s", other.Name, sock, out)
		}
	}
	for _, dir := range dirs {
		if out, err := as("ls", dir); err == nil {
			t.Errorf("%s listed %s: %s", other.Name, dir, out)
		}
	}
	for _, f := range files {
		if out, err := as("cat", f); err == nil {
			t.Errorf("%s read %s: %s", other.Name, f, out)
		}
	}
	// Nor can the neighbour point its own daemon at the user's state dir.
	out, err := as(bin, "daemon", "--state-dir", d.dir, "--port-driver", "none")
	if err == nil || !strings.Contains(out, "error:") {
		t.Errorf("%s ran a daemon on %s: %v %s", other.Name, d.dir, err, out)
	}
	t.Logf("%s on %s: %s", other.Name, d.dir, out)
	// Or stop the user's forwarder through its own CNI DEL.
	rt2 := newCNIRuntime(t, other)
	if err := rt2.del(t, conflist("portkit-rel", "1.1.0", builtinPlugins), a); err != nil {
		t.Logf("%s's DEL of the user's container: %v", other.Name, err)
	}
	if err := ping(addr, "still"); err != nil {
		t.Errorf("the user's port after %s's DEL: %v", other.Name, err)
	}
}

// TestPlantedSymlinksAreNotFollowed plants symlinks to a file the user may
// not touch where a forwarder writes and reads its state: ports.json (before
// an add, and before a restart that restores it) and api.sock (before a
// daemon starts). The victim file never changes and nothing is read from it.
func TestPlantedSymlinksAreNotFollowed(t *testing.T) {
	u := testenv.Unprivileged(t)
	victimDir := t.TempDir()
	os.Chmod(victimDir, 0o755)
	victim := filepath.Join(victimDir, "shadow-like")
	// Root-owned but world-readable, so a followed read would succeed.
	const precious = `{"nextID":7,"ports":[{"id":6,"spec":{"proto":"tcp","parentPort":1,"childPort":1}}]}`
	if err := os.WriteFile(victim, []byte(precious), 0o644); err != nil {
		t.Fatal(err)
	}
	plant := func(link string) {
		t.Helper()
		os.Remove(link)
		if err := os.Symlink(victim, link); err != nil {
			t.Fatal(err)
		}
		os.Lchown(link, u.UID, u.GID)
	}

	rt := newCNIRuntime(t, u)
	ns, a, _, addr := builtinAttach(t, rt, u, "ctr-sec-symlink")
	dir := findAttachment(t, u, "portdriver", a.containerID).StateDir
	sock := filepath.Join(dir, state.APISocket)
	ports := filepath.Join(dir, state.PortsFile)

	// An add rewrites ports.json: the link is replaced, not written through.
	plant(ports)
	l := testenv.Listen(t, ns.Path, "tcp", ":0")
	echoIn(l)
	hp := freePort(t)
	st, err := runAPIAdd(t, u, sock, libport.Spec{Proto: "tcp", ParentIP: "127.0.0.1", ParentPort: hp, ChildPort: l.Addr().(*net.TCPAddr).Port})
	t.Logf("add with ports.json planted as a symlink: %v %v", st, err)
	if fi, err := os.Lstat(ports); err != nil || fi.Mode().Type() == os.ModeSymlink {
		t.Errorf("ports.json after the add: %v %v (still the planted link?)", fi, err)
	}
	if b, _ := os.ReadFile(victim); string(b) != precious {
		t.Fatalf("the victim file was written through the planted link: %q", b)
	}

	// A restart reads ports.json: a planted link is refused, not read.
	plant(ports)
	fwd := mustRecorded(t, dir, state.ForwarderFile)
	syscall.Kill(fwd.PID, syscall.SIGKILL)
	if _, ok := waitFor(10*time.Second, func() bool {
		p, err := recordedProcess(dir, state.ForwarderFile)
		return err == nil && p != fwd && p.Alive() && ping(addr, "back") == nil
	}); !ok {
		log, _ := os.ReadFile(filepath.Join(dir, state.LogFile))
		t.Fatalf("the forwarder did not come back after a restart with a planted ports.json; log:\n%s", log)
	}
	log, _ := os.ReadFile(filepath.Join(dir, state.LogFile))
	if !strings.Contains(string(log), "symlink") {
		t.Errorf("the forwarder log does not say it refused the planted ports.json:\n%s", log)
	}
	if c, err := net.DialTimeout("tcp", "127.0.0.1:1", 200*time.Millisecond); err == nil {
		c.Close()
		t.Errorf("port 1 from the victim file was published")
	}
	if b, _ := os.ReadFile(victim); string(b) != precious {
		t.Fatalf("the victim file changed: %q", b)
	}

	// A daemon whose state dir has api.sock planted as a link refuses it.
	sd := filepath.Join(u.Dir(t), "st")
	os.Mkdir(sd, 0o700)
	os.Chown(sd, u.UID, u.GID)
	plant(filepath.Join(sd, state.APISocket))
	_, err = tryDaemon(t, u, sd, "--port-driver", "none")
	t.Logf("daemon with api.sock planted as a symlink: %v", err)
	if err == nil {
		t.Errorf("the daemon started over a planted api.sock link")
	}
	if b, _ := os.ReadFile(victim); string(b) != precious {
		t.Fatalf("the victim file changed: %q", b)
	}
	if _, err := os.Stat(victim); err != nil {
		t.Fatalf("the victim file was removed: %v", err)
	}
}

// runAPIAdd adds spec over the API socket as u (with `portkit add-ports`).
func runAPIAdd(t *testing.T, u *testenv.User, sock string, spec libport.Spec) (string, error) {
	t.Helper()
	out, err := u.Cmd(testenv.Binary(t, "portkit"), "add-ports", "--socket", sock, spec.String()).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// TestStrangerPIDInStateFileIsNotSignalled: an attachment's processes die
// (SIGKILL, no DEL) and their PIDs are taken by a stranger of the same
// user. DEL, reading the state files, must not signal the stranger.
func TestStrangerPIDInStateFileIsNotSignalled(t *testing.T) {
	u := testenv.Unprivileged(t)
	rt := newCNIRuntime(t, u)
	snap := snapshotState(u)
	ns, a, list, _ := builtinAttach(t, rt, u, "ctr-sec-pid")
	var dirs []string
	for _, plugin := range []string{"usernet", "portdriver"} {
		dir := findAttachment(t, u, plugin, a.containerID).StateDir
		dirs = append(dirs, dir)
		sup := mustRecorded(t, dir, state.SupervisorPID)
		// Stop the whole tree at once so nothing restarts, then kill it.
		procs := testenv.Descendants(sup)
		for _, p := range procs {
			syscall.Kill(p.PID, syscall.SIGSTOP)
		}
		for _, p := range procs {
			syscall.Kill(p.PID, syscall.SIGKILL)
		}
		testenv.WaitGone(t, procs, 5*time.Second)
	}
	stranger := u.Cmd("sleep", "300")
	testenv.Start(t, stranger)
	sp, err := state.ProcessOf(stranger.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	// The stranger's PID, as if reused: same number, another start time.
	fake := state.Process{PID: sp.PID, StartTime: sp.StartTime - 1}
	for _, dir := range dirs {
		for _, name := range []string{state.SupervisorPID, state.ForwarderFile, state.NetworkPID} {
			path := filepath.Join(dir, name)
			if _, err := os.Lstat(path); err == nil {
				// Overwrite in place: the file keeps its owner and mode.
				if err := os.WriteFile(path, []byte(fake.String()+"\n"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	if err := rt.del(t, list, a); err != nil {
		t.Errorf("DEL: %v", err)
	}
	time.Sleep(100 * time.Millisecond)
	if !sp.Alive() {
		t.Fatalf("DEL signalled pid %d, a stranger whose PID was recorded with another start time", sp.PID)
	}
	t.Logf("stranger pid %d alive after DEL read records naming it", sp.PID)
	assertClean(t, rt, snap, ns.PID)
}

// TestNothingInstalledIsSetuid: what `make install` would run installs
// every file 0755 or 0644, with no setuid/setgid bit and no setcap; the
// built binaries carry neither.
func TestNothingInstalledIsSetuid(t *testing.T) {
	root := testenv.ModuleRoot(t)
	out, err := exec.Command("make", "-n", "-C", root, "install", "DESTDIR=/nonexistent-portkit-dest").CombinedOutput()
	if err != nil {
		t.Fatalf("make -n install: %v: %s", err, out)
	}
	script := string(out)
	if !strings.Contains(script, "install -m 0755") {
		t.Fatalf("make -n install shows no `install -m 0755`: the check below would see nothing:\n%s", script)
	}
	for _, bad := range []string{"setcap", "u+s", "g+s", "chmod 4", "chmod 2", "-m 4", "-m 2", "-m 6", "chown root"} {
		if strings.Contains(script, bad) {
			t.Errorf("make install runs %q:\n%s", bad, script)
		}
	}
	for _, name := range []string{"portkit", "usernet", "portdriver", "portkit-oci-hook"} {
		bin := testenv.Binary(t, name)
		st, err := os.Stat(bin)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode()&(os.ModeSetuid|os.ModeSetgid) != 0 {
			t.Errorf("%s is %v", name, st.Mode())
		}
		if getcap, err := exec.LookPath("getcap"); err == nil {
			if caps, _ := exec.Command(getcap, bin).Output(); len(bytes.TrimSpace(caps)) > 0 {
				t.Errorf("%s has file capabilities: %s", name, caps)
			}
		}
	}
}

// capLine reads CapInh/CapPrm/CapEff/CapBnd/CapAmb of pid as hex masks.
func capLine(pid int) map[string]uint64 {
	m := map[string]uint64{}
	for _, f := range []string{"CapPrm", "CapEff", "CapAmb", "CapInh"} {
		v, _ := strconv.ParseUint(procStatus(pid, f), 16, 64)
		m[f] = v
	}
	return m
}

// TestBindCapabilityIsNotPassedToChildren runs `portkit daemon` from a copy
// of the binary with `setcap cap_net_bind_service=ep`, as the user, with
// slirp4netns and with pasta as the network and the builtin driver: it
// publishes a port below 1024, holds exactly cap_net_bind_service itself,
// and none of the processes it starts holds a capability in the host's
// user namespace or any ambient capability (those inside the child's user
// namespace hold capabilities over that namespace only, as any rootless
// container's root does).
func TestBindCapabilityIsNotPassedToChildren(t *testing.T) {
	u := testenv.Unprivileged(t)
	setcap := testenv.RequireBinary(t, "setcap")
	dir := u.Dir(t)
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "portkit")
	data, err := os.ReadFile(testenv.Binary(t, "portkit"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(setcap, "cap_net_bind_service=ep", bin).CombinedOutput(); err != nil {
		t.Skipf("setcap on %s: %v: %s (file capabilities unsupported here)", bin, err, out)
	}
	const bindService = 1 << 10 // CAP_NET_BIND_SERVICE
	selfUserns, _ := os.Readlink("/proc/self/ns/user")
	for _, backend := range []string{"slirp4netns", "pasta"} {
		t.Run(backend, func(t *testing.T) {
			testenv.RequireBinary(t, backend)
			ns := testenv.ChildNetns(t, u)
			l := testenv.Listen(t, ns.Path, "tcp4", "127.0.0.1:0")
			echoIn(l)
			low := 0
			for p := 1023; p > 900 && low == 0; p-- {
				if c, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(p)); err == nil {
					c.Close()
					low = p
				}
			}
			if low == 0 {
				t.Fatal("no free port between 900 and 1023")
			}
			sd := filepath.Join(u.Dir(t), "st")
			d, err := tryDaemonBin(t, u, bin, sd, "--port-driver", "builtin", "--netns", ns.Path, "--net", backend,
				"-p", fmt.Sprintf("127.0.0.1:%d:%d/tcp", low, l.Addr().(*net.TCPAddr).Port))
			if err != nil {
				t.Fatal(err)
			}
			if err := ping("127.0.0.1:"+strconv.Itoa(low), "priv"); err != nil {
				t.Fatalf("privileged port %d through the setcap binary: %v", low, err)
			}
			if _, err := d.client.Info(context.Background()); err != nil {
				t.Fatal(err)
			}
			self := capLine(d.pid())
			t.Logf("daemon (pid %d): CapPrm %x CapEff %x CapAmb %x", d.pid(), self["CapPrm"], self["CapEff"], self["CapAmb"])
			if self["CapEff"] != bindService || self["CapPrm"] != bindService || self["CapAmb"] != 0 {
				t.Errorf("the daemon holds CapPrm %x CapEff %x CapAmb %x, want exactly cap_net_bind_service (%x) and no ambient", self["CapPrm"], self["CapEff"], self["CapAmb"], bindService)
			}
			// pasta daemonizes: find it by its netns argument rather than as a descendant.
			root, _ := state.ProcessOf(d.pid())
			procs := testenv.Descendants(root)
			if n := mustRecordedOrZero(sd); n != 0 {
				if p, err := state.ProcessOf(n); err == nil {
					procs = append(procs, testenv.Descendants(p)...)
				}
			}
			seen := map[string]bool{}
			done := map[int]bool{d.pid(): true}
			for _, p := range procs {
				if done[p.PID] {
					continue
				}
				done[p.PID] = true
				comm := procComm(p.PID)
				seen[comm] = true
				caps := capLine(p.PID)
				userns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/user", p.PID))
				where := "child userns"
				if userns == selfUserns {
					where = "host userns"
				}
				t.Logf("%s (pid %d, %s): CapPrm %x CapEff %x CapAmb %x CapInh %x", comm, p.PID, where, caps["CapPrm"], caps["CapEff"], caps["CapAmb"], caps["CapInh"])
				if caps["CapAmb"] != 0 || caps["CapInh"] != 0 {
					t.Errorf("%s (pid %d) has ambient/inheritable capabilities %x/%x", comm, p.PID, caps["CapAmb"], caps["CapInh"])
				}
				if where == "host userns" && (caps["CapPrm"] != 0 || caps["CapEff"] != 0) {
					t.Errorf("%s (pid %d) holds capabilities %x in the host's user namespace", comm, p.PID, caps["CapEff"])
				}
			}
			if !seen["portkit-netns"] || !seen[backend] && !seen["passt.avx2"] && !seen["passt"] {
				t.Errorf("did not see both the helper and %s among the daemon's processes: %v", backend, seen)
			}
		})
	}
}

// mustRecordedOrZero is the PID of network.pid in dir, or 0.
func mustRecordedOrZero(dir string) int {
	p, err := recordedProcess(dir, state.NetworkPID)
	if err != nil {
		return 0
	}
	return p.PID
}
