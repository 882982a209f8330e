package state

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Process names one process across PID reuse: its PID and its start time in
// clock ticks since boot (/proc/PID/stat field 22). A PID alone may name a
// stranger by the time we signal it.
type Process struct {
	PID       int
	StartTime uint64
}

// ErrGone says the recorded process no longer exists: it exited, is a
// zombie, or its PID now belongs to another process.
var ErrGone = errors.New("process is gone")

// Self is the calling process.
func Self() (Process, error) { return ProcessOf(os.Getpid()) }

// ProcessOf reads the start time of pid; a missing PID matches ErrGone.
func ProcessOf(pid int) (Process, error) {
	st, err := readStat(pid)
	if err != nil {
		return Process{}, err
	}
	return Process{PID: pid, StartTime: st.start}, nil
}

type procStat struct {
	state byte
	start uint64
}

// readStat parses /proc/PID/stat. The command name (field 2) is in
// parentheses and may itself hold spaces and ')', so fields are counted
// from the last ')'.
func readStat(pid int) (procStat, error) {
	if pid <= 0 {
		return procStat{}, fmt.Errorf("pid %d: %w", pid, ErrGone)
	}
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
			return procStat{}, fmt.Errorf("pid %d: %w", pid, ErrGone)
		}
		return procStat{}, err
	}
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); field 22 (starttime) is f[19].
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("/proc/%d/stat: start time %q: %w", pid, f[19], err)
	}
	return procStat{state: f[0][0], start: start}, nil
}

// String is the state-file form "PID STARTTIME".
func (p Process) String() string {
	return strconv.Itoa(p.PID) + " " + strconv.FormatUint(p.StartTime, 10)
}

// ParseProcess reads the form String writes.
func ParseProcess(text string) (Process, error) {
	f := strings.Fields(text)
	if len(f) != 2 {
		return Process{}, fmt.Errorf("process record %q: want \"PID STARTTIME\"", text)
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil || pid <= 0 {
		return Process{}, fmt.Errorf("process record %q: bad PID", text)
	}
	start, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return Process{}, fmt.Errorf("process record %q: bad start time", text)
	}
	return Process{PID: pid, StartTime: start}, nil
}

// check says whether p still runs: same start time, and not a zombie or
// dead (PID 1 here does not reap orphans, so a zombie may linger for ever).
func (p Process) check() error {
	st, err := readStat(p.PID)
	if err != nil {
		return err
	}
	if st.start != p.StartTime {
		return fmt.Errorf("pid %d now belongs to another process: %w", p.PID, ErrGone)
	}
	if st.state == 'Z' || st.state == 'X' || st.state == 'x' {
		return fmt.Errorf("pid %d has exited: %w", p.PID, ErrGone)
	}
	return nil
}

// Alive reports whether p is still the same, running process.
func (p Process) Alive() bool { return p.PID > 0 && p.check() == nil }

// Signal sends sig to p only if p is still the process that was recorded.
// It pins the process with a pidfd first and checks the start time after,
// so the PID cannot be reused between the check and the signal. When p is
// gone the error matches ErrGone and nothing is signalled.
func (p Process) Signal(sig syscall.Signal) error {
	if p.PID <= 0 {
		return fmt.Errorf("pid %d: %w", p.PID, ErrGone)
	}
	pidfd, err := unix.PidfdOpen(p.PID, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("pid %d: %w", p.PID, ErrGone)
		}
		if !errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("pidfd_open %d: %w", p.PID, err)
		}
		// Kernels before 5.3: check then kill, with the small window that implies.
		if err := p.check(); err != nil {
			return err
		}
		return unix.Kill(p.PID, sig)
	}
	defer unix.Close(pidfd)
	if err := p.check(); err != nil {
		return err
	}
	if err := unix.PidfdSendSignal(pidfd, sig, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("pid %d: %w", p.PID, ErrGone)
		}
		return fmt.Errorf("signal %v to pid %d: %w", sig, p.PID, err)
	}
	return nil
}

// WaitGone waits up to timeout for p to stop being alive and reports
// whether it did. It works for processes that are not our children.
func (p Process) WaitGone(timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	pidfd, err := unix.PidfdOpen(p.PID, 0)
	if err == nil {
		defer unix.Close(pidfd)
		if p.check() != nil {
			return true
		}
		for {
			// A pidfd polls readable once the process has exited.
			left := time.Until(deadline)
			if left <= 0 {
				return !p.Alive()
			}
			fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
			n, err := unix.Poll(fds, int(left.Milliseconds())+1)
			if err != nil && !errors.Is(err, unix.EINTR) {
				break
			}
			if n > 0 {
				return true
			}
		}
	}
	for p.Alive() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// Stop sends SIGTERM to p, waits up to grace, then SIGKILL and waits again.
// A process that is already gone is fine.
func (p Process) Stop(grace time.Duration) error {
	if err := p.Signal(syscall.SIGTERM); err != nil {
		if errors.Is(err, ErrGone) {
			return nil
		}
		return err
	}
	if p.WaitGone(grace) {
		return nil
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		if errors.Is(err, ErrGone) {
			return nil
		}
		return err
	}
	if !p.WaitGone(2 * time.Second) {
		return fmt.Errorf("pid %d survived SIGKILL", p.PID)
	}
	return nil
}
