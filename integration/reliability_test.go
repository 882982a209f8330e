package integration

// Faults a rootless user's containers meet in real life — a forwarder,
// helper or network process killed, a container that vanished without DEL,
// a service that stopped listening — and what portkit does about them. Each
// test drives the real plugins through libcni as the unprivileged user
// owning the netns, and measures recovery and leftovers from /proc.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport/state"
)

// TestForwarderKilledMidTransferPortsComeBack: kill -9 of the builtin
// forwarder while a transfer runs. The client's connection ends (not
// hangs), CHECK reports the outage while the supervisor is held, and once
// the supervisor runs the port is back within 2 s without anyone re-adding it.
func TestForwarderKilledMidTransferPortsComeBack(t *testing.T) {
	u := testenv.Unprivileged(t)
	rt := newCNIRuntime(t, u)
	snap := snapshotState(u)
	ns, a, list, addr := builtinAttach(t, rt, u, "ctr-rel-fwdkill")
	dir := findAttachment(t, u, "portdriver", a.containerID).StateDir
	if err := ping(addr, "before"); err != nil {
		t.Fatalf("port before the fault: %v", err)
	}
	sup := mustRecorded(t, dir, state.SupervisorPID)
	fwd := mustRecorded(t, dir, state.ForwarderFile)
	before := treeUsage(sup.PID)

	// A transfer in flight: write and read back until the connection breaks.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	transferDone := make(chan error, 1)
	var moved int64
	go func() {
		buf := make([]byte, 64<<10)
		go func() { _, _ = io.Copy(io.Discard, c) }()
		for {
			n, err := c.Write(buf)
			moved += int64(n)
			if err != nil {
				transferDone <- err
				return
			}
		}
	}()
	time.Sleep(200 * time.Millisecond)

	// Hold the supervisor so the outage lasts long enough for CHECK to see it.
	if err := syscall.Kill(sup.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			syscall.Kill(sup.PID, syscall.SIGCONT)
		}
	}()
	if err := syscall.Kill(fwd.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	select {
	case err := <-transferDone:
		t.Logf("in-flight transfer ended %v after the kill (%d MiB moved): %v", time.Since(killed).Round(time.Millisecond), moved>>20, err)
	case <-time.After(3 * time.Second):
		t.Errorf("in-flight transfer still blocked 3 s after its forwarder was killed")
	}
	fwd.WaitGone(2 * time.Second)
	err = rt.check(t, list, a)
	if err == nil || !strings.Contains(err.Error(), "not running") || !strings.Contains(err.Error(), "restarting") {
		t.Errorf("CHECK during the outage: %v, want it to say the forwarder is not running and is being restarted", err)
	} else {
		t.Logf("CHECK during the outage: %v", err)
	}
	syscall.Kill(sup.PID, syscall.SIGCONT)
	stopped = false
	resumed := time.Now()
	took, ok := waitFor(10*time.Second, func() bool { return ping(addr, "after") == nil })
	if !ok {
		log, _ := os.ReadFile(filepath.Join(dir, state.LogFile))
		t.Fatalf("port not back 10 s after the supervisor resumed; log:\n%s", log)
	}
	t.Logf("port back %v after the supervisor resumed (%v after SIGKILL)", took.Round(time.Millisecond), time.Since(killed).Round(time.Millisecond))
	if took > 2*time.Second {
		t.Errorf("port back after %v, want within 2 s", took)
	}
	_ = resumed
	// The restarted forwarder publishes its ports a moment before its API
	// socket listens, so CHECK may need that moment more.
	var checkErr error
	if _, ok := waitFor(2*time.Second, func() bool { checkErr = rt.check(t, list, a); return checkErr == nil }); !ok {
		t.Errorf("CHECK after recovery: %v", checkErr)
	}
	// The restarted tree is the same size as the one it replaced.
	after := treeUsage(sup.PID)
	t.Logf("portdriver forwarder tree before: %v; after restart: %v", before, after)
	if after.procs != before.procs || after.fds > before.fds+8 {
		t.Errorf("forwarder tree grew across the restart: before %v, after %v", before, after)
	}
	if err := rt.del(t, list, a); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	assertClean(t, rt, snap, ns.PID)
}

