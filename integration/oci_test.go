package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
)

// ociRuntime is how a test runs one OCI runtime as the unprivileged user.
type ociRuntime struct {
	name string
	// command wraps a runtime invocation: crun 1.8 refuses hybrid cgroups
	// and runs only inside a private mount namespace with cgroup2 mounted.
	command func(u *testenv.User, root string, args ...string) *exec.Cmd
}

var ociRuntimes = []ociRuntime{
	{name: "runc", command: func(u *testenv.User, root string, args ...string) *exec.Cmd {
		return u.Cmd("runc", append([]string{"--root", root}, args...)...)
	}},
	{name: "crun", command: func(u *testenv.User, root string, args ...string) *exec.Cmd {
		inner := "crun --root " + shellQuote(root) + " " + shellJoin(args)
		script := "mount -t cgroup2 none /sys/fs/cgroup && exec setpriv --reuid=" + fmt.Sprint(u.UID) +
			" --regid=" + fmt.Sprint(u.GID) + " --clear-groups " + inner
		cmd := exec.Command("unshare", "-m", "sh", "-c", script)
		cmd.Env = u.Env()
		return cmd
	}},
}

// runtimeTimeout bounds one runtime command (run, exec, kill, delete).
const runtimeTimeout = 60 * time.Second

// ociBundle is a runc/crun bundle owned by the test user, with
// portkit-oci-hook wired in as createRuntime and poststop hooks.
type ociBundle struct {
	dir, root, id string
	hookStderr    string // crun: where the hooks' stderr goes
	user          *testenv.User
	rt            ociRuntime
}

func newOCIBundle(t *testing.T, rt ociRuntime, u *testenv.User, annotations map[string]string, args ...string) *ociBundle {
	t.Helper()
	testenv.RequireBinary(t, rt.name)
	base := u.Dir(t)
	b := &ociBundle{dir: filepath.Join(base, "bundle"), root: filepath.Join(base, "state"), user: u, rt: rt,
		id: fmt.Sprintf("pk%d", time.Now().UnixNano()%1e9)}
	for _, d := range []string{b.dir, b.root} {
		if out, err := u.Cmd("mkdir", "-p", d).CombinedOutput(); err != nil {
			t.Fatalf("mkdir %s: %v: %s", d, err, out)
		}
	}
	testenv.BusyboxRootfs(t, filepath.Join(b.dir, "rootfs"), u)
	spec := exec.Command("runc", "spec", "--rootless")
	spec.Dir = b.dir
	if out, err := spec.CombinedOutput(); err != nil {
		t.Fatalf("runc spec --rootless: %v: %s", err, out)
	}
	path := filepath.Join(b.dir, "config.json")
	var cfg map[string]any
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		t.Fatal(err)
	}
	process := cfg["process"].(map[string]any)
	process["terminal"] = false
	process["args"] = args
	linux := cfg["linux"].(map[string]any)
	linux["namespaces"] = append(linux["namespaces"].([]any), map[string]any{"type": "network"})
	// runc spec ran as root; map the test user instead.
	for _, key := range []string{"uidMappings", "gidMappings"} {
		id := u.UID
		if key == "gidMappings" {
			id = u.GID
		}
		linux[key] = []any{map[string]any{"containerID": 0, "hostID": id, "size": 1}}
	}
	bindir := filepath.Dir(testenv.Binary(t, "portkit-oci-hook"))
	cfg["hooks"] = engineHooks(t, bindir, annotations, []string{"PATH=" + os.Getenv("PATH")})
	if rt.name == "crun" {
		// crun shows a hook's stderr only where this annotation points.
		b.hookStderr = filepath.Join(base, "hook.stderr")
		annotations["run.oci.hooks.stderr"] = b.hookStderr
	}
	cfg["annotations"] = annotations
	data, err = json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, u.UID, u.GID); err != nil {
		t.Fatal(err)
	}
	return b
}

// engineHooks does what Podman and CRI-O do with an oci-hooks directory,
// using the hooks.d files `make install` installs: each file whose "when"
// matches the bundle's annotations adds its hook to each of its stages,
// with @BINDIR@ resolved as make install resolves it. env is added to
// every hook (runc gives a hook no other environment).
func engineHooks(t *testing.T, bindir string, annotations map[string]string, env []string) map[string][]map[string]any {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(testenv.ModuleRoot(t), "hooks/portkit-oci-hook/hooks.d/*.json"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no hooks.d files in hooks/portkit-oci-hook/hooks.d (%v)", err)
	}
	sort.Strings(files) // engines apply them in file name order
	hooks := map[string][]map[string]any{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var h struct {
			Version string `json:"version"`
			Hook    struct {
				Path string   `json:"path"`
				Args []string `json:"args"`
				Env  []string `json:"env"`
			} `json:"hook"`
			When struct {
				Annotations map[string]string `json:"annotations"`
			} `json:"when"`
			Stages []string `json:"stages"`
		}
		if err := json.Unmarshal([]byte(strings.ReplaceAll(string(data), "@BINDIR@", bindir)), &h); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if h.Version != "1.0.0" || len(h.Stages) == 0 || len(h.When.Annotations) == 0 {
			t.Fatalf("%s: want an oci-hooks 1.0.0 file with stages and an annotations condition", f)
		}
		matched := false
		for keyRE, valueRE := range h.When.Annotations {
			kr, vr := regexp.MustCompile(keyRE), regexp.MustCompile(valueRE)
			for k, v := range annotations {
				if kr.MatchString(k) && vr.MatchString(v) {
					matched = true
				}
			}
		}
		if !matched {
			continue
		}
		for _, stage := range h.Stages {
			hooks[stage] = append(hooks[stage], map[string]any{
				"path": h.Hook.Path,
				"args": h.Hook.Args,
				"env":  append(append([]string{}, h.Hook.Env...), env...),
			})
		}
	}
	return hooks
}

