package forwarder

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport/network"
	"github.com/portkit/portkit/libport/state"
)

// A spawned forwarder is this same binary re-executed through /proc/self/exe
// with these variables set; init() below takes over before main runs, so any
// binary that imports this package (portkit, the CNI plugins, the OCI hook,
// test binaries) can be one.
const (
	envRole    = "PORTKIT_FORWARDER_ROLE" // "supervisor" or "forwarder"
	envDir     = "PORTKIT_FORWARDER_STATE_DIR"
	envRestore = "PORTKIT_FORWARDER_RESTORE" // "1": restore ports.json
)

// Descriptors a re-executed process finds (ExtraFiles start at 3).
const (
	fdReady = 3 // write end of the readiness pipe: "ok\n", or the error text
	fdLock  = 4 // the state directory's lock file, already locked
)

// Timing of a spawned forwarder.
const (
	spawnTimeout   = 60 * time.Second           // Spawn gives up waiting for ready
	childGrace     = 4 * time.Second            // supervisor: SIGTERM → SIGKILL of the forwarder
	stopGrace      = childGrace + 2*time.Second // Stop: SIGTERM → SIGKILL of the supervisor
	maxRestarts    = 5                          // consecutive failed starts before the supervisor gives up
	restartBackoff = 100 * time.Millisecond     // doubled after each failed start
)

func init() {
	role := os.Getenv(envRole)
	if role == "" {
		return
	}
	dir, restore := os.Getenv(envDir), os.Getenv(envRestore) == "1"
	os.Unsetenv(envRole)
	os.Unsetenv(envDir)
	os.Unsetenv(envRestore)
	closeInheritedFDs(fdReady, fdLock)
	switch role {
	case "supervisor":
		os.Exit(superviseMain(dir))
	case "forwarder":
		os.Exit(forwarderMain(dir, restore))
	}
	fmt.Fprintf(os.Stderr, "%s=%q: unknown role\n", envRole, role)
	os.Exit(2)
}

// closeInheritedFDs closes descriptors above stderr that we did not ask for
// and that lack close-on-exec: whatever the spawning process (a CNI runtime,
// runc) leaked to it. Go's own descriptors are all close-on-exec.
func closeInheritedFDs(keep ...int) {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
next:
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd <= 2 {
			continue
		}
		for _, k := range keep {
			if fd == k {
				continue next
			}
		}
		flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
		if err == nil && flags&unix.FD_CLOEXEC == 0 {
			unix.Close(fd)
		}
	}
}

// leftovers are files a crashed earlier forwarder may have left in a state
// directory; a fresh Spawn starts without them.
var leftovers = []string{state.APISocket, state.ForwarderFile, state.SupervisorPID, state.NetworkPID,
	state.PortsFile, state.ChildPIDFile, slirpSocketName}

