package main

// The netns receiver: for runtimes that hide the container's namespaces
// from the createRuntime hook. Rootless crun runs the container's process
// non-dumpable until it execs the user's program (it re-executes itself
// from a sealed memfd), so /proc/PID/ns/net is root's and opening it fails
// with EACCES for the user, as does setns through a pidfd. The
// createContainer hook runs inside the container's namespaces, before
// pivot_root, where the host's paths are still visible: it sends its
// /proc/self/ns/net over a unix socket (SCM_RIGHTS) to a receiver that
// createRuntime left waiting. The receiver keeps that descriptor open for
// as long as the forwarder runs, so the forwarder, slirp4netns, pasta and
// nsenter (same user, dumpable receiver) reach the netns as
// /proc/RECEIVER/fd/N; it answers only once the forwarder serves, so the
// container starts with its network up.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/portkit/portkit/libport/forwarder"
	"github.com/portkit/portkit/libport/state"
)

// Files the receiver keeps in the container's state directory, beside the
// forwarder's.
const (
	receiverSocket = "netns-receiver.sock" // the createContainer hook connects here
	receiverPID    = "netns-receiver.pid"  // Process of the receiver: "PID STARTTIME"
	receiverConfig = "netns-receiver.json" // what to spawn once the netns is here
	receiverLog    = "netns-receiver.log"  // the receiver's stdout and stderr
)

// envReceiver set (to the state dir) makes this binary the receiver.
const envReceiver = "PORTKIT_OCI_HOOK_RECEIVER"

// fdListener is the receiver's listening socket, made by the hook.
const fdListener = 3

// Timing of the hand-over.
const (
	// receiverWait bounds how long a receiver waits for the createContainer
	// hook (the runtime runs it right after createRuntime).
	receiverWait = 2 * time.Minute
	// handOverTimeout bounds the createContainer hook's wait for the
	// forwarder (which gives up on its own after a minute).
	handOverTimeout = 90 * time.Second
	// receiverGrace is how long poststop waits for the receiver after SIGTERM.
	receiverGrace = 5 * time.Second
)

// receiverPlan is receiverConfig: the container and its forwarder.
type receiverPlan struct {
	ID        string           `json:"id"`
	Forwarder forwarder.Config `json:"forwarder"`
}

// attachLater is attach where /proc/PID/ns/net cannot be opened: it checks
// that a createContainer hook will hand the netns over, and leaves a
// detached receiver listening for it in the state directory.
func attachLater(st *specs.State, cfg forwarder.Config, netnsPath string, cause error) error {
	if err := findCreateContainerHook(st.Bundle); err != nil {
		return fmt.Errorf("container %s: %v: the runtime hides the container's namespaces from this hook until the container starts "+
			"(rootless crun does), so portkit takes the netns from a createContainer hook, but %w", st.ID, cause, err)
	}
	dir := cfg.StateDir
	_, statErr := os.Lstat(dir)
	created := errors.Is(statErr, os.ErrNotExist)
	d, err := state.Create(dir)
	if err != nil {
		return fmt.Errorf("container %s: %w", st.ID, err)
	}
	defer d.Close()
	if p, err := d.ReadProcess(receiverPID); err == nil && p.Alive() {
		return fmt.Errorf("container %s: a netns receiver (pid %d) already waits in %s: run poststop for the old container first", st.ID, p.PID, dir)
	}
	cleanup := func() {
		if created {
			_ = d.RemoveAll()
			return
		}
		for _, name := range []string{receiverSocket, receiverPID, receiverConfig, receiverLog} {
			_ = d.Remove(name)
		}
	}
	if err := startReceiver(d, receiverPlan{ID: st.ID, Forwarder: cfg}); err != nil {
		cleanup()
		return fmt.Errorf("container %s: %w", st.ID, err)
	}
	return nil
}

// findCreateContainerHook checks that the bundle's config.json runs this
// hook at createContainer (hooks.d files land there too: the engine writes
// them into config.json).
func findCreateContainerHook(bundle string) error {
	want := `add {"path": "` + selfPath() + `", "args": ["portkit-oci-hook", "createContainer"]} to hooks.createContainer in config.json ` +
		`(or install portkit's hooks.d files; see docs/oci-hook.md)`
	if bundle == "" {
		return fmt.Errorf("the OCI state names no bundle to look for a createContainer hook in: %s", want)
	}
	data, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return fmt.Errorf("read bundle config: %w", err)
	}
	var cfg struct {
		Hooks struct {
			CreateContainer []specs.Hook `json:"createContainer"`
		} `json:"hooks"`
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		return fmt.Errorf("bundle config %s: %w", filepath.Join(bundle, "config.json"), err)
	}
	self, _ := os.Stat("/proc/self/exe")
	for _, h := range cfg.Hooks.CreateContainer {
		if len(h.Args) < 2 || h.Args[len(h.Args)-1] != "createContainer" {
			continue
		}
		if filepath.Base(h.Path) == "portkit-oci-hook" {
			return nil
		}
		if fi, err := os.Stat(h.Path); err == nil && self != nil && os.SameFile(fi, self) {
			return nil
		}
	}
	return fmt.Errorf("config.json has no createContainer hook running portkit-oci-hook: %s", want)
}

