package integration

// Helpers shared by the reliability, load, hostile-input and security tests:
// a `portkit daemon` run as the test user, CNI attachments found by
// container ID, and what /proc says about a process tree (fds, threads,
// RSS, CPU time, capabilities).

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport/api"
	"github.com/portkit/portkit/libport/state"
)

// daemon is a `portkit daemon` running as a user.
type daemon struct {
	cmd    *exec.Cmd
	dir    string // state dir
	sock   string
	out    *syncBuffer
	done   chan struct{}
	client *api.Client
}

// startDaemon runs `portkit daemon --state-dir DIR args...` as u and waits
// until its API answers. It is stopped (SIGTERM, then SIGKILL) at cleanup.
func startDaemon(t *testing.T, u *testenv.User, dir string, args ...string) *daemon {
	t.Helper()
	d, err := tryDaemon(t, u, dir, args...)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// tryDaemon is startDaemon that returns the daemon's failure to start.
func tryDaemon(t *testing.T, u *testenv.User, dir string, args ...string) (*daemon, error) {
	t.Helper()
	bin := testenv.Binary(t, "portkit")
	return tryDaemonBin(t, u, bin, dir, args...)
}

func tryDaemonBin(t *testing.T, u *testenv.User, bin, dir string, args ...string) (*daemon, error) {
	t.Helper()
	cmd := u.Cmd(bin, append([]string{"daemon", "--state-dir", dir}, args...)...)
	d := &daemon{cmd: cmd, dir: dir, sock: filepath.Join(dir, state.APISocket), out: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = d.out, d.out
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = cmd.Wait(); close(d.done) }()
	t.Cleanup(func() { d.stop(t) })
	d.client = api.NewClient(d.sock)
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-d.done:
			return nil, fmt.Errorf("portkit daemon %s exited: %s: %s", strings.Join(args, " "), cmd.ProcessState, d.output())
		default:
		}
		if c, err := net.Dial("unix", d.sock); err == nil {
			c.Close()
			return d, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("portkit daemon not serving after 30 s: %s", d.output())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// syncBuffer is a bytes.Buffer safe to read while a process writes to it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (d *daemon) output() string { return d.out.String() }
func (d *daemon) pid() int       { return d.cmd.Process.Pid }

// stop sends SIGTERM and waits; SIGKILL after 15 s.
func (d *daemon) stop(t *testing.T) {
	select {
	case <-d.done:
		return
	default:
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(15 * time.Second):
		t.Errorf("portkit daemon ignored SIGTERM for 15 s: %s", d.output())
		_ = d.cmd.Process.Kill()
		<-d.done
	}
}

// list returns the daemon's ports as "ID SPEC" lines.
func (d *daemon) list(t *testing.T) []string {
	t.Helper()
	ports, err := d.client.ListPorts(context.Background())
	if err != nil {
		t.Fatalf("list ports: %v", err)
	}
	var out []string
	for _, p := range ports {
		out = append(out, fmt.Sprintf("%d %s", p.ID, p.Spec))
	}
	return out
}

// dirSnapshot maps every entry below dir to its size and content hash-free
// fingerprint (mode, size, mtime), to prove "no state change".
func dirSnapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	_ = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return nil
		}
		data := ""
		if fi.Mode().IsRegular() {
			b, _ := os.ReadFile(p)
			data = string(b)
		}
		out[p] = fmt.Sprintf("%v %d %s", fi.Mode(), fi.Size(), data)
		return nil
	})
	return out
}

func diffSnapshots(a, b map[string]string) []string {
	var d []string
	for k, v := range a {
		if w, ok := b[k]; !ok {
			d = append(d, "removed "+k)
		} else if w != v {
			d = append(d, "changed "+k)
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			d = append(d, "added "+k)
		}
	}
	sort.Strings(d)
	return d
}

// ---- /proc ------------------------------------------------------------------

// procStatus reads a field of /proc/PID/status (first word of its value).
func procStatus(pid int, field string) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				return f[0]
			}
		}
	}
	return ""
}

func procStatusInt(pid int, field string) int {
	n, _ := strconv.Atoi(procStatus(pid, field))
	return n
}

// procFDCount is the number of open descriptors of pid.
func procFDCount(pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	return len(ents)
}

// procCPU is the user+system CPU time of pid, in clock ticks (1/100 s).
func procCPU(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	// f[0] is field 3; utime and stime are fields 14 and 15.
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return ut + st
}

func procComm(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.TrimSpace(string(b))
}

// treeUsage sums fds, threads and RSS over pid and its live descendants.
type usage struct {
	procs, fds, threads, rssKiB int
	comms                       []string
}

