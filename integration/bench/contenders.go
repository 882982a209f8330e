package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/portkit/portkit/internal/testenv"
)

// mapping is one published port: host 127.0.0.1:host → child :child.
type mapping struct {
	proto       string // tcp or udp
	hostIP      string // where the clients connect: 127.0.0.1, or the host end of a peer's veth
	host, child int
}

// childIP is where the forwarder dials in the child. RootlessKit's rule (which
// portkit keeps) uses a specific non-loopback parent IP as the child IP too,
// so for clients from a veth peer the bench names 127.0.0.1 explicitly.
func (m mapping) childIP() string {
	if m.hostIP == "127.0.0.1" {
		return ""
	}
	return "127.0.0.1"
}

func (m mapping) spec() string {
	if ip := m.childIP(); ip != "" {
		return fmt.Sprintf("%s:%d:%s:%d/%s", m.hostIP, m.host, ip, m.child, m.proto)
	}
	return fmt.Sprintf("%s:%d:%d/%s", m.hostIP, m.host, m.child, m.proto)
}

// instance is a contender set up and forwarding the bench's ports.
type instance struct {
	childPID int    // servers are started in this process's user+net namespaces; 0 = the host
	bindAddr string // where child-side servers listen
	roots    []int  // the forwarder's process trees, for RSS
	skipComm map[string]bool
	// add publishes one more port at run time, through the driver's API
	// (nil: ports are fixed at start, as with pasta).
	add func(m mapping) error
	// setupMs is how long publishing the initial ports took, per port.
	setupMs float64
}

// contender is one way of getting "host 127.0.0.1:P → server in a child
// netns". Adding one is one entry in contenders() and, if new, a start func.
type contender struct {
	name   string
	index  int      // position in contenders(): picks its host ports
	direct bool     // servers on the host itself, no forwarder
	quick  bool     // part of the BENCH_QUICK smoke run
	needs  []string // programs on PATH
	// portkit names a driver `portkit daemon` must offer; its --help is checked.
	portkit []string
	// peer: clients connect from a veth peer netns (a non-loopback source
	// address), so source-IP transparency is exercised; needs root.
	peer bool
	// cni: needs the usernet and portdriver plugins built.
	cni   bool
	start func(e *env, s *scope, ports []mapping) (*instance, error)
}

func contenders() []contender {
	return []contender{
		{name: "direct", quick: true, direct: true, start: startDirect},
		{name: "direct-peer", peer: true, direct: true, start: startDirect},
		{name: "portkit-builtin", quick: true, portkit: []string{"-port-driver", "builtin", "-netns"},
			start: startPortkit("builtin")},
		// Clients from a veth peer, so the builtin driver's source-IP
		// transparency is exercised (loopback clients are always dialed plainly).
		{name: "portkit-builtin-srcip", peer: true, portkit: []string{"-port-driver", "builtin", "-source-ip"},
			start: startPortkit("builtin", "--source-ip", "tcp,udp")},
		{name: "portkit-builtin-nosrcip", peer: true, portkit: []string{"-port-driver", "builtin", "-source-ip"},
			start: startPortkit("builtin", "--source-ip", "none")},
		{name: "portkit-slirp4netns", needs: []string{"slirp4netns"}, portkit: []string{"-port-driver", "slirp4netns", "-net"},
			start: startPortkit("slirp4netns", "--net", "slirp4netns")},
		{name: "portkit-implicit", needs: []string{"pasta"}, portkit: []string{"-port-driver", "implicit", "-net", "pasta"},
			start: startPortkit("implicit", "--net", "pasta")},
		{name: "portkit-socat", needs: []string{"socat"}, portkit: []string{"-port-driver", "socat"},
			start: startPortkit("socat")},
		// CNI ADD of usernet (slirp4netns) + portdriver (builtin), through libcni.
		{name: "portkit-cni", needs: []string{"slirp4netns"}, cni: true, start: startCNI},
		{name: "rootlesskit-builtin", quick: true, needs: []string{"rootlesskit", "rootlessctl", "slirp4netns"},
			start: startRootlessKit("builtin")},
		{name: "rootlesskit-slirp4netns", needs: []string{"rootlesskit", "rootlessctl", "slirp4netns"},
			start: startRootlessKit("slirp4netns")},
		{name: "slirp4netns", needs: []string{"slirp4netns"}, start: startSlirp4netns},
		{name: "pasta", quick: true, needs: []string{"pasta"}, start: startPasta},
	}
}

// env is what every contender shares.
type env struct {
	user *testenv.User
	bins *bins
}

// direct: the server on the host itself, no namespace, no forwarder: the
// physical limit (the bench binds the servers to the clients' address).
func startDirect(e *env, s *scope, ports []mapping) (*instance, error) {
	return &instance{bindAddr: "127.0.0.1"}, nil
}

