package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/internal/testenv"
)

// scope adapts the bench to internal/testenv, whose helpers take a
// testing.TB: Fatal/Skip become panics that run() turns into an error, and
// Cleanup functions run when the contender's instance is torn down. The
// embedded TB is nil; testenv only calls the methods defined here.
type scope struct {
	testing.TB
	name     string
	cleanups []func()
}

type abort struct {
	msg  string
	skip bool
}

func (s *scope) Helper()                        {}
func (s *scope) Name() string                   { return s.name }
func (s *scope) Cleanup(f func())               { s.cleanups = append(s.cleanups, f) }
func (s *scope) Logf(format string, a ...any)   { fmt.Fprintf(os.Stderr, s.name+": "+format+"\n", a...) }
func (s *scope) Log(a ...any)                   { fmt.Fprintln(os.Stderr, append([]any{s.name + ":"}, a...)...) }
func (s *scope) Fatal(a ...any)                 { panic(abort{msg: fmt.Sprint(a...)}) }
func (s *scope) Fatalf(format string, a ...any) { panic(abort{msg: fmt.Sprintf(format, a...)}) }
func (s *scope) Skip(a ...any)                  { panic(abort{msg: fmt.Sprint(a...), skip: true}) }
func (s *scope) Skipf(format string, a ...any) {
	panic(abort{msg: fmt.Sprintf(format, a...), skip: true})
}

// run calls fn, turning a Fatal/Skip panic into an error.
func (s *scope) run(fn func() error) (err error, skipped bool) {
	defer func() {
		if r := recover(); r != nil {
			a, ok := r.(abort)
			if !ok {
				panic(r)
			}
			err, skipped = errors.New(a.msg), a.skip
		}
	}()
	return fn(), false
}

// close runs the cleanups, newest first.
func (s *scope) close() {
	for i := len(s.cleanups) - 1; i >= 0; i-- {
		s.cleanups[i]()
	}
	s.cleanups = nil
}

// bins holds copies of the programs the unprivileged user runs (the bench
// itself, for its in-netns server, and portkit's binaries) in a directory that
// user can read, whatever the permissions of the checkout.
type bins struct {
	dir  string
	self string
	have map[string]string
}

func copyBins(binDir string) (*bins, error) {
	dir, err := os.MkdirTemp("", "portkit-bench-bin-")
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	b := &bins{dir: dir, have: map[string]string{}}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	if b.self, err = copyExec(self, filepath.Join(dir, "portkit-bench")); err != nil {
		return nil, err
	}
	for _, name := range []string{"portkit", "usernet", "portdriver"} {
		src := filepath.Join(binDir, name)
		if _, err := os.Stat(src); err != nil {
			continue
		}
		if b.have[name], err = copyExec(src, filepath.Join(dir, name)); err != nil {
			return nil, err
		}
	}
	return b, nil
}

func copyExec(src, dst string) (string, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return "", err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return "", err
	}
	return dst, out.Close()
}

// start starts cmd and registers its kill-and-reap with s.
func start(s *scope, cmd *exec.Cmd) error {
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", strings.Join(cmd.Args, " "), err)
	}
	s.Cleanup(func() { killTree(cmd.Process.Pid); _ = cmd.Wait() })
	return nil
}

// killTree SIGKILLs pid and all its descendants and reaps those that were
// reparented to us (the bench is a child subreaper: PID 1 here reaps nothing).
func killTree(pid int) {
	pids := append(descendants(pid), pid)
	for _, p := range pids {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	reap(pids[:len(pids)-1])
}

func reap(pids []int) {
	deadline := time.Now().Add(3 * time.Second)
	for _, p := range pids {
		for time.Now().Before(deadline) {
			var ws unix.WaitStatus
			got, err := unix.Wait4(p, &ws, unix.WNOHANG, nil)
			if got == p || errors.Is(err, unix.ECHILD) && !alive(p) {
				break
			}
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", p)); err != nil {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	st, err := procStat(pid)
	return err == nil && st.state != 'Z'
}

type stat struct {
	comm  string
	state byte
	ppid  int
}

func procStat(pid int) (stat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return stat{}, err
	}
	// comm may hold spaces and parentheses: it ends at the last ')'.
	open, end := strings.IndexByte(string(b), '('), strings.LastIndexByte(string(b), ')')
	if open < 0 || end < open {
		return stat{}, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(b[end+1:]))
	if len(f) < 2 {
		return stat{}, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	ppid, _ := strconv.Atoi(f[1])
	return stat{comm: string(b[open+1 : end]), state: f[0][0], ppid: ppid}, nil
}

// descendants lists every process below pid, found by scanning /proc.
func descendants(pid int) []int {
	ents, _ := os.ReadDir("/proc")
	children := map[int][]int{}
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := procStat(p); err == nil {
			children[st.ppid] = append(children[st.ppid], p)
		}
	}
	var out []int
	queue := []int{pid}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

// treeRSS sums VmRSS over roots and their descendants, leaving out processes
// whose comm is in skip (the namespace holder's sleep, servers).
func treeRSS(roots []int, skip map[string]bool) (kib int, names []string) {
	seen := map[int]bool{}
	for _, r := range roots {
		for _, p := range append([]int{r}, descendants(r)...) {
			if seen[p] {
				continue
			}
			seen[p] = true
			st, err := procStat(p)
			if err != nil || skip[st.comm] || st.state == 'Z' {
				continue
			}
			if v := vmRSS(p); v > 0 {
				kib += v
				names = append(names, st.comm)
			}
		}
	}
	return kib, names
}

func vmRSS(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				n, _ := strconv.Atoi(f[0])
				return n
			}
		}
	}
	return 0
}

// waitListening waits until a socket listens on port (TCP) or is bound to it
// (UDP) in the network namespace of pid (0: ours), read from /proc/PID/net.
func waitListening(pid int, proto string, port int, timeout time.Duration) error {
	who := "self"
	if pid != 0 {
		who = strconv.Itoa(pid)
	}
	hexPort := fmt.Sprintf(":%04X", port)
	deadline := time.Now().Add(timeout)
	for {
		for _, fam := range []string{"", "6"} {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%s/net/%s%s", who, proto, fam))
			for _, line := range strings.Split(string(b), "\n")[1:] {
				f := strings.Fields(line)
				if len(f) < 4 || !strings.HasSuffix(f[1], hexPort) {
					continue
				}
				// TCP 0A = LISTEN; UDP 07 = bound (unconnected).
				if proto == "tcp" && f[3] == "0A" || proto == "udp" && f[3] == "07" {
					return nil
				}
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listens on %s port %d in the netns of pid %s after %v", proto, port, who, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// user is who runs contenders: portkit-test when the bench runs as root.
func benchUser(s *scope) (u *testenv.User, err error) {
	err, _ = s.run(func() error { u = testenv.Unprivileged(s); return nil })
	return u, err
}
