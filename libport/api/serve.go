package api

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// maxSocketPath is the longest path a unix socket address holds (sun_path
// is 108 bytes with its terminating NUL).
const maxSocketPath = 107

// Listen makes the API socket at socketPath, mode 0600. The directory must
// exist and be private (no access for group or others): the socket's mode
// alone does not keep out other users on every system, the directory's does.
// A stale socket left by a dead server is replaced; a live one, or any other
// kind of file, is an error.
func Listen(socketPath string) (*net.UnixListener, error) {
	if len(socketPath) > maxSocketPath {
		return nil, fmt.Errorf("API socket path %s is %d bytes, over the %d a unix socket allows: use a shorter state directory",
			socketPath, len(socketPath), maxSocketPath)
	}
	dir := filepath.Dir(socketPath)
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("API socket directory: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("API socket directory %s is not a directory", dir)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("API socket directory %s has mode %04o, so other users could reach the socket: make it private with `chmod 700 %s`",
			dir, perm, dir)
	}
	if err := removeStale(socketPath); err != nil {
		return nil, err
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: socketPath, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("API socket: %w", err)
	}
	// The directory is private, so the moment between bind and chmod exposes nothing.
	if err := os.Chmod(socketPath, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("API socket: %w", err)
	}
	return l, nil
}

// removeStale removes a socket at path that no server answers on.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("API socket: %w", err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("API socket path %s exists and is not a socket: refusing to replace it; remove it or pick another state directory", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("API socket %s: another server is listening on it: stop it first, or use another state directory", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale API socket: %w", err)
	}
	return nil
}

// Serve serves h on a new API socket at socketPath (see Listen) until ctx
// is done, then shuts down and removes the socket. It returns nil after a
// shutdown asked for by ctx.
func Serve(ctx context.Context, socketPath string, h http.Handler) error {
	l, err := Listen(socketPath)
	if err != nil {
		return err
	}
	return ServeListener(ctx, l, h)
}

// shutdownGrace is how long in-flight requests (a port being added) get to
// finish when the server stops.
const shutdownGrace = 5 * time.Second

// ServeListener serves h on l until ctx is done, like Serve; it closes l and
// removes its socket file when it returns. Use Listen and ServeListener to
// learn that the socket is ready (or to chown it) before serving.
func ServeListener(ctx context.Context, l *net.UnixListener, h http.Handler) error {
	path := l.Addr().String()
	fi, statErr := os.Lstat(path)
	defer func() {
		// Closing l unlinks the socket; make sure, but never remove a
		// socket some later server put in its place.
		if now, err := os.Lstat(path); statErr == nil && err == nil && os.SameFile(fi, now) {
			os.Remove(path)
		}
	}()
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       time.Minute,
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case err := <-errc:
		l.Close()
		return fmt.Errorf("API server on %s: %w", path, err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	<-errc
	return nil
}