// RootlessKit 1.1 from Debian with --net=slirp4netns and the given port
// driver; ports are published with the unmodified rootlessctl.
func startRootlessKit(driver string) func(*env, *scope, []mapping) (*instance, error) {
	return func(e *env, s *scope, ports []mapping) (*instance, error) {
		dir := filepath.Join(e.user.Dir(s), "state")
		// No --disable-host-loopback: with it libslirp drops UDP replies to
		// host-side clients (podman#4586), and UDP could not be measured.
		cmd := e.user.Cmd("rootlesskit", "--state-dir="+dir, "--net=slirp4netns", "--mtu=65520",
			"--port-driver="+driver, "sleep", "infinity")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := start(s, cmd); err != nil {
			return nil, err
		}
		sock := filepath.Join(dir, "api.sock")
		childPID, err := waitStateDir(dir, cmd, &stderr)
		if err != nil {
			return nil, err
		}
		in := &instance{childPID: childPID, bindAddr: "0.0.0.0", roots: []int{cmd.Process.Pid},
			skipComm: map[string]bool{"sleep": true}, add: func(m mapping) error { return apiAdd(sock, m) }}
		in.setupMs, err = timeEach(ports, func(m mapping) error {
			return run(e.user.Cmd("rootlessctl", "--socket", sock, "add-ports", m.spec()))
		})
		return in, err
	}
}

// portkit's forwarder, `portkit daemon`, as the unprivileged user; ports are
// published with `portkit add-ports`.
func startPortkit(driver string, extra ...string) func(*env, *scope, []mapping) (*instance, error) {
	return func(e *env, s *scope, ports []mapping) (*instance, error) {
		portkit := e.bins.have["portkit"]
		var ns *testenv.Netns
		if err, skipped := s.run(func() error { ns = testenv.ChildNetns(s, e.user); return nil }); err != nil {
			return nil, skipOr(err, skipped)
		}
		dir := filepath.Join(e.user.Dir(s), "state")
		args := append([]string{"daemon", "--state-dir", dir, "--port-driver", driver, "--netns", ns.Path}, extra...)
		if driver == "implicit" {
			// pasta forwards only what it was started with.
			for _, m := range ports {
				args = append(args, "-p", m.spec())
			}
		}
		cmd := e.user.Cmd(portkit, args...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		t0 := time.Now()
		if err := start(s, cmd); err != nil {
			return nil, err
		}
		sock := filepath.Join(dir, "api.sock")
		if err := waitFile(sock, 10*time.Second, cmd, &stderr); err != nil {
			return nil, err
		}
		in := &instance{childPID: ns.PID, bindAddr: "0.0.0.0", roots: []int{cmd.Process.Pid},
			add: func(m mapping) error { return apiAdd(sock, m) }}
		if driver == "implicit" {
			in.add = nil
			in.setupMs = float64(time.Since(t0).Microseconds()) / 1000 / float64(len(ports))
			return in, nil
		}
		var err error
		in.setupMs, err = timeEach(ports, func(m mapping) error {
			return run(e.user.Cmd(portkit, "add-ports", "--socket", sock, m.spec()))
		})
		return in, err
	}
}

// slirp4netns on its own, ports through its API's add_hostfwd.
func startSlirp4netns(e *env, s *scope, ports []mapping) (*instance, error) {
	var ns *testenv.Netns
	if err, skipped := s.run(func() error { ns = testenv.ChildNetns(s, e.user); return nil }); err != nil {
		return nil, skipOr(err, skipped)
	}
	sock := filepath.Join(e.user.Dir(s), "slirp.sock")
	ready, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer ready.Close()
	// No --disable-host-loopback, as for RootlessKit above (UDP replies).
	cmd := e.user.Cmd("slirp4netns", "--configure", "--mtu=65520",
		"--api-socket", sock, "--ready-fd=3", fmt.Sprintf("--userns-path=/proc/%d/ns/user", ns.PID),
		"--netns-type=path", ns.Path, "tap0")
	cmd.ExtraFiles = []*os.File{w}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = start(s, cmd)
	w.Close()
	if err != nil {
		return nil, err
	}
	_ = ready.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := ready.Read(make([]byte, 1)); err != nil {
		return nil, fmt.Errorf("slirp4netns did not become ready: %v: %s", err, stderr.String())
	}
	in := &instance{childPID: ns.PID, bindAddr: "0.0.0.0", roots: []int{cmd.Process.Pid},
		add: func(m mapping) error { return slirpAdd(sock, m) }}
	in.setupMs, err = timeEach(ports, in.add)
	return in, err
}

// pasta on its own: ports are given at start (-t/-u); it has no run-time API.
func startPasta(e *env, s *scope, ports []mapping) (*instance, error) {
	var ns *testenv.Netns
	if err, skipped := s.run(func() error { ns = testenv.ChildNetns(s, e.user); return nil }); err != nil {
		return nil, skipOr(err, skipped)
	}
	pidfile := filepath.Join(e.user.Dir(s), "pasta.pid")
	args := []string{"--config-net", "-q", "-P", pidfile, "-T", "none", "-U", "none"}
	for _, m := range ports {
		flag := "-t"
		if m.proto == "udp" {
			flag = "-u"
		}
		args = append(args, flag, fmt.Sprintf("%s/%d:%d", m.hostIP, m.host, m.child))
	}
	args = append(args, strconv.Itoa(ns.PID))
	cmd := e.user.Cmd("pasta", args...)
	t0 := time.Now()
	// pasta daemonizes once set up: its parent's exit means ready.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := runCtx(ctx, cmd); err != nil {
		return nil, err
	}
	took := time.Since(t0)
	b, err := os.ReadFile(pidfile)
	if err != nil {
		return nil, fmt.Errorf("pasta wrote no pid file %s: %w", pidfile, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("pasta pid file %s: %w", pidfile, err)
	}
	s.Cleanup(func() { killTree(pid); reap([]int{pid}) })
	return &instance{childPID: ns.PID, bindAddr: "0.0.0.0", roots: []int{pid},
		setupMs: float64(took.Microseconds()) / 1000 / float64(len(ports))}, nil
}

// skipOr keeps a Skip (a missing program) distinct from a failure.
func skipOr(err error, skipped bool) error {
	if skipped {
		return skipError{err}
	}
	return err
}

type skipError struct{ error }

func run(cmd *exec.Cmd) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return runCtx(ctx, cmd)
}