// TestForwarderKilledWithoutSupervisorHoldRecoversWithin2s is the plain
// case: SIGKILL, nothing held; new connections work within 2 s.
func TestForwarderKilledWithoutHoldRecoversWithin2s(t *testing.T) {
	u := testenv.Unprivileged(t)
	rt := newCNIRuntime(t, u)
	_, a, _, addr := builtinAttach(t, rt, u, "ctr-rel-fwdkill2")
	dir := findAttachment(t, u, "portdriver", a.containerID).StateDir
	var worst time.Duration
	for round := 0; round < 3; round++ {
		fwd := mustRecorded(t, dir, state.ForwarderFile)
		syscall.Kill(fwd.PID, syscall.SIGKILL)
		took, ok := waitFor(10*time.Second, func() bool {
			p, err := recordedProcess(dir, state.ForwarderFile)
			return err == nil && p != fwd && ping(addr, "x") == nil
		})
		if !ok {
			log, _ := os.ReadFile(filepath.Join(dir, state.LogFile))
			t.Fatalf("round %d: port not back 10 s after SIGKILL; log:\n%s", round, log)
		}
		worst = max(worst, took)
	}
	t.Logf("port back after SIGKILL of the forwarder: worst of 3 rounds %v", worst.Round(time.Millisecond))
	if worst > 2*time.Second {
		t.Errorf("port back after %v, want within 2 s", worst)
	}
}

