package testenv

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/portkit/portkit/libport/state"
)

// ociReceiverPID is where portkit-oci-hook records its netns receiver (the
// process that holds a rootless crun container's netns for the forwarder).
const ociReceiverPID = "netns-receiver.pid"

// AttachmentProcesses returns every process of the attachment served from
// stateDir: the processes its files record (supervisor, forwarder, network,
// the OCI hook's netns receiver) and all their descendants (helpers, socat,
// nsenter).
func AttachmentProcesses(t testing.TB, stateDir string) []state.Process {
	t.Helper()
	var roots []state.Process
	for _, name := range []string{state.SupervisorPID, state.ForwarderFile, state.NetworkPID, ociReceiverPID} {
		data, err := os.ReadFile(filepath.Join(stateDir, name))
		if err != nil {
			continue
		}
		if p, err := state.ParseProcess(strings.TrimSpace(string(data))); err == nil {
			roots = append(roots, p)
		}
	}
	return Descendants(roots...)
}

// Descendants returns roots and every live process below them.
func Descendants(roots ...state.Process) []state.Process {
	children := map[int][]int{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// Fields after the parenthesised command: state, ppid, ...
		rest := string(data[strings.LastIndexByte(string(data), ')')+2:])
		fields := strings.Fields(rest)
		if len(fields) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(fields[1])
		children[ppid] = append(children[ppid], pid)
	}
	seen := map[int]bool{}
	var out []state.Process
	var walk func(p state.Process)
	walk = func(p state.Process) {
		if seen[p.PID] || !p.Alive() {
			return
		}
		seen[p.PID] = true
		out = append(out, p)
		for _, c := range children[p.PID] {
			if cp, err := state.ProcessOf(c); err == nil {
				walk(cp)
			}
		}
	}
	for _, r := range roots {
		walk(r)
	}
	return out
}

// WaitGone fails t unless every process in procs has exited within timeout.
func WaitGone(t testing.TB, procs []state.Process, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var alive []string
		for _, p := range procs {
			if p.Alive() {
				comm, _ := os.ReadFile("/proc/" + strconv.Itoa(p.PID) + "/comm")
				alive = append(alive, strconv.Itoa(p.PID)+" "+strings.TrimSpace(string(comm)))
			}
		}
		if len(alive) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("processes left behind: %s", strings.Join(alive, ", "))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ProcessesMentioning lists the live processes whose command line contains
// s, as "PID COMMAND LINE" (a state directory's path names the spawned
// processes of one attachment: forwarder, supervisor, the OCI hook's netns
// receiver).
func ProcessesMentioning(s string) []string {
	var out []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		data, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !strings.Contains(string(data), s) {
			continue
		}
		if p, err := state.ProcessOf(pid); err != nil || !p.Alive() {
			continue // gone, or a zombie
		}
		out = append(out, e.Name()+" "+strings.TrimSpace(strings.ReplaceAll(string(data), "\x00", " ")))
	}
	return out
}