// Spawn starts a detached forwarder for cfg and returns the PID of its
// supervisor once the forwarder serves (or the forwarder's own error). The
// process tree runs in its own session with stdin on /dev/null and stdout
// and stderr appended to StateDir/forwarder.log, and inherits no other
// descriptor from the caller, so a caller whose output is a pipe (libcni,
// runc) sees EOF as soon as it exits. The supervisor restarts a forwarder
// that dies (ports restored from ports.json) and stops it on SIGTERM.
// On error nothing is left running and the files Spawn made are removed.
func Spawn(cfg Config) (pid int, err error) {
	if err := cfg.Validate(); err != nil {
		return 0, err
	}
	_, statErr := os.Lstat(cfg.StateDir)
	created := errors.Is(statErr, os.ErrNotExist)
	d, err := state.Create(cfg.StateDir)
	if err != nil {
		return 0, err
	}
	defer d.Close()
	lock, err := d.Lock()
	if err != nil {
		if errors.Is(err, state.ErrLocked) {
			return 0, fmt.Errorf("spawn forwarder: state dir %s is already served by a running forwarder: stop it first", d.Path())
		}
		return 0, fmt.Errorf("spawn forwarder: %w", err)
	}
	defer lock.Release()
	cleanup := func() {
		if created {
			_ = d.RemoveAll()
			return
		}
		for _, name := range append(leftovers, state.ConfigFile, state.LogFile, state.LockFile) {
			_ = d.Remove(name)
		}
	}
	for _, name := range leftovers {
		if err := d.Remove(name); err != nil {
			return 0, fmt.Errorf("spawn forwarder: %w", err)
		}
	}
	if cfg.Network != nil && cfg.Network.MAC == "" {
		// Chosen once here so a restarted forwarder's network keeps the
		// container's MAC (CNI CHECK compares it with the ADD result).
		n := *cfg.Network
		if n.MAC, err = network.RandomMAC(); err != nil {
			cleanup()
			return 0, fmt.Errorf("spawn forwarder: %w", err)
		}
		cfg.Network = &n
	}
	if err := d.WriteJSON(state.ConfigFile, cfg); err != nil {
		cleanup()
		return 0, fmt.Errorf("spawn forwarder: %w", err)
	}
	logFile, err := d.OpenLog(state.LogFile)
	if err != nil {
		cleanup()
		return 0, fmt.Errorf("spawn forwarder: %w", err)
	}
	defer logFile.Close()
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		cleanup()
		return 0, err
	}
	defer devNull.Close()
	readyR, readyW, err := os.Pipe()
	if err != nil {
		cleanup()
		return 0, err
	}
	defer readyR.Close()

	cmd := &exec.Cmd{
		Path:        "/proc/self/exe",
		Args:        []string{"portkit-forwarder", "supervise", d.Path()},
		Env:         append(os.Environ(), envRole+"=supervisor", envDir+"="+d.Path()),
		Stdin:       devNull,
		Stdout:      logFile,
		Stderr:      logFile,
		ExtraFiles:  []*os.File{readyW, lock.File()},
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	err = cmd.Start()
	readyW.Close() // EOF on readyR must mean the supervisor let go of it
	if err != nil {
		cleanup()
		return 0, fmt.Errorf("spawn forwarder: start %s: %w", "/proc/self/exe", err)
	}
	lock.Release() // the supervisor holds it now
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }() // reap it if it ends while we live

	msg := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(readyR, 64<<10))
		msg <- string(b)
	}()
	var text string
	select {
	case text = <-msg:
	case <-time.After(spawnTimeout):
		text = fmt.Sprintf("not ready after %v", spawnTimeout)
		_ = unix.Kill(-cmd.Process.Pid, unix.SIGKILL) // its session: supervisor and forwarder
	}
	if text == "ok\n" {
		return cmd.Process.Pid, nil
	}
	// The supervisor exits after reporting a failed start; wait for it so
	// that nothing of this attachment outlives the error.
	select {
	case <-exited:
	case <-time.After(stopGrace):
		_ = unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
		<-exited
	}
	text = strings.TrimSpace(text)
	if text == "" {
		text = "the forwarder exited before it was ready" + logTail(d)
	}
	cleanup()
	return 0, fmt.Errorf("spawn forwarder for %s: %s", cfg.StateDir, text)
}

// logTail is the end of the forwarder's log, to explain a silent failure.
func logTail(d *state.Dir) string {
	b, err := d.ReadFile(state.LogFile)
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return "; its log ends: " + strings.TrimSpace(string(b))
}

// readConfig reads the config.json a Spawn wrote.
func readConfig(dir string) (*state.Dir, Config, error) {
	d, err := state.Open(dir)
	if err != nil {
		return nil, Config{}, err
	}
	var cfg Config
	if err := d.ReadJSON(state.ConfigFile, &cfg); err != nil {
		d.Close()
		return nil, Config{}, err
	}
	cfg.StateDir = d.Path()
	return d, cfg, nil
}

// forwarderMain is a supervised forwarder: Run with the lock inherited and
// readiness (or the error) written to fdReady.
func forwarderMain(dir string, restore bool) int {
	logger := log.New(os.Stderr, fmt.Sprintf("forwarder[%d]: ", os.Getpid()), log.LstdFlags|log.Lmicroseconds)
	readyW := os.NewFile(fdReady, "ready")
	lockFile := os.NewFile(fdLock, "lock")
	d, cfg, err := readConfig(dir)
	if err != nil {
		logger.Print(err)
		readyW.WriteString(err.Error())
		return 1
	}
	d.Close()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// Not SIGPIPE: an ignored signal stays ignored across exec, and pasta
	// (Debian 12's build) dies with "Couldn't install signal handlers" when
	// it finds SIGPIPE already ignored. Go itself only dies of SIGPIPE on
	// fds 1 and 2, which here go to the log file.
	signal.Ignore(syscall.SIGHUP)
	sent := false
	err = run(ctx, cfg, func() {
		readyW.WriteString("ok\n")
		readyW.Close()
		sent = true
		logger.Printf("serving %s (port driver %s)", cfg.StateDir, cfg.PortDriver)
	}, runOptions{lock: state.AdoptLock(lockFile), restore: restore, logf: logger.Printf})
	if err != nil {
		logger.Print(err)
		if !sent {
			readyW.WriteString(err.Error())
		}
		return 1
	}
	return 0
}

