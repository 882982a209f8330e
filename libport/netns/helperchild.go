package netns

// This file runs inside the child's user and network namespaces: it is the
// helper, our own binary exec'd by nsenter after nsenter joined them.

import (
	"bytes"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// helperEnv, when set, turns any binary that imports this package into the
// helper. Its value is the fd of the control socket.
const helperEnv = "PORTKIT_NETNS_HELPER"

// The fds the parent hands the helper's nsenter (see helperSource.start).
const (
	helperCtrlFd   = 3
	helperUsernsFd = 4
	helperNetnsFd  = 5
	helperExeFd    = 6
)

// init takes over before main, flag parsing or a test binary's TestMain run,
// so that every binary importing netns can serve as the helper.
func init() {
	if os.Getenv(helperEnv) != "" {
		os.Exit(runHelper())
	}
}

// runHelper serves requests until the parent closes its end (or dies, which
// closes it too) and returns the exit code.
func runHelper() int {
	os.Unsetenv(helperEnv)
	if typ, err := unix.GetsockoptInt(helperCtrlFd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_SEQPACKET {
		// Not started by helperSource: say so rather than exit silently.
		os.Stderr.WriteString(helperEnv + " is set but fd 3 is not the helper's control socket: unset it to run this program normally\n")
		return 2
	}
	// The namespace and binary fds were for nsenter; the control socket is
	// all the helper keeps.
	for _, fd := range []int{helperUsernsFd, helperNetnsFd, helperExeFd} {
		unix.Close(fd)
	}
	// init runs on the main thread, whose name ps shows; nsenter exec'd
	// /proc/self/fd/N, which would show as "N".
	_ = os.WriteFile("/proc/self/comm", []byte("portkit-netns"), 0)
	runtime.GOMAXPROCS(1) // one request at a time; keep the helper small
	buf := make([]byte, requestHeaderLen+maxPayload+1)
	for {
		n, _, _, _, err := unix.Recvmsg(helperCtrlFd, buf, nil, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			// EOF: the parent closed the source or died (its end is
			// close-on-exec, so no other process holds it). This backs up
			// PDEATHSIG, which a credential change on the way may clear.
			return 0
		}
		req, err := parseRequest(buf[:n])
		if err != nil {
			return 2 // the parent speaks another protocol: not ours to guess
		}
		rep, fds := serveRequest(req)
		var oob []byte
		if len(fds) > 0 {
			oob = unix.UnixRights(fds...)
		}
		for {
			err = unix.Sendmsg(helperCtrlFd, rep.marshal(), oob, nil, unix.MSG_NOSIGNAL)
			if err != unix.EINTR {
				break
			}
		}
		closeFds(fds)
		if err != nil {
			return 0
		}
	}
}

// serveRequest does what req asks inside the namespaces.
func serveRequest(req request) (reply, []int) {
	rep := reply{id: req.id}
	switch req.op {
	case opHello:
	case opSocket:
		count := int(req.count)
		if count < 1 || count > maxBatch {
			rep.errno = int32(unix.EINVAL)
			return rep, nil
		}
		fds := make([]int, 0, count)
		for range count {
			fd, err := unix.Socket(int(req.domain), int(req.typ)|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, int(req.proto))
			if err != nil {
				rep.errno = int32(err.(unix.Errno))
				break
			}
			fds = append(fds, fd)
		}
		rep.nfds = uint32(len(fds))
		return rep, fds
	case opSysctl:
		key, value, ok := bytes.Cut(req.payload, []byte{0})
		p, err := sysctlPath(string(key))
		if !ok || err != nil {
			rep.errno = int32(unix.EINVAL)
			return rep, nil
		}
		if err := writeSysctl(p, string(value)); err != nil {
			rep.errno = int32(unix.EIO)
			if errno, ok := underlyingErrno(err); ok {
				rep.errno = int32(errno)
			}
		}
	default:
		rep.errno = int32(unix.ENOSYS)
	}
	return rep, nil
}

func underlyingErrno(err error) (unix.Errno, bool) {
	if pe, ok := err.(*os.PathError); ok {
		if errno, ok := pe.Err.(unix.Errno); ok {
			return errno, true
		}
	}
	return 0, false
}