// runCtx runs cmd, killing it when ctx ends; errors carry its output.
func runCtx(ctx context.Context, cmd *exec.Cmd) error {
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("%s: %w", strings.Join(cmd.Args, " "), err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, strings.TrimSpace(out.String()))
		}
		return nil
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), ctx.Err(), strings.TrimSpace(out.String()))
	}
}

// timeEach runs add for each mapping and returns the mean time per call in ms.
func timeEach(ports []mapping, add func(mapping) error) (float64, error) {
	t0 := time.Now()
	for _, m := range ports {
		if err := add(m); err != nil {
			return 0, fmt.Errorf("publish %s: %w", m.spec(), err)
		}
	}
	return float64(time.Since(t0).Microseconds()) / 1000 / float64(len(ports)), nil
}

func waitFile(path string, timeout time.Duration, cmd *exec.Cmd, stderr *bytes.Buffer) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if cmd.ProcessState != nil || !alive(cmd.Process.Pid) {
			return fmt.Errorf("%s exited before making %s: %s", cmd.Args[0], path, strings.TrimSpace(stderr.String()))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s made no %s within %v: %s", cmd.Args[0], path, timeout, strings.TrimSpace(stderr.String()))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitStateDir waits for a RootlessKit-style state dir (api.sock, child_pid).
func waitStateDir(dir string, cmd *exec.Cmd, stderr *bytes.Buffer) (int, error) {
	for _, f := range []string{"child_pid", "api.sock"} {
		if err := waitFile(filepath.Join(dir, f), 10*time.Second, cmd, stderr); err != nil {
			return 0, err
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, "child_pid"))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// apiAdd publishes m with POST /v1/ports on a RootlessKit-compatible API socket.
func apiAdd(sock string, m mapping) error {
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}}}
	spec := map[string]any{"proto": m.proto, "parentIP": m.hostIP, "parentPort": m.host, "childPort": m.child}
	if ip := m.childIP(); ip != "" {
		spec["childIP"] = ip
	}
	body, _ := json.Marshal(spec)
	resp, err := hc.Post("http://unix/v1/ports", "application/json", bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("POST /v1/ports on %s: %w", sock, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("POST /v1/ports on %s: %s: %s", sock, resp.Status, bytes.TrimSpace(b))
	}
	return nil
}

// slirpAdd publishes m with slirp4netns's add_hostfwd (one request per connection).
func slirpAdd(sock string, m mapping) error {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	req, _ := json.Marshal(map[string]any{"execute": "add_hostfwd", "arguments": map[string]any{
		"proto": m.proto, "host_addr": m.hostIP, "host_port": m.host, "guest_addr": "10.0.2.100", "guest_port": m.child}})
	if _, err := c.Write(req); err != nil {
		return err
	}
	_ = c.(*net.UnixConn).CloseWrite()
	b, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	var reply struct {
		Error map[string]any `json:"error"`
	}
	if err := json.Unmarshal(b, &reply); err != nil || reply.Error != nil {
		return fmt.Errorf("slirp4netns add_hostfwd %s: %s", m.spec(), bytes.TrimSpace(b))
	}
	return nil
}

// portkitHas reports whether `portkit daemon --help` mentions every word.
func portkitHas(path string, words []string) (bool, string) {
	if path == "" {
		return false, "bin/portkit is not built (cmd/portkit has not landed)"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, path, "daemon", "--help").CombinedOutput()
	for _, w := range words {
		if !bytes.Contains(out, []byte(w)) {
			return false, fmt.Sprintf("`portkit daemon --help` does not mention %s yet", w)
		}
	}
	return true, ""
}