func selfPath() string {
	if p, err := os.Executable(); err == nil {
		return p
	}
	return "/usr/local/bin/portkit-oci-hook"
}

// startReceiver makes the receiver's socket (so a createContainer hook can
// connect as soon as we return) and starts the detached receiver with it.
func startReceiver(d *state.Dir, plan receiverPlan) error {
	for _, name := range []string{receiverSocket, receiverPID} {
		if err := d.Remove(name); err != nil {
			return err
		}
	}
	if err := d.WriteJSON(receiverConfig, plan); err != nil {
		return err
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: d.Join(receiverSocket), Net: "unix"})
	if err != nil {
		return fmt.Errorf("netns receiver: %w", err)
	}
	l.SetUnlinkOnClose(false) // the receiver owns the path from now on
	lf, err := l.File()
	l.Close()
	if err != nil {
		return fmt.Errorf("netns receiver: %w", err)
	}
	defer lf.Close()
	logFile, err := d.OpenLog(receiverLog)
	if err != nil {
		return err
	}
	defer logFile.Close()
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		return err
	}
	defer devNull.Close()
	// Its own session and no pipe of the runtime's: runc and crun wait for
	// EOF on the hook's stdout and stderr.
	cmd := &exec.Cmd{
		Path:        "/proc/self/exe",
		Args:        []string{"portkit-oci-hook", "netns-receiver", d.Path()},
		Env:         append(os.Environ(), envReceiver+"="+d.Path()),
		Stdin:       devNull,
		Stdout:      logFile,
		Stderr:      logFile,
		ExtraFiles:  []*os.File{lf},
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("netns receiver: start /proc/self/exe: %w", err)
	}
	p, err := state.ProcessOf(cmd.Process.Pid)
	if err == nil {
		err = d.WriteProcess(receiverPID, p)
	}
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return fmt.Errorf("netns receiver: record pid %d: %w", cmd.Process.Pid, err)
	}
	return cmd.Process.Release()
}

// readReceiver is the receiver recorded in dir.
func readReceiver(dir string) (state.Process, error) {
	d, err := state.Open(dir)
	if err != nil {
		return state.Process{}, err
	}
	defer d.Close()
	return d.ReadProcess(receiverPID)
}

// receiverMain is the receiver process: it waits for the createContainer
// hook's netns, spawns the forwarder on it, answers the hook, and holds the
// netns until the forwarder stops (poststop) or it is told to stop.
func receiverMain(dir string) int {
	logger := log.New(os.Stderr, fmt.Sprintf("netns-receiver[%d]: ", os.Getpid()), log.LstdFlags|log.Lmicroseconds)
	signal.Ignore(syscall.SIGHUP)
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	lf := os.NewFile(fdListener, "netns receiver socket")
	fl, err := net.FileListener(lf)
	lf.Close()
	if err != nil {
		logger.Printf("listening socket on fd %d: %v", fdListener, err)
		return 1
	}
	l := fl.(*net.UnixListener)
	d, err := state.Open(dir)
	if err != nil {
		logger.Print(err)
		return 1
	}
	giveUp := func(format string, args ...any) int {
		logger.Printf(format, args...)
		l.Close()
		if err := d.RemoveAll(); err != nil {
			logger.Print(err)
		}
		return 1
	}
	var plan receiverPlan
	if err := d.ReadJSON(receiverConfig, &plan); err != nil {
		return giveUp("%v", err)
	}
	plan.Forwarder.StateDir = d.Path()

	type accepted struct {
		conn *net.UnixConn
		err  error
	}
	acc := make(chan accepted, 1)
	_ = l.SetDeadline(time.Now().Add(receiverWait))
	go func() {
		c, err := l.AcceptUnix()
		acc <- accepted{c, err}
	}()
	var conn *net.UnixConn
	select {
	case <-sigs:
		return giveUp("container %s: stopped before its createContainer hook handed over the netns", plan.ID)
	case a := <-acc:
		if a.err != nil {
			return giveUp("container %s: no createContainer hook handed over the netns within %v (%v): "+
				"the container runs without portkit's network; its config.json needs the createContainer hook", plan.ID, receiverWait, a.err)
		}
		conn = a.conn
	}
	l.Close()
	_ = d.Remove(receiverSocket)
	defer conn.Close()

	netnsFd, err := receiveNetns(conn, plan.ID)
	if err == nil {
		plan.Forwarder.NetnsPath = fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), netnsFd)
		logger.Printf("container %s: netns %s received; spawning the forwarder", plan.ID, plan.Forwarder.NetnsPath)
		var supervisor int
		supervisor, err = forwarder.Spawn(plan.Forwarder)
		if err == nil {
			if err = answer(conn, nil); err == nil {
				conn.Close()
				return holdNetns(logger, d, plan, supervisor, sigs)
			}
			// The hook is gone, so the runtime will not start the container.
			err = fmt.Errorf("the createContainer hook went away before the forwarder was ready (%w); stopping the forwarder", err)
			if serr := forwarder.Stop(plan.Forwarder.StateDir); serr != nil {
				logger.Print(serr)
			}
		}
	}
	err = fmt.Errorf("container %s: %w", plan.ID, err)
	_ = answer(conn, err)
	return giveUp("%v", err)
}