// TestNetnsHelperKilledIsRestarted: kill -9 of the helper (portkit-netns)
// that makes sockets in the child netns. New connections keep working
// (pooled sockets survive it, then a new helper is started), and the
// forwarder neither spins nor leaks.
func TestNetnsHelperKilledIsRestarted(t *testing.T) {
	u := testenv.Unprivileged(t)
	rt := newCNIRuntime(t, u)
	_, a, _, addr := builtinAttach(t, rt, u, "ctr-rel-helper")
	dir := findAttachment(t, u, "portdriver", a.containerID).StateDir
	fwd := mustRecorded(t, dir, state.ForwarderFile)
	helpers := descendantsNamed(fwd.PID, "portkit-netns")
	if len(helpers) != 1 {
		t.Fatalf("forwarder %d has helpers %v, want one portkit-netns (tree: %v)", fwd.PID, helpers, treeUsage(fwd.PID))
	}
	for i := 0; i < 20; i++ {
		if err := ping(addr, "warm"); err != nil {
			t.Fatal(err)
		}
	}
	fdsBefore := procFDCount(fwd.PID)
	if err := syscall.Kill(helpers[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	// More connections than any pool holds: the helper must come back.
	failed := 0
	var firstErr error
	for i := 0; i < 300; i++ {
		if err := ping(addr, "n"+strconv.Itoa(i)); err != nil {
			failed++
			if firstErr == nil {
				firstErr = err
			}
		}
	}
	if failed > 0 {
		t.Errorf("%d of 300 connections failed after the helper was killed (first: %v)", failed, firstErr)
	}
	var newHelper []int
	took, ok := waitFor(5*time.Second, func() bool {
		newHelper = descendantsNamed(fwd.PID, "portkit-netns")
		return len(newHelper) == 1 && newHelper[0] != helpers[0]
	})
	if !ok {
		t.Fatalf("no new helper 5 s after the old one was killed: helpers %v", newHelper)
	}
	t.Logf("helper %d killed; new helper %d running %v later (after 300 connections, %d failed)",
		helpers[0], newHelper[0], time.Since(killed).Round(time.Millisecond)-took, failed)
	log, _ := os.ReadFile(filepath.Join(dir, state.LogFile))
	if !strings.Contains(string(log), "died") {
		t.Errorf("the forwarder log does not mention the helper's death:\n%s", log)
	}
	cpu0 := procCPU(fwd.PID)
	time.Sleep(time.Second)
	cpu := procCPU(fwd.PID) - cpu0
	fdsAfter := procFDCount(fwd.PID)
	t.Logf("forwarder fds %d before, %d after; CPU while idle %d ticks/s", fdsBefore, fdsAfter, cpu)
	if cpu > 10 {
		t.Errorf("forwarder used %d ticks of CPU in 1 s of idling after the helper's death: spinning", cpu)
	}
	// The socket pool holds between 16 and 16+64 ready sockets per kind
	// (libport/netns poolBatch), so its level alone moves the count by 64.
	if fdsAfter > fdsBefore+64+4 {
		t.Errorf("forwarder fds grew from %d to %d across the helper's restart", fdsBefore, fdsAfter)
	}
}

// TestSlirp4netnsKilledCheckNamesItAndItComesBack: kill -9 of slirp4netns.
// While usernet's forwarder is held, CHECK fails naming slirp4netns; let
// go, the forwarder is replaced with a new slirp4netns, CHECK passes again,
// and nothing spins.
func TestSlirp4netnsKilledCheckNamesItAndItComesBack(t *testing.T) {
	u := testenv.Unprivileged(t)
	rt := newCNIRuntime(t, u)
	ns, a, list, addr := builtinAttach(t, rt, u, "ctr-rel-slirp")
	dir := findAttachment(t, u, "usernet", a.containerID).StateDir
	fwd := mustRecorded(t, dir, state.ForwarderFile)
	sup := mustRecorded(t, dir, state.SupervisorPID)
	slirp := mustRecorded(t, dir, state.NetworkPID)
	if c := procComm(slirp.PID); c != "slirp4netns" {
		t.Fatalf("network.pid names %q, want slirp4netns", c)
	}
	syscall.Kill(fwd.PID, syscall.SIGSTOP)
	held := true
	defer func() {
		if held {
			syscall.Kill(fwd.PID, syscall.SIGCONT)
		}
	}()
	syscall.Kill(slirp.PID, syscall.SIGKILL)
	killed := time.Now()
	waitFor(2*time.Second, func() bool { return !slirp.Alive() })
	err := rt.check(t, list, a)
	if err == nil || !strings.Contains(err.Error(), "slirp4netns") || !strings.Contains(err.Error(), "not running") {
		t.Errorf("CHECK with slirp4netns dead: %v, want an error naming slirp4netns", err)
	} else {
		t.Logf("CHECK with slirp4netns dead: %v", err)
	}
	syscall.Kill(fwd.PID, syscall.SIGCONT)
	held = false
	resumed := time.Now()
	// CHECK passes again once a new slirp4netns runs, with the MAC the ADD
	// result carries (the forwarder chose it once, at spawn).
	var checkErr error
	took, ok := waitFor(15*time.Second, func() bool {
		checkErr = rt.check(t, list, a)
		return checkErr == nil
	})
	if !ok {
		log, _ := os.ReadFile(filepath.Join(dir, state.LogFile))
		t.Fatalf("CHECK still failing 15 s after slirp4netns was killed: %v; log:\n%s", checkErr, log)
	}
	newSlirp := mustRecorded(t, dir, state.NetworkPID)
	if !newSlirp.Alive() || newSlirp == slirp || procComm(newSlirp.PID) != "slirp4netns" {
		t.Errorf("no new slirp4netns recorded after the old one died: %v", newSlirp)
	}
	t.Logf("slirp4netns %d killed; process tree healthy again %v after the forwarder resumed (new slirp4netns %d, %v after the kill)",
		slirp.PID, took.Round(time.Millisecond), newSlirp.PID, time.Since(killed).Round(time.Millisecond))
	_ = resumed
	// The published port works again (builtin dials the child's address on eth0).
	if _, ok := waitFor(5*time.Second, func() bool { return ping(addr, "after-slirp") == nil }); !ok {
		t.Errorf("published port dead after slirp4netns came back: %v", ping(addr, "after-slirp"))
	}
	checkIdle(t, "usernet supervisor", sup.PID)
	if p, err := recordedProcess(dir, state.ForwarderFile); err == nil {
		checkIdle(t, "usernet forwarder", p.PID)
	}
	_ = ns
}

// checkIdle fails t if pid burns more than 10 ticks (0.1 s) of CPU in 1 s.
func checkIdle(t *testing.T, what string, pid int) {
	t.Helper()
	c0 := procCPU(pid)
	time.Sleep(time.Second)
	c1 := procCPU(pid)
	if c0 < 0 || c1 < 0 {
		return
	}
	t.Logf("%s (pid %d): %d CPU ticks in 1 s idle, %d fds, %d threads", what, pid, c1-c0, procFDCount(pid), procStatusInt(pid, "Threads"))
	if c1-c0 > 10 {
		t.Errorf("%s (pid %d) used %d ticks of CPU in 1 s: spinning", what, pid, c1-c0)
	}
}

// TestPastaKilledCheckNamesItAndPortsComeBack: kill -9 of pasta under the
// pasta + implicit conflist: CHECK names pasta while the forwarder is
// held, and the ports pasta forwarded come back once it runs.
func TestPastaKilledCheckNamesItAndPortsComeBack(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "pasta")
	rt := newCNIRuntime(t, u)
	ns := testenv.ChildNetns(t, u)
	l := testenv.Listen(t, ns.Path, "tcp", ":0")
	echoIn(l)
	hostPort := freePort(t)
	a := attachmentArgs{containerID: "ctr-rel-pasta", netns: ns.Path, ifName: "eth0",
		caps: map[string]any{"portMappings": []map[string]any{
			{"hostPort": hostPort, "containerPort": l.Addr().(*net.TCPAddr).Port, "protocol": "tcp"}}}}
	list := conflist("portkit-rel-pasta", "1.1.0", cniVariants[1].plugins)
	snap := snapshotState(u)
	if _, err := rt.add(t, list, a); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(hostPort)
	if err := ping(addr, "before"); err != nil {
		t.Fatalf("through pasta: %v", err)
	}
	dir := findAttachment(t, u, "usernet", a.containerID).StateDir
	fwd := mustRecorded(t, dir, state.ForwarderFile)
	sup := mustRecorded(t, dir, state.SupervisorPID)
	pasta := mustRecorded(t, dir, state.NetworkPID)
	// Debian's pasta is passt, which re-executes its CPU-specific build (passt.avx2).
	if c := procComm(pasta.PID); !strings.HasPrefix(c, "pas") {
		t.Fatalf("network.pid names %q, want pasta", c)
	}
	syscall.Kill(fwd.PID, syscall.SIGSTOP)
	held := true
	defer func() {
		if held {
			syscall.Kill(fwd.PID, syscall.SIGCONT)
		}
	}()
	syscall.Kill(pasta.PID, syscall.SIGKILL)
	waitFor(2*time.Second, func() bool { return !pasta.Alive() })
	err := rt.check(t, list, a)
	if err == nil || !strings.Contains(err.Error(), "pasta") {
		t.Errorf("CHECK with pasta dead: %v, want an error naming pasta", err)
	} else {
		t.Logf("CHECK with pasta dead: %v", err)
	}
	syscall.Kill(fwd.PID, syscall.SIGCONT)
	held = false
	took, ok := waitFor(15*time.Second, func() bool { return ping(addr, "after") == nil })
	if !ok {
		log, _ := os.ReadFile(filepath.Join(dir, state.LogFile))
		t.Fatalf("pasta's port not back 15 s after the forwarder resumed; log:\n%s", log)
	}
	t.Logf("pasta %d killed; its port back %v after the forwarder resumed", pasta.PID, took.Round(time.Millisecond))
	var checkErr error
	if _, ok := waitFor(5*time.Second, func() bool {
		checkErr = rt.check(t, list, a)
		return checkErr == nil
	}); !ok {
		t.Errorf("CHECK after pasta came back: %v", checkErr)
	}
	checkIdle(t, "usernet supervisor (pasta)", sup.PID)
	if err := rt.del(t, list, a); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	assertClean(t, rt, snap, ns.PID)
}

// netnsHolders lists processes that are in, or hold a descriptor of, the
// network namespace with inode ino.
func netnsHolders(ino uint64) []string {
	want := fmt.Sprintf("net:[%d]", ino)
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if l, _ := os.Readlink("/proc/" + e.Name() + "/ns/net"); l == want {
			out = append(out, fmt.Sprintf("%d %s (in it)", pid, procComm(pid)))
			continue
		}
		fds, _ := os.ReadDir("/proc/" + e.Name() + "/fd")
		for _, fd := range fds {
			if l, _ := os.Readlink("/proc/" + e.Name() + "/fd/" + fd.Name()); l == want {
				out = append(out, fmt.Sprintf("%d %s (fd %s)", pid, procComm(pid), fd.Name()))
				break
			}
		}
	}
	return out
}

