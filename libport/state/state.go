// Package state holds the state directory of one attachment: the files a
// forwarder leaves for the tools that find it (RootlessKit's api.sock and
// child_pid, portkit's own pid, config and port files), the lock that keeps
// two forwarders off one directory, and liveness checks that survive PID reuse.
//
// A state directory must be owned by the caller and closed to everyone else
// (0700). Everything inside it is opened relative to a directory fd with
// O_NOFOLLOW, so a symlink planted in the path of a file is refused rather
// than followed.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// File names inside a state directory. The first two are RootlessKit's, so
// rootlessctl and nerdctl find them through $ROOTLESSKIT_STATE_DIR.
const (
	APISocket     = "api.sock"       // RootlessKit REST API v1
	ChildPIDFile  = "child_pid"      // PID of a process in the child netns, decimal
	LockFile      = "lock"           // flock held by the process serving the directory
	ForwarderFile = "forwarder.pid"  // Process of the forwarder: "PID STARTTIME"
	SupervisorPID = "supervisor.pid" // Process of the supervisor of a spawned forwarder
	NetworkPID    = "network.pid"    // Process of slirp4netns or pasta, when the forwarder started one
	ConfigFile    = "config.json"    // the forwarder's Config
	PortsFile     = "ports.json"     // the port table, rewritten after each change
	LogFile       = "forwarder.log"  // stdout and stderr of a spawned forwarder
)

// maxFileSize bounds what ReadFile accepts: state files are small, and a
// huge one is damage or an attack, not state.
const maxFileSize = 1 << 20

// ErrLocked is returned by Lock when another process serves the directory.
var ErrLocked = errors.New("state directory is in use by another forwarder")

// Dir is an open, checked state directory.
type Dir struct {
	path string
	fd   int
}

// Create makes the state directory at path (and missing parents) with mode
// 0700 and opens it. An existing directory is accepted only when it passes
// the checks of Open.
func Create(path string) (*Dir, error) {
	if path == "" {
		return nil, errors.New("state dir: empty path: give a directory such as /run/user/UID/portkit/NAME")
	}
	path = filepath.Clean(path)
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, &createError{what: "state dir", path: path, err: err}
	}
	return Open(path)
}

// ErrCannotCreate matches the error of a state directory that did not exist
// and could not be made (read-only or full file system, no permission): no
// attachment can have been recorded in it, so there is nothing to clean up.
var ErrCannotCreate = errors.New("state directory cannot be created")

type createError struct {
	what, path string
	err        error
}

func (e *createError) Error() string        { return fmt.Sprintf("create %s %s: %v", e.what, e.path, e.err) }
func (e *createError) Unwrap() error        { return e.err }
func (e *createError) Is(target error) bool { return target == ErrCannotCreate }

// Open opens the existing state directory at path. It refuses a symlink, a
// directory owned by another user, and one that group or others may enter.
// A missing directory gives an error that matches os.ErrNotExist.
func Open(path string) (*Dir, error) {
	if path == "" {
		return nil, errors.New("state dir: empty path")
	}
	path = filepath.Clean(path)
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			return nil, fmt.Errorf("open state dir %s: it is a symlink or not a directory: refusing it (remove it, or choose another --state-dir)", path)
		}
		if st, lerr := os.Lstat(path); lerr == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) != os.Geteuid() {
				return nil, fmt.Errorf("state dir %s is owned by uid %d, not by us (uid %d): refusing it; remove it or choose another --state-dir", path, sys.Uid, os.Geteuid())
			}
		}
		return nil, fmt.Errorf("open state dir %s: %w", path, err)
	}
	if err := checkPrivateDir(fd, path); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &Dir{path: path, fd: fd}, nil
}

// checkPrivateDir refuses a directory fd that is not owned by the effective
// user or is open to group or others.
func checkPrivateDir(fd int, path string) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat state dir %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return fmt.Errorf("state dir %s is not a directory", path)
	}
	if euid := os.Geteuid(); int(st.Uid) != euid {
		return fmt.Errorf("state dir %s is owned by uid %d, not by us (uid %d): refusing it; remove it or choose another --state-dir", path, st.Uid, euid)
	}
	if perm := st.Mode & 0o7777; perm&0o077 != 0 {
		return fmt.Errorf("state dir %s has mode %04o: group and others must have no access (run: chmod 700 %s)", path, perm, path)
	}
	return nil
}

// Path is the directory's path.
func (d *Dir) Path() string { return d.path }

// Join is the path of name inside the directory.
func (d *Dir) Join(name string) string { return filepath.Join(d.path, name) }

// Close releases the directory fd.
func (d *Dir) Close() error {
	if d.fd < 0 {
		return nil
	}
	err := unix.Close(d.fd)
	d.fd = -1
	return err
}

func checkName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("state file name %q: must be a single path component", name)
	}
	return nil
}

// openFile opens name inside the directory without following a symlink.
func (d *Dir) openFile(name string, flags int, perm uint32) (*os.File, error) {
	if err := checkName(name); err != nil {
		return nil, err
	}
	fd, err := unix.Openat(d.fd, name, flags|unix.O_NOFOLLOW|unix.O_CLOEXEC, perm)
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			return nil, fmt.Errorf("open %s: it is a symlink: refusing to follow it", d.Join(name))
		}
		return nil, &os.PathError{Op: "open", Path: d.Join(name), Err: err}
	}
	return os.NewFile(uintptr(fd), d.Join(name)), nil
}