// holdNetns keeps the netns descriptor (and so /proc/self/fd/N) alive until
// the forwarder's supervisor exits or we are told to stop.
func holdNetns(logger *log.Logger, d *state.Dir, plan receiverPlan, supervisor int, sigs <-chan os.Signal) int {
	_ = d.Remove(receiverConfig)
	d.Close()
	done := make(chan struct{})
	if pidfd, err := unix.PidfdOpen(supervisor, 0); err == nil {
		go func() {
			defer close(done)
			defer unix.Close(pidfd)
			fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
			for {
				if _, err := unix.Poll(fds, -1); err != unix.EINTR {
					return
				}
			}
		}()
	} else {
		logger.Printf("container %s: cannot watch the forwarder's supervisor (pid %d): %v; holding the netns until poststop", plan.ID, supervisor, err)
	}
	select {
	case <-sigs:
		// poststop normally stops the forwarder first; do it anyway.
		if err := forwarder.Stop(plan.Forwarder.StateDir); err != nil {
			logger.Printf("container %s: %v", plan.ID, err)
			return 1
		}
	case <-done:
		logger.Printf("container %s: the forwarder's supervisor (pid %d) exited; letting go of the netns", plan.ID, supervisor)
	}
	return 0
}

// receiveNetns reads the createContainer hook's message: "netns ID\n" with
// one descriptor, which must be a network namespace other than ours, sent
// by our own user (the container's root maps to it).
func receiveNetns(conn *net.UnixConn, id string) (int, error) {
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if err := checkPeer(conn); err != nil {
		return -1, err
	}
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return -1, fmt.Errorf("netns receiver: read the createContainer hook's message: %w", err)
	}
	var fds []int
	if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
		for _, m := range msgs {
			if got, err := unix.ParseUnixRights(&m); err == nil {
				fds = append(fds, got...)
			}
		}
	}
	for _, fd := range fds {
		unix.CloseOnExec(fd) // the forwarder opens /proc/RECEIVER/fd/N; nothing inherits it
	}
	if len(fds) != 1 || flags&unix.MSG_CTRUNC != 0 {
		closeAll(fds)
		return -1, fmt.Errorf("netns receiver: want one namespace descriptor from the createContainer hook, got %d", len(fds))
	}
	if got := string(buf[:n]); got != "netns "+id+"\n" {
		closeAll(fds)
		return -1, fmt.Errorf("netns receiver for container %s: unexpected message %q", id, got)
	}
	fd := fds[0]
	typ, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil || typ != unix.CLONE_NEWNET {
		unix.Close(fd)
		return -1, fmt.Errorf("netns receiver for container %s: the descriptor received is not a network namespace", id)
	}
	var theirs, ours unix.Stat_t
	if err := unix.Fstat(fd, &theirs); err == nil && unix.Stat("/proc/self/ns/net", &ours) == nil &&
		theirs.Dev == ours.Dev && theirs.Ino == ours.Ino {
		unix.Close(fd)
		return -1, fmt.Errorf("container %s %w", id, errHostNetns)
	}
	return fd, nil
}

