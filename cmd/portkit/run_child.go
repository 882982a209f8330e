package main

// The child side of `portkit run`: this code runs inside the new user, mount
// and (unless --net=host) network namespaces, in a re-exec of our own binary,
// before the command replaces it. It is entered from init(), so it never
// reaches the CLI.

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// runChildEnv marks a re-exec as the child: "1" before the ID mapping,
// "2" after it (exec'd again as uid 0 so that it holds its capabilities).
const runChildEnv = "_PORTKIT_RUN_CHILD"

// Descriptors the parent passes to the child (ExtraFiles).
const (
	childSyncFD   = 3 // parent -> child: "mapped", then the childPlan as JSON, one line each
	childStatusFD = 4 // child -> parent: "error CODE MESSAGE" on failure; EOF at exec means success
)

// childPlan is what the parent tells the child once the network is ready.
type childPlan struct {
	Net         string   // slirp4netns, pasta, none, host
	ResolvConf  string   // file to bind over /etc/resolv.conf, "" to keep it
	CopyUp      []string // directories to replace with writable tmpfs copies
	Propagation string   // of the root mount
	Argv        []string
	Env         []string
	Dir         string
}

func init() {
	switch os.Getenv(runChildEnv) {
	case "":
		return
	case "1":
		childBeforeMapping()
	case "2":
		childAfterMapping()
	}
	os.Exit(1) // not reached
}