// TestContainerGoneWithoutDelIsCleanedByGCAndDel: the netns holder dies and
// the runtime never sends DEL. GC (valid list without it) removes the
// attachment; afterwards no process is in the netns or holds it, so the
// kernel frees it. A second attachment, deleted by DEL after its holder
// died, ends the same way.
func TestContainerGoneWithoutDelIsCleanedByGCAndDel(t *testing.T) {
	u := testenv.Unprivileged(t)
	rt := newCNIRuntime(t, u)
	snap := snapshotState(u)
	nsGC, aGC, list, _ := builtinAttach(t, rt, u, "ctr-rel-gone-gc")
	nsDel, aDel, _, _ := builtinAttach(t, rt, u, "ctr-rel-gone-del")
	inos := map[string]uint64{}
	for name, ns := range map[string]*testenv.Netns{"gc": nsGC, "del": nsDel} {
		var st syscall.Stat_t
		if err := syscall.Stat(ns.Path, &st); err != nil {
			t.Fatal(err)
		}
		inos[name] = st.Ino
		syscall.Kill(ns.PID, syscall.SIGKILL)
	}
	time.Sleep(500 * time.Millisecond)
	// Nobody told portkit: whatever still holds the namespace is ours.
	lingering := netnsHolders(inos["gc"])
	t.Logf("0.5 s after the holder died, without DEL or GC, the netns is still held by: %v", lingering)

	if err := rt.gc(t, list, []types.GCAttachment{{ContainerID: aDel.containerID, IfName: aDel.ifName}}); err != nil {
		t.Fatalf("GC: %v", err)
	}
	if _, ok := waitFor(3*time.Second, func() bool { return len(netnsHolders(inos["gc"])) == 0 }); !ok {
		t.Errorf("after GC the gone container's netns is still held by %v", netnsHolders(inos["gc"]))
	}
	if held := netnsHolders(inos["del"]); len(held) == 0 {
		t.Errorf("GC removed the attachment it was told is valid")
	}
	if err := rt.del(t, list, aDel); err != nil {
		t.Fatalf("DEL after the holder died: %v", err)
	}
	if _, ok := waitFor(3*time.Second, func() bool { return len(netnsHolders(inos["del"])) == 0 }); !ok {
		t.Errorf("after DEL the gone container's netns is still held by %v", netnsHolders(inos["del"]))
	}
	_ = aGC
	assertClean(t, rt, snap, nsGC.PID)
	assertClean(t, rt, snap, nsDel.PID)
}