// checkPeer refuses a peer that is not our own user.
func checkPeer(conn *net.UnixConn) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if credErr != nil {
		return fmt.Errorf("netns receiver: SO_PEERCRED: %w", credErr)
	}
	if int(cred.Uid) != os.Getuid() {
		return fmt.Errorf("netns receiver: refusing a peer running as uid %d (we are uid %d)", cred.Uid, os.Getuid())
	}
	return nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// answer tells the createContainer hook "ok" or why not.
func answer(conn *net.UnixConn, err error) error {
	_ = conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	msg := "ok\n"
	if err != nil {
		msg = err.Error()
	}
	_, werr := io.WriteString(conn, msg)
	return werr
}

// handOverNetns is the createContainer hook: it runs inside the container's
// namespaces (before pivot_root, so host paths are visible), finds the
// receiver createRuntime left, sends it /proc/self/ns/net and waits until
// the forwarder serves. Where createRuntime attached directly (runc),
// there is no receiver and nothing to do.
func handOverNetns(st *specs.State) error {
	dir, err := findStateDir(st.ID)
	if err != nil {
		return fmt.Errorf("container %s (createContainer): %w", st.ID, err)
	}
	sock := filepath.Join(dir, receiverSocket)
	if fi, err := os.Lstat(sock); err != nil || fi.Mode().Type() != os.ModeSocket {
		return nil
	}
	ns, err := os.Open("/proc/self/ns/net")
	if err != nil {
		return fmt.Errorf("container %s (createContainer): %w", st.ID, err)
	}
	defer ns.Close()
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return fmt.Errorf("container %s (createContainer): the netns receiver does not answer on %s: %w%s", st.ID, sock, err, receiverLogTail(dir))
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(handOverTimeout))
	if _, _, err := conn.WriteMsgUnix([]byte("netns "+st.ID+"\n"), unix.UnixRights(int(ns.Fd())), nil); err != nil {
		return fmt.Errorf("container %s (createContainer): send the netns to the receiver: %w", st.ID, err)
	}
	reply, err := io.ReadAll(io.LimitReader(conn, 64<<10))
	if err != nil {
		return fmt.Errorf("container %s (createContainer): no answer from the netns receiver: %w%s", st.ID, err, receiverLogTail(dir))
	}
	switch text := strings.TrimSpace(string(reply)); {
	case string(reply) == "ok\n":
		return nil
	case text == "":
		return fmt.Errorf("container %s (createContainer): the netns receiver hung up without an answer%s", st.ID, receiverLogTail(dir))
	default:
		return fmt.Errorf("%s", text)
	}
}

// findStateDir finds the state directory createRuntime made, as
// state.BaseDir chose it for the host user we are inside the container,
// without creating anything.
func findStateDir(id string) (string, error) {
	uid, err := hostUID()
	if err != nil {
		return "", err
	}
	var bases []string
	switch xdg := os.Getenv("XDG_RUNTIME_DIR"); {
	case uid == 0:
		bases = []string{"/run/portkit"}
	case xdg != "":
		bases = []string{filepath.Join(xdg, "portkit")}
	default:
		bases = []string{filepath.Join("/run/user", fmt.Sprint(uid), "portkit"), filepath.Join(os.TempDir(), fmt.Sprintf("portkit-%d", uid))}
	}
	for _, b := range bases {
		dir := filepath.Join(b, "oci", id)
		if fi, err := os.Lstat(dir); err == nil && fi.IsDir() {
			return dir, nil
		}
	}
	return "", fmt.Errorf("no portkit state for it in %s: did the createRuntime hook run, with the same XDG_RUNTIME_DIR?",
		strings.Join(bases, " or "))
}

// hostUID maps our effective uid through /proc/self/uid_map to the user it
// is in the parent user namespace: the host's, for a rootless container
// (the map is the identity outside any).
func hostUID() (int, error) {
	data, err := os.ReadFile("/proc/self/uid_map")
	if err != nil {
		return 0, err
	}
	return mapUID(string(data), os.Geteuid())
}

// mapUID maps uid through a uid_map's "INSIDE OUTSIDE COUNT" lines.
func mapUID(uidMap string, euid int) (int, error) {
	for _, line := range strings.Split(uidMap, "\n") {
		var inside, outside, count int
		if _, err := fmt.Sscan(line, &inside, &outside, &count); err != nil {
			continue
		}
		if euid >= inside && euid < inside+count {
			return outside + (euid - inside), nil
		}
	}
	return 0, fmt.Errorf("uid %d is not mapped in /proc/self/uid_map", euid)
}

// receiverLogTail is the end of the receiver's log, for an error message.
func receiverLogTail(dir string) string {
	b, err := os.ReadFile(filepath.Join(dir, receiverLog))
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return "; its log ends: " + strings.TrimSpace(string(b))
}