// readLine reads one line from fd byte by byte: nothing past the newline is
// consumed, so the next stage (after exec) reads the next message.
func readLine(fd int) (string, error) {
	var line []byte
	b := make([]byte, 1)
	for {
		n, err := unix.Read(fd, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return "", err
		}
		if n == 0 {
			return "", errors.New("parent closed the sync pipe")
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
}

func childBeforeMapping() {
	msg, err := readLine(childSyncFD)
	if err != nil || msg != "mapped" {
		os.Exit(1) // the parent gave up; it reports why
	}
	// Exec again now that uid 0 is mapped: only an exec as uid 0 grants the
	// capabilities in the user namespace that mounts and netlink need.
	os.Setenv(runChildEnv, "2")
	err = syscall.Exec("/proc/self/exe", os.Args, os.Environ())
	childFail(1, fmt.Errorf("re-exec /proc/self/exe after the ID mapping: %w", err))
}

// childFail tells the parent why the child gives up, and exits.
func childFail(code int, err error) {
	msg := strings.ReplaceAll(err.Error(), "\n", " ")
	unix.Write(childStatusFD, []byte(fmt.Sprintf("error %d %s\n", code, msg)))
	os.Exit(code)
}

func childAfterMapping() {
	// The exec that granted our capabilities cleared the parent-death
	// signal (the kernel does so when an exec raises capabilities): set it
	// again, on the thread that will exec the command (the setting is per
	// thread), so the command never outlives a killed `portkit run`. Should
	// the parent already be gone, the read below sees EOF and we exit.
	runtime.LockOSThread()
	_ = unix.Prctl(unix.PR_SET_PDEATHSIG, uintptr(unix.SIGKILL), 0, 0, 0)
	line, err := readLine(childSyncFD)
	if err != nil {
		os.Exit(1)
	}
	var plan childPlan
	if err := json.Unmarshal([]byte(line), &plan); err != nil {
		childFail(1, fmt.Errorf("child: bad plan from the parent: %w", err))
	}
	if len(plan.Argv) == 0 {
		childFail(1, errors.New("child: no command"))
	}
	if err := setPropagation(plan.Propagation); err != nil {
		childFail(1, err)
	}
	for _, dir := range plan.CopyUp {
		if err := copyUp(dir); err != nil {
			childFail(1, err)
		}
	}
	if plan.ResolvConf != "" {
		if err := bindResolvConf(plan.ResolvConf); err != nil {
			childFail(1, err)
		}
	}
	if plan.Net != "host" {
		if err := linkUp(1); err != nil {
			childFail(1, fmt.Errorf("bring up lo in the child: %w", err))
		}
	}
	if plan.Dir != "" {
		_ = os.Chdir(plan.Dir)
	}
	path, err := exec.LookPath(plan.Argv[0])
	if err != nil {
		code := 127
		if errors.Is(err, os.ErrPermission) {
			code = 126
		}
		childFail(code, fmt.Errorf("command %q: %w", plan.Argv[0], err))
	}
	unix.CloseOnExec(childSyncFD)
	unix.CloseOnExec(childStatusFD)
	err = syscall.Exec(path, plan.Argv, plan.Env)
	code := 126
	if errors.Is(err, unix.ENOENT) {
		code = 127
	}
	childFail(code, fmt.Errorf("exec %s: %w", path, err))
}

var propagationFlags = map[string]uintptr{
	"private": unix.MS_PRIVATE, "rprivate": unix.MS_PRIVATE | unix.MS_REC,
	"slave": unix.MS_SLAVE, "rslave": unix.MS_SLAVE | unix.MS_REC,
	"shared": unix.MS_SHARED, "rshared": unix.MS_SHARED | unix.MS_REC,
}

func setPropagation(p string) error {
	if err := unix.Mount("none", "/", "", propagationFlags[p], ""); err != nil {
		return fmt.Errorf("set propagation of / to %s: %w", p, err)
	}
	return nil
}

// copyRO is the hidden directory inside a copied-up directory where the
// original stays reachable; the tmpfs holds symlinks into it.
const copyRO = ".portkit-ro"

// copyUp replaces dir with a writable tmpfs whose entries are symlinks to
// the original entries (which stay visible, read-only in spirit, under
// dir/.portkit-ro), so files can be replaced without touching the parent's.
func copyUp(dir string) error {
	dir = filepath.Clean(dir)
	if !filepath.IsAbs(dir) || dir == "/" {
		return fmt.Errorf("copy-up %s: want an absolute directory other than /", dir)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("copy-up %s: %w", dir, err)
	}
	// A detached copy of the original mount tree, taken before the tmpfs
	// hides it (a /proc/self/fd path would resolve to the tmpfs on top).
	tree, err := unix.OpenTree(unix.AT_FDCWD, dir, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_RECURSIVE)
	if err != nil {
		return fmt.Errorf("copy-up %s: clone the original mount: %w", dir, err)
	}
	defer unix.Close(tree)
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "mode=755"); err != nil {
		return fmt.Errorf("copy-up %s: mount tmpfs: %w", dir, err)
	}
	ro := filepath.Join(dir, copyRO)
	if err := os.Mkdir(ro, 0o755); err != nil {
		return fmt.Errorf("copy-up %s: %w", dir, err)
	}
	if err := unix.MoveMount(tree, "", unix.AT_FDCWD, ro, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("copy-up %s: attach the original at %s: %w", dir, ro, err)
	}
	for _, e := range entries {
		target := filepath.Join(copyRO, e.Name())
		if e.Type()&os.ModeSymlink != 0 {
			if target, err = os.Readlink(filepath.Join(ro, e.Name())); err != nil {
				return fmt.Errorf("copy-up %s: %w", dir, err)
			}
		}
		if err := os.Symlink(target, filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("copy-up %s: %w", dir, err)
		}
	}
	return nil
}

// bindResolvConf puts src over /etc/resolv.conf (following a symlink there,
// as the resolver does).
func bindResolvConf(src string) error {
	const dst = "/etc/resolv.conf"
	if _, err := os.Stat(dst); errors.Is(err, os.ErrNotExist) {
		// A dangling symlink or no file: make one to mount over, if /etc lets us.
		if f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			f.Close()
		}
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s over %s: %w (use --copy-up=/etc if it is missing or a dangling symlink)", src, dst, err)
	}
	return nil
}

// linkUp sets IFF_UP on the interface with index idx over rtnetlink.
func linkUp(idx int32) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	req := make([]byte, unix.SizeofNlMsghdr+unix.SizeofIfInfomsg)
	hdr := (*unix.NlMsghdr)(unsafe.Pointer(&req[0]))
	hdr.Len = uint32(len(req))
	hdr.Type = unix.RTM_NEWLINK
	hdr.Flags = unix.NLM_F_REQUEST | unix.NLM_F_ACK
	hdr.Seq = 1
	ifi := (*unix.IfInfomsg)(unsafe.Pointer(&req[unix.SizeofNlMsghdr]))
	ifi.Family = unix.AF_UNSPEC
	ifi.Index = idx
	ifi.Flags = unix.IFF_UP
	ifi.Change = unix.IFF_UP
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 4096)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return err
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil {
		return err
	}
	for _, m := range msgs {
		if m.Header.Type == unix.NLMSG_ERROR && len(m.Data) >= 4 {
			if errno := int32(binary.NativeEndian.Uint32(m.Data[:4])); errno != 0 {
				return syscall.Errno(-errno)
			}
		}
	}
	return nil
}