// run runs the runtime with args in the bundle directory and returns its output.
func (b *ociBundle) run(args ...string) (string, error) {
	cmd := b.rt.command(b.user, b.root, args...)
	cmd.Dir = b.dir
	log, err := os.CreateTemp("", "oci-out-")
	if err != nil {
		return "", err
	}
	defer os.Remove(log.Name())
	defer log.Close()
	// A detached container keeps its stdio: give it a file, not a pipe we
	// would wait on for EOF.
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return "", err
	}
	// Bounded: a runtime stuck on a hook or an exec'd command must not
	// hang the test binary.
	timer := time.AfterFunc(runtimeTimeout, func() { _ = cmd.Process.Kill() })
	err = cmd.Wait()
	if !timer.Stop() {
		err = fmt.Errorf("%s %s: killed after %v: %w", b.rt.name, strings.Join(args, " "), runtimeTimeout, err)
	}
	out, _ := os.ReadFile(log.Name())
	if err != nil && b.hookStderr != "" {
		hook, _ := os.ReadFile(b.hookStderr)
		out = append(out, hook...)
	}
	// runc quotes a hook's stderr logfmt-style.
	return strings.ReplaceAll(string(out), `\"`, `"`), err
}

// start runs the container detached and deletes it at cleanup.
func (b *ociBundle) start(t *testing.T) {
	t.Helper()
	if out, err := b.run("run", "-d", b.id); err != nil {
		t.Fatalf("%s run -d: %v\n%s", b.rt.name, err, out)
	}
	t.Cleanup(func() { _, _ = b.run("delete", "--force", b.id) })
}

// stop kills and deletes the container, which runs the poststop hook.
func (b *ociBundle) stop(t *testing.T) {
	t.Helper()
	if out, err := b.run("kill", b.id, "KILL"); err != nil {
		t.Fatalf("%s kill: %v\n%s", b.rt.name, err, out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _ := b.run("state", b.id)
		if strings.Contains(out, `"stopped"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: container did not stop: %s", b.rt.name, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if out, err := b.run("delete", b.id); err != nil {
		t.Fatalf("%s delete: %v\n%s", b.rt.name, err, out)
	}
}

// askTCP sends one line to addr and returns echod's reply: "CLIENT LINE".
func askTCP(addr, line string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintln(c, line); err != nil {
		return "", err
	}
	reply, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(reply), err
}

// askUDP sends one datagram to addr and returns echod's reply, retrying
// while the forwarder's first flow is set up.
func askUDP(addr, payload string) (string, error) {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	buf := make([]byte, 2048)
	var lastErr error
	for i := 0; i < 10; i++ {
		if _, err := c.Write([]byte(payload)); err != nil {
			return "", err
		}
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		n, err := c.Read(buf)
		if err == nil {
			return string(buf[:n]), nil
		}
		lastErr = err
	}
	return "", lastErr
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func shellJoin(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = shellQuote(a)
	}
	return strings.Join(q, " ")
}

// setHookEnv adds env entries to every hook in the bundle's config.
func (b *ociBundle) setHookEnv(t *testing.T, env ...string) {
	t.Helper()
	b.editConfig(t, func(cfg map[string]any) {
		for _, stage := range cfg["hooks"].(map[string]any) {
			for _, h := range stage.([]any) {
				hook := h.(map[string]any)
				for _, e := range env {
					hook["env"] = append(hook["env"].([]any), e)
				}
			}
		}
	})
}

// editConfig rewrites the bundle's config.json through edit.
func (b *ociBundle) editConfig(t *testing.T, edit func(cfg map[string]any)) {
	t.Helper()
	path := filepath.Join(b.dir, "config.json")
	var cfg map[string]any
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		t.Fatal(err)
	}
	edit(cfg)
	data, err = json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// runFails runs the container, expects the runtime to refuse it with an
// error containing each of want, and checks that nothing of portkit's is
// left: no state under xdg, no process naming the container's state dir.
func (b *ociBundle) runFails(t *testing.T, xdg string, want ...string) {
	t.Helper()
	out, err := b.run("run", "-d", b.id)
	t.Cleanup(func() { _, _ = b.run("delete", "--force", b.id) })
	if err == nil {
		t.Fatalf("%s run succeeded; want it refused; output:\n%s", b.rt.name, out)
	}
	t.Logf("%s run refused it:\n%s", b.rt.name, out)
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("%s run error does not say %q:\n%s", b.rt.name, w, out)
		}
	}
	stateDir := filepath.Join(xdg, "portkit", "oci", b.id)
	deadline := time.Now().Add(5 * time.Second)
	for {
		left := testenv.ProcessesMentioning(stateDir)
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("processes left behind: %s", strings.Join(left, "; "))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if entries, _ := os.ReadDir(filepath.Join(xdg, "portkit", "oci")); len(entries) != 0 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("state left behind in %s: %v", filepath.Join(xdg, "portkit", "oci"), names)
	}
}

// defaultGateway reads the container's default route from inside it.
func (b *ociBundle) defaultGateway(t *testing.T) string {
	t.Helper()
	out, err := b.run("exec", b.id, "ip", "route")
	if err != nil {
		t.Fatalf("ip route in the container: %v: %s", err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == "default" && f[1] == "via" {
			return f[2]
		}
	}
	t.Fatalf("no default route in the container:\n%s", out)
	return ""
}

// askTCPRetry is askTCP repeated until it succeeds or timeout passes: the
// server in a just-started container may not listen yet.
func askTCPRetry(addr, line string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		reply, err := askTCP(addr, line)
		if err == nil || time.Now().After(deadline) {
			return reply, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}
