package integration

// Podman 4.3 (Debian), rootless, CNI backend, with usernet as the network.
// Podman runs CNI plugins as uid 0 of its user namespace inside its own
// "rootless-netns", and publishes -p itself (rootlessport listens on the
// host), so the network is usernet alone: a chained portdriver's listener
// would land in rootless-netns, out of the host's reach.

import (
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
)

// podmanUsernetConflist is the network docs/engines.md gives Podman users.
const podmanUsernetConflist = `{
  "cniVersion": "1.0.0",
  "name": "usernet-net",
  "plugins": [
    {"type": "usernet", "backend": "slirp4netns"}
  ]
}
`

// podmanContainersConf is ~/.config/containers/containers.conf as tested.
// runc: crun refuses this machine's hybrid cgroups; cgroupfs and the file
// events logger: there is no systemd.
const podmanContainersConf = `[network]
network_backend = "cni"
cni_plugin_dirs = ["@CNIBIN@"]
network_config_dir = "@NETCONF@"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
`

// rootlessPodman is Podman as the test user with a private HOME and
// XDG_RUNTIME_DIR (so its storage, pause process and rootless-netns are
// the test's own).
type rootlessPodman struct {
	u       *testenv.User
	home    string
	runtime string
	cniBin  string
	env     []string
}