// TestChildPortClosedResetsClients: the service in the container stops
// listening while clients connect through a builtin port. Every client
// learns it at once (reset or EOF), none hangs.
func TestChildPortClosedResetsClients(t *testing.T) {
	u := testenv.Unprivileged(t)
	ns := testenv.ChildNetns(t, u)
	l := testenv.Listen(t, ns.Path, "tcp4", "127.0.0.1:0")
	echoIn(l)
	hostPort := freePort(t)
	d := startDaemon(t, u, filepath.Join(u.Dir(t), "st"), "--port-driver", "builtin", "--netns", ns.Path,
		"-p", fmt.Sprintf("127.0.0.1:%d:%d/tcp", hostPort, l.Addr().(*net.TCPAddr).Port))
	addr := "127.0.0.1:" + strconv.Itoa(hostPort)
	if err := ping(addr, "up"); err != nil {
		t.Fatal(err)
	}
	l.Close()
	type result struct {
		took time.Duration
		err  error
	}
	results := make(chan result, 50)
	for i := 0; i < 50; i++ {
		go func() {
			start := time.Now()
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err == nil {
				c.SetDeadline(time.Now().Add(5 * time.Second))
				_, _ = c.Write([]byte("hello"))
				_, err = c.Read(make([]byte, 8))
				c.Close()
			}
			results <- result{time.Since(start), err}
		}()
	}
	var worst time.Duration
	kinds := map[string]int{}
	for i := 0; i < 50; i++ {
		r := <-results
		worst = max(worst, r.took)
		switch {
		case r.err == nil:
			t.Errorf("a client got data from a closed child port")
		case errors.Is(r.err, syscall.ECONNRESET):
			kinds["reset"]++
		case errors.Is(r.err, io.EOF):
			kinds["eof"]++
		case errors.Is(r.err, os.ErrDeadlineExceeded):
			kinds["hang"]++
		default:
			kinds[r.err.Error()]++
		}
	}
	t.Logf("50 clients of a closed child port: %v, slowest answer %v", kinds, worst.Round(time.Millisecond))
	if kinds["hang"] > 0 || worst > time.Second {
		t.Errorf("clients waited up to %v (%d hung) for a closed child port, want a reset at once", worst, kinds["hang"])
	}
	if kinds["reset"] == 0 {
		t.Errorf("no client got a reset (got %v): a refused child port should reset the client", kinds)
	}
	_ = d
}