func (u usage) String() string {
	return fmt.Sprintf("%d processes %v, %d fds, %d threads, RSS %d KiB", u.procs, u.comms, u.fds, u.threads, u.rssKiB)
}

func treeUsage(pid int) usage {
	var u usage
	root, err := state.ProcessOf(pid)
	if err != nil {
		return u
	}
	for _, p := range testenv.Descendants(root) {
		u.procs++
		u.comms = append(u.comms, procComm(p.PID))
		u.fds += procFDCount(p.PID)
		u.threads += procStatusInt(p.PID, "Threads")
		u.rssKiB += procStatusInt(p.PID, "VmRSS")
	}
	sort.Strings(u.comms)
	return u
}

// descendantsNamed returns live descendants of pid whose comm is name.
func descendantsNamed(pid int, name string) []int {
	root, err := state.ProcessOf(pid)
	if err != nil {
		return nil
	}
	var out []int
	for _, p := range testenv.Descendants(root) {
		if p.PID != pid && procComm(p.PID) == name {
			out = append(out, p.PID)
		}
	}
	return out
}

// waitFor polls cond every 5 ms until it holds or timeout passes; it
// returns how long that took and whether it held.
func waitFor(timeout time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	for {
		if cond() {
			return time.Since(start), true
		}
		if time.Since(start) > timeout {
			return time.Since(start), false
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ---- servers in the child netns --------------------------------------------

// echoIn serves TCP echo (everything read is written back) on a listener.
func echoIn(l net.Listener) {
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				// A plain loop: io.Copy(c, c) would splice a socket into itself.
				buf := make([]byte, 32<<10)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if _, werr := c.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
}

// ping sends msg on a new connection to addr and wants it echoed within 2 s.
func ping(addr, msg string) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// ---- CNI attachments --------------------------------------------------------

// attachmentRecord is the part of a plugin's record the tests read.
type attachmentRecord struct {
	Plugin      string `json:"plugin"`
	Network     string `json:"network"`
	ContainerID string `json:"containerID"`
	StateDir    string `json:"stateDir"`
	APISocket   string `json:"apiSocket"`
}

// findAttachment returns the record plugin keeps for containerID of u.
func findAttachment(t *testing.T, u *testenv.User, plugin, containerID string) attachmentRecord {
	t.Helper()
	for _, d := range stateDirs(u) {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			if !strings.HasSuffix(e.Name(), ".json") {
				continue
			}
			b, err := os.ReadFile(filepath.Join(d, e.Name()))
			if err != nil {
				continue
			}
			var r attachmentRecord
			if json.Unmarshal(b, &r) == nil && r.Plugin == plugin && r.ContainerID == containerID {
				return r
			}
		}
	}
	t.Fatalf("no %s record for container %s under %v", plugin, containerID, stateDirs(u))
	return attachmentRecord{}
}

// recordedProcess reads a process record of a state dir (as root).
func recordedProcess(dir, name string) (state.Process, error) {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return state.Process{}, err
	}
	return state.ParseProcess(string(b))
}

func mustRecorded(t *testing.T, dir, name string) state.Process {
	t.Helper()
	p, err := recordedProcess(dir, name)
	if err != nil {
		t.Fatalf("%s in %s: %v", name, dir, err)
	}
	return p
}

// builtinAttach ADDs a slirp4netns + builtin attachment of a new netns owned
// by u, publishing 127.0.0.1:hostPort → the child's echo server, and
// returns the netns, the args and the conflist.
func builtinAttach(t *testing.T, rt *cniRuntime, u *testenv.User, id string) (*testenv.Netns, attachmentArgs, []byte, string) {
	t.Helper()
	testenv.RequireBinary(t, "slirp4netns")
	ns := testenv.ChildNetns(t, u)
	l := testenv.Listen(t, ns.Path, "tcp", ":0")
	echoIn(l)
	hostPort := freePort(t)
	a := attachmentArgs{containerID: id, netns: ns.Path, ifName: "eth0",
		caps: map[string]any{"portMappings": []map[string]any{
			{"hostPort": hostPort, "containerPort": l.Addr().(*net.TCPAddr).Port, "protocol": "tcp", "hostIP": "127.0.0.1"}}}}
	list := conflist("portkit-rel", "1.1.0", builtinPlugins)
	if _, err := rt.add(t, list, a); err != nil {
		t.Fatalf("ADD %s: %v", id, err)
	}
	return ns, a, list, net.JoinHostPort("127.0.0.1", strconv.Itoa(hostPort))
}
