package state

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// BaseDir returns (creating it 0700 if needed) the directory under which
// portkit keeps one state directory per attachment: /run/portkit for root,
// $XDG_RUNTIME_DIR/portkit otherwise. Without XDG_RUNTIME_DIR (no logind)
// it uses /run/user/UID/portkit when /run/user/UID is ours or can be made,
// else /tmp/portkit-UID, a private directory refused if anyone else owns it.
func BaseDir() (string, error) {
	uid := os.Geteuid()
	if uid == 0 {
		dir, err := privateDir("/run/portkit")
		// Root of a user namespace (CNI plugins under rootless nerdctl run
		// as uid 0 in the launcher's child) may see /run/portkit as the
		// parent's, through a copy-up symlink (--copy-up=/run): then it keeps
		// its state where an unprivileged user would.
		if err == nil || initialUserns() {
			return dir, err
		}
	}
	if xdg := os.Getenv("XDG_RUNTIME_DIR"); xdg != "" {
		return privateDir(filepath.Join(xdg, "portkit"))
	}
	runUser := filepath.Join("/run/user", strconv.Itoa(uid))
	if err := os.Mkdir(runUser, 0o700); err == nil || errors.Is(err, os.ErrExist) {
		if checkPath(runUser) == nil {
			return privateDir(filepath.Join(runUser, "portkit"))
		}
	}
	return privateDir(filepath.Join(os.TempDir(), "portkit-"+strconv.Itoa(uid)))
}

// initialUserns reports whether we run in the initial user namespace,
// whose uid_map is the identity over every ID.
func initialUserns() bool {
	data, err := os.ReadFile("/proc/self/uid_map")
	if err != nil {
		return true
	}
	f := strings.Fields(string(data))
	return len(f) == 3 && f[0] == "0" && f[1] == "0" && f[2] == "4294967295"
}

// privateDir makes path 0700 if missing (its parent must exist) and checks
// that it is a real directory, ours, and private.
func privateDir(path string) (string, error) {
	if err := os.Mkdir(path, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return "", &createError{what: "state base dir", path: path, err: err}
	}
	if err := checkPath(path); err != nil {
		return "", err
	}
	return path, nil
}

// checkPath opens path without following a final symlink and applies the
// state directory checks.
func checkPath(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			return fmt.Errorf("state base dir %s is a symlink or not a directory: refusing it", path)
		}
		if st, lerr := os.Lstat(path); lerr == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) != os.Geteuid() {
				return fmt.Errorf("state base dir %s is owned by uid %d, not by us (uid %d): refusing it; remove it or set XDG_RUNTIME_DIR", path, sys.Uid, os.Geteuid())
			}
		}
		return fmt.Errorf("open state base dir %s: %w", path, err)
	}
	defer unix.Close(fd)
	return checkPrivateDir(fd, path)
}