// superviseMain runs the forwarder as its child, relays its first
// readiness to Spawn, and restarts it (restoring its ports) whenever it
// dies on its own. SIGTERM stops the forwarder and removes the state dir.
func superviseMain(dir string) int {
	logger := log.New(os.Stderr, fmt.Sprintf("supervisor[%d]: ", os.Getpid()), log.LstdFlags|log.Lmicroseconds)
	spawnReady := os.NewFile(fdReady, "ready")
	lockFile := os.NewFile(fdLock, "lock")
	report := func(text string) {
		if spawnReady != nil {
			spawnReady.WriteString(text)
			spawnReady.Close()
			spawnReady = nil
		}
	}
	d, err := state.Open(dir)
	if err != nil {
		logger.Print(err)
		report(err.Error())
		return 1
	}
	defer d.Close()
	self, err := state.Self()
	if err == nil {
		err = d.WriteProcess(state.SupervisorPID, self)
	}
	if err != nil {
		logger.Print(err)
		report(err.Error())
		return 1
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	// Not SIGPIPE: an ignored signal stays ignored across exec, and pasta
	// (Debian 12's build) dies with "Couldn't install signal handlers" when
	// it finds SIGPIPE already ignored. Go itself only dies of SIGPIPE on
	// fds 1 and 2, which here go to the log file.
	signal.Ignore(syscall.SIGHUP)

	stopAll := func(c *child) int {
		if c != nil {
			c.stop()
		}
		report("stopped before the forwarder was ready")
		if err := d.RemoveAll(); err != nil {
			logger.Print(err)
		}
		return 0
	}

	failures := 0
	restore := false
	for {
		if failures > 0 {
			wait := restartBackoff << (failures - 1)
			select {
			case <-sigs:
				return stopAll(nil)
			case <-time.After(wait):
			}
		}
		c, err := startChild(dir, lockFile, restore)
		if err != nil {
			logger.Printf("start forwarder: %v", err)
			if spawnReady != nil {
				report(err.Error())
				return 1
			}
			failures++
			if failures >= maxRestarts {
				logger.Printf("giving up after %d failed starts", failures)
				return 1
			}
			continue
		}
		select {
		case <-sigs:
			return stopAll(c)
		case text := <-c.ready:
			if text != "ok\n" {
				<-c.exited
				if spawnReady != nil {
					report(text)
					return 1
				}
				failures++
				logger.Printf("forwarder (pid %d) failed to start: %s", c.cmd.Process.Pid, strings.TrimSpace(text))
				if failures >= maxRestarts {
					logger.Printf("giving up after %d failed starts", failures)
					return 1
				}
				continue
			}
		}
		report("ok\n")
		failures = 0
		restore = true
		select {
		case <-sigs:
			return stopAll(c)
		case <-c.exited:
		}
		if c.cmd.ProcessState.Success() {
			// Someone stopped the forwarder itself, not by way of us: stop too.
			logger.Printf("forwarder (pid %d) exited cleanly; stopping", c.cmd.Process.Pid)
			return stopAll(nil)
		}
		logger.Printf("forwarder (pid %d) died (%v); restarting it with its ports", c.cmd.Process.Pid, c.cmd.ProcessState)
	}
}

// child is one forwarder process started by the supervisor.
type child struct {
	cmd    *exec.Cmd
	ready  chan string   // what it wrote on its ready pipe, at EOF
	exited chan struct{} // closed once reaped
}

func startChild(dir string, lockFile *os.File, restore bool) (*child, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	env := append(os.Environ(), envRole+"=forwarder", envDir+"="+dir)
	if restore {
		env = append(env, envRestore+"=1")
	}
	cmd := &exec.Cmd{
		Path:       "/proc/self/exe",
		Args:       []string{"portkit-forwarder", "serve", dir},
		Env:        env,
		Stdin:      os.Stdin,
		Stdout:     os.Stdout,
		Stderr:     os.Stderr,
		ExtraFiles: []*os.File{w, lockFile},
		// If the supervisor dies, the forwarder stops (and cleans up)
		// rather than serving on unsupervised.
		SysProcAttr: &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM},
	}
	err = cmd.Start()
	w.Close()
	if err != nil {
		r.Close()
		return nil, err
	}
	c := &child{cmd: cmd, ready: make(chan string, 1), exited: make(chan struct{})}
	go func() {
		b, _ := io.ReadAll(io.LimitReader(r, 64<<10))
		r.Close()
		c.ready <- string(b)
	}()
	go func() { _ = cmd.Wait(); close(c.exited) }()
	return c, nil
}

// stop sends SIGTERM, waits childGrace, then SIGKILL.
func (c *child) stop() {
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.exited:
		return
	case <-time.After(childGrace):
	}
	_ = c.cmd.Process.Kill()
	<-c.exited
}