var tmpSeq atomic.Uint64

// WriteFile replaces name with data atomically (a temporary file renamed
// over it), mode 0600, so a reader sees the old content or the new, never half.
func (d *Dir) WriteFile(name string, data []byte) error {
	if err := checkName(name); err != nil {
		return err
	}
	tmp := "." + name + ".tmp" + strconv.Itoa(os.Getpid()) + "." + strconv.FormatUint(tmpSeq.Add(1), 10)
	f, err := d.openFile(tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("write %s: %w", d.Join(name), err)
	}
	_, werr := f.Write(data)
	cerr := f.Close()
	if werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = unix.Renameat(d.fd, tmp, d.fd, name)
	}
	if werr != nil {
		_ = unix.Unlinkat(d.fd, tmp, 0)
		return fmt.Errorf("write %s: %w", d.Join(name), werr)
	}
	return nil
}

// ReadFile returns the content of name; a missing file matches os.ErrNotExist.
func (d *Dir) ReadFile(name string) ([]byte, error) {
	f, err := d.openFile(name, unix.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("read %s: not a regular file", d.Join(name))
	}
	data, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", d.Join(name), err)
	}
	if len(data) > maxFileSize {
		return nil, fmt.Errorf("read %s: larger than %d bytes: not a state file", d.Join(name), maxFileSize)
	}
	return data, nil
}

// WriteJSON writes v as indented JSON to name, atomically.
func (d *Dir) WriteJSON(name string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", d.Join(name), err)
	}
	return d.WriteFile(name, append(data, '\n'))
}

// ReadJSON decodes name into v.
func (d *Dir) ReadJSON(name string, v any) error {
	data, err := d.ReadFile(name)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("decode %s: %w", d.Join(name), err)
	}
	return nil
}

// Remove deletes name (a file or a socket); a missing name is not an error.
func (d *Dir) Remove(name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	if err := unix.Unlinkat(d.fd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return &os.PathError{Op: "remove", Path: d.Join(name), Err: err}
	}
	return nil
}

// Exists reports whether name is present (without following a symlink).
func (d *Dir) Exists(name string) bool {
	if checkName(name) != nil {
		return false
	}
	var st unix.Stat_t
	return unix.Fstatat(d.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil
}

// OpenLog opens name for appending (mode 0600), for a detached process's
// stdout and stderr.
func (d *Dir) OpenLog(name string) (*os.File, error) {
	return d.openFile(name, unix.O_WRONLY|unix.O_CREAT|unix.O_APPEND, 0o600)
}

// RemoveAll closes the directory and removes it with everything inside.
// Go's RemoveAll works with openat and does not follow symlinks inside.
func (d *Dir) RemoveAll() error {
	d.Close()
	if err := os.RemoveAll(d.path); err != nil {
		return fmt.Errorf("remove state dir %s: %w", d.path, err)
	}
	return nil
}

// WriteProcess records p in name as "PID STARTTIME".
func (d *Dir) WriteProcess(name string, p Process) error {
	return d.WriteFile(name, []byte(p.String()+"\n"))
}

// ReadProcess reads a Process written by WriteProcess.
func (d *Dir) ReadProcess(name string) (Process, error) {
	data, err := d.ReadFile(name)
	if err != nil {
		return Process{}, err
	}
	p, err := ParseProcess(string(data))
	if err != nil {
		return Process{}, fmt.Errorf("read %s: %w", d.Join(name), err)
	}
	return p, nil
}

// WritePID records a bare decimal PID, as RootlessKit writes child_pid.
func (d *Dir) WritePID(name string, pid int) error {
	return d.WriteFile(name, []byte(strconv.Itoa(pid)))
}

// Lock is an exclusive flock on the directory's lock file, held as long as
// any process keeps the file open (it passes to children that inherit it).
type Lock struct{ f *os.File }

// Lock takes the directory's lock without waiting; when another process
// holds it the error matches ErrLocked.
func (d *Dir) Lock() (*Lock, error) {
	for range 10 {
		f, err := d.openFile(LockFile, unix.O_RDWR|unix.O_CREAT, 0o600)
		if err != nil {
			return nil, fmt.Errorf("lock state dir %s: %w", d.path, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("lock %s: %w", d.Join(LockFile), ErrLocked)
			}
			return nil, fmt.Errorf("lock %s: %w", d.Join(LockFile), err)
		}
		// The holder before us may have unlinked the file while we waited
		// for it; a lock on an unlinked inode protects nothing, so retry.
		var held, named unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) == nil &&
			unix.Fstatat(d.fd, LockFile, &named, unix.AT_SYMLINK_NOFOLLOW) == nil &&
			held.Ino == named.Ino && held.Dev == named.Dev {
			return &Lock{f: f}, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("lock %s: the lock file keeps changing under us", d.Join(LockFile))
}

// AdoptLock wraps a lock file inherited from the process that took the lock.
func AdoptLock(f *os.File) *Lock { return &Lock{f: f} }

// File is the open lock file, to hand to a child process that must hold the lock.
func (l *Lock) File() *os.File { return l.f }

// Release drops the lock (for this process; children that inherited the
// file keep holding it).
func (l *Lock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	return err
}

// IsLocked reports whether some process holds the directory's lock. It
// creates nothing.
func (d *Dir) IsLocked() bool {
	f, err := d.openFile(LockFile, unix.O_RDONLY, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return errors.Is(err, unix.EWOULDBLOCK)
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return false
}