func newRootlessPodman(t *testing.T) *rootlessPodman {
	t.Helper()
	testenv.RequireRoot(t)
	for _, b := range []string{"podman", "conmon", "runc", "slirp4netns", "newuidmap", "newgidmap"} {
		testenv.RequireBinary(t, b)
	}
	u := testenv.Unprivileged(t)
	base, err := os.MkdirTemp("", "pk-podman-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	p := &rootlessPodman{u: u, home: u.Dir(t), runtime: u.Dir(t), cniBin: filepath.Join(base, "cni")}
	for _, d := range []string{base, p.cniBin} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	copyExec(t, testenv.Binary(t, "usernet"), filepath.Join(p.cniBin, "usernet"))
	netconf := filepath.Join(p.home, ".config/cni/net.d")
	conf := strings.NewReplacer("@CNIBIN@", p.cniBin, "@NETCONF@", netconf).Replace(podmanContainersConf)
	for name, body := range map[string]string{
		".config/containers/containers.conf":     conf,
		".config/cni/net.d/usernet-net.conflist": podmanUsernetConflist,
	} {
		path := filepath.Join(p.home, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("chown", "-R", strconv.Itoa(u.UID)+":"+strconv.Itoa(u.GID), p.home).CombinedOutput(); err != nil {
		t.Fatalf("chown %s: %v: %s", p.home, err, out)
	}
	p.env = []string{"HOME=" + p.home, "XDG_RUNTIME_DIR=" + p.runtime}
	// Podman leaves its pause process (holding its user namespace) and, while
	// containers use CNI networks, rootless-netns running after each command:
	// kill whatever runs with our XDG_RUNTIME_DIR once the test is done.
	t.Cleanup(func() {
		_, _ = p.run(t, 60*time.Second, "rm", "--all", "--force", "--time", "0")
		p.killLeftovers(t)
	})
	return p
}

func (p *rootlessPodman) run(t *testing.T, timeout time.Duration, args ...string) (string, error) {
	t.Helper()
	cmd := p.u.Cmd("podman", args...)
	var env []string
	for _, kv := range cmd.Env {
		if !strings.HasPrefix(kv, "HOME=") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, p.env...)
	var stdout strings.Builder
	cmd.Stdout = &stdout
	stderr, err := runBounded(t, timeout, cmd)
	if err != nil {
		return strings.TrimSpace(stdout.String() + stderr), err
	}
	return strings.TrimSpace(stdout.String()), nil
}

// processesWithRuntime lists processes whose environment names our
// XDG_RUNTIME_DIR: Podman's pause process, conmon, rootless-netns.
func (p *rootlessPodman) processesWithRuntime() []int {
	var out []int
	want := []byte("XDG_RUNTIME_DIR=" + p.runtime + "\x00")
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		env, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err == nil && strings.Contains(string(env), string(want)) {
			out = append(out, pid)
		}
	}
	return out
}

func (p *rootlessPodman) killLeftovers(t *testing.T) {
	for _, pid := range p.processesWithRuntime() {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(p.processesWithRuntime()) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
}

// findCNIRecords lists usernet's records (portkit/cni/*) anywhere under
// roots: Podman's rootless-netns gives the plugins a /run of its own under
// XDG_RUNTIME_DIR.
func findCNIRecords(roots ...string) []string {
	var out []string
	for _, root := range roots {
		_ = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			if d.IsDir() && d.Name() == "storage" && strings.Contains(path, "containers") {
				return filepath.SkipDir // image layers
			}
			if d.IsDir() && d.Name() == "cni" && filepath.Base(filepath.Dir(path)) == "portkit" {
				ents, _ := os.ReadDir(path)
				for _, e := range ents {
					out = append(out, filepath.Join(path, e.Name()))
				}
				return filepath.SkipDir
			}
			return nil
		})
	}
	return out
}

// TestPodmanRootlessWithUsernet: podman run --network usernet-net -p
// 8081:80 as the test user (runc) serves busybox httpd's page on the host;
// podman rm -f leaves no process, record or port of ours.
func TestPodmanRootlessWithUsernet(t *testing.T) {
	const hostPort = 8081
	requirePortsFree(t, []int{hostPort}, nil)
	st := newStepTimer(t)
	p := newRootlessPodman(t)
	img := filepath.Join(p.home, "image.tar")
	buildEngineImage(t, img)
	if err := os.Chown(img, p.u.UID, p.u.GID); err != nil {
		t.Fatal(err)
	}
	if out, err := p.run(t, 90*time.Second, "load", "-i", img); err != nil {
		t.Fatalf("podman load: %v\n%s", err, out)
	}
	st.step("podman load")
	if out, err := p.run(t, 30*time.Second, "network", "inspect", "usernet-net"); err != nil {
		t.Fatalf("podman network inspect usernet-net: %v\n%s", err, out)
	}

	args := []string{"run", "-d", "--name", "web", "--network", "usernet-net", "-p", fmt.Sprintf("%d:80", hostPort),
		engineImageRef, "httpd", "-f", "-p", "80", "-h", "/www"}
	if out, err := p.run(t, 90*time.Second, args...); err != nil {
		t.Fatalf("podman %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	st.step("podman run -d --network usernet-net -p 8081:80")
	addr := fmt.Sprintf("127.0.0.1:%d", hostPort)
	body, err := httpGetRetry(addr, "/", 15*time.Second)
	if err != nil || body != enginePage {
		t.Fatalf("GET http://%s/: %q, %v", addr, body, err)
	}
	st.step("page on " + addr)

	// usernet's forwarder and slirp4netns for the container, while it runs.
	ours := pluginProcesses(p.cniBin)
	if len(ours) == 0 {
		t.Errorf("no usernet process runs for the container: did Podman use usernet-net?")
	}
	recs := findCNIRecords(p.runtime, p.home)
	if len(recs) == 0 {
		t.Errorf("no usernet record under %s or %s while the container runs", p.runtime, p.home)
	}
	t.Logf("usernet: %d processes, records %v", len(ours), recs)

	// --time 0: httpd as PID 1 ignores SIGTERM, and Podman would wait its
	// default 10 s before SIGKILL.
	if out, err := p.run(t, 60*time.Second, "rm", "-f", "--time", "0", "web"); err != nil {
		t.Fatalf("podman rm -f: %v\n%s", err, out)
	}
	st.step("podman rm -f --time 0")
	testenv.WaitGone(t, ours, 5*time.Second)
	if left := findCNIRecords(p.runtime, p.home); len(left) > 0 {
		t.Errorf("usernet records left after podman rm -f: %v", left)
	}
	if err := waitClosed(addr, 5*time.Second); err != nil {
		t.Errorf("after podman rm -f: %v", err)
	}
}
