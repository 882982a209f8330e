// Package drivertest runs a libport.Driver as the unprivileged test user, so
// that tests (which run as root) exercise the driver exactly as a rootless
// forwarder would. The test binary re-executes itself as the user and serves
// the driver over its stdin/stdout; the test holds a Remote, which is itself a
// libport.Driver.
//
// Use it from TestMain, before testenv.Main:
//
//	func TestMain(m *testing.M) {
//		drivertest.Serve(map[string]drivertest.Factory{"socat": newSocat})
//		testenv.Main(m)
//	}
package drivertest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
)

// Factory builds the driver under test inside the re-executed process.
type Factory func(args []string) (libport.Driver, error)

const (
	envFactory = "PORTKIT_DRIVERTEST_FACTORY"
	envArgs    = "PORTKIT_DRIVERTEST_ARGS"
)

type message struct {
	Op        string              `json:"op"`
	ID        int                 `json:"id,omitempty"`
	Spec      libport.Spec        `json:"spec,omitempty"`
	TimeoutMS int64               `json:"timeoutMs,omitempty"`
	Err       string              `json:"err,omitempty"`
	Info      *libport.DriverInfo `json:"info,omitempty"`
}

// Serve turns this process into a driver server when it was started by
// Start; otherwise it returns at once.
func Serve(factories map[string]Factory) {
	name := os.Getenv(envFactory)
	if name == "" {
		return
	}
	var args []string
	if err := json.Unmarshal([]byte(os.Getenv(envArgs)), &args); err != nil {
		fmt.Fprintf(os.Stderr, "drivertest: bad %s: %v\n", envArgs, err)
		os.Exit(2)
	}
	f, ok := factories[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "drivertest: unknown factory %q\n", name)
		os.Exit(2)
	}
	enc := json.NewEncoder(os.Stdout)
	d, err := f(args)
	if err != nil {
		_ = enc.Encode(message{Op: "ready", Err: err.Error()})
		os.Exit(1)
	}
	_ = enc.Encode(message{Op: "ready"})
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 64<<10), 1<<20)
	for in.Scan() {
		var req message
		if err := json.Unmarshal(in.Bytes(), &req); err != nil {
			_ = enc.Encode(message{Err: "drivertest: " + err.Error()})
			continue
		}
		ctx, cancel := context.Background(), context.CancelFunc(func() {})
		if req.TimeoutMS > 0 {
			ctx, cancel = context.WithTimeout(ctx, time.Duration(req.TimeoutMS)*time.Millisecond)
		}
		var rep message
		switch req.Op {
		case "info":
			info := d.Info()
			rep.Info = &info
		case "add":
			err = d.Add(ctx, req.ID, req.Spec)
		case "remove":
			err = d.Remove(ctx, req.ID)
		case "close":
			err = d.Close()
		default:
			err = fmt.Errorf("drivertest: unknown op %q", req.Op)
		}
		cancel()
		if err != nil {
			rep.Err = err.Error()
		}
		_ = enc.Encode(rep)
		err = nil
	}
	// stdin closed: the test is done with us; release what is left.
	_ = d.Close()
	os.Exit(0)
}

// Remote is a driver running as another user in a re-executed test binary.
type Remote struct {
	cmd *exec.Cmd

	mu  sync.Mutex
	in  io.WriteCloser
	out *json.Decoder
}

// Start runs the driver that factory builds from args as u, and stops it at
// cleanup (its stdin closes, so it closes the driver and exits).
func Start(t testing.TB, u *testenv.User, factory string, args ...string) *Remote {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The test binary sits in a directory only root may enter: give the
	// user a copy.
	dir := u.Dir(t)
	exe := filepath.Join(dir, filepath.Base(self))
	if err := copyFile(self, exe); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(exe, u.UID, u.GID); err != nil {
		t.Fatal(err)
	}
	a, _ := json.Marshal(args)
	cmd := u.Cmd(exe)
	cmd.Dir = dir
	cmd.Env = append(cmd.Env, envFactory+"="+factory, envArgs+"="+string(a))
	cmd.Stderr = logWriter{t}
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start driver %s as %s: %v", factory, u.Name, err)
	}
	r := &Remote{cmd: cmd, in: in, out: json.NewDecoder(out)}
	t.Cleanup(func() { r.stop(t) })
	var ready message
	if err := r.out.Decode(&ready); err != nil || ready.Err != "" {
		t.Fatalf("driver %s as %s did not start: %v %s", factory, u.Name, err, ready.Err)
	}
	return r
}

// PID is the process the driver runs in.
func (r *Remote) PID() int { return r.cmd.Process.Pid }

func (r *Remote) stop(t testing.TB) {
	r.in.Close()
	done := make(chan error, 1)
	go func() { done <- r.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("driver process exited: %v", err)
		}
	case <-time.After(10 * time.Second):
		_ = r.cmd.Process.Kill()
		<-done
		t.Errorf("driver process did not exit within 10s of its stdin closing")
	}
}

func (r *Remote) do(ctx context.Context, req message) (message, error) {
	if dl, ok := ctx.Deadline(); ok {
		req.TimeoutMS = max(1, time.Until(dl).Milliseconds())
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	b, _ := json.Marshal(req)
	if _, err := r.in.Write(append(b, '\n')); err != nil {
		return message{}, err
	}
	var rep message
	if err := r.out.Decode(&rep); err != nil {
		return message{}, fmt.Errorf("driver process: %w", err)
	}
	if rep.Err != "" {
		return rep, errors.New(rep.Err)
	}
	return rep, nil
}

// Info implements libport.Driver.
func (r *Remote) Info() libport.DriverInfo {
	rep, err := r.do(context.Background(), message{Op: "info"})
	if err != nil || rep.Info == nil {
		return libport.DriverInfo{}
	}
	return *rep.Info
}

// Add implements libport.Driver.
func (r *Remote) Add(ctx context.Context, id int, spec libport.Spec) error {
	_, err := r.do(ctx, message{Op: "add", ID: id, Spec: spec})
	return err
}

// Remove implements libport.Driver.
func (r *Remote) Remove(ctx context.Context, id int) error {
	_, err := r.do(ctx, message{Op: "remove", ID: id})
	return err
}

// Close implements libport.Driver.
func (r *Remote) Close() error {
	_, err := r.do(context.Background(), message{Op: "close"})
	return err
}

type logWriter struct{ t testing.TB }

func (w logWriter) Write(p []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
		w.t.Logf("driver: %s", line)
	}
	return len(p), nil
}

func copyFile(from, to string) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return err
	}
	return dst.Close()
}
