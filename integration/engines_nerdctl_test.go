package integration

// nerdctl + containerd, rootless, with `portkit run` in RootlessKit's place:
// nerdctl's own extras/rootless/containerd-rootless.sh, unmodified, execs
// `rootlesskit …` and finds portkit under that name (the symlink `make
// install-rootlesskit-compat` makes, first on PATH). nerdctl publishes -p
// through the API socket in the state dir; with --network on our conflist,
// usernet and portdriver run inside the launcher's child namespaces.

import (
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
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport/state"
)

// nerdctlUsernetConflist is the network docs/engines.md gives nerdctl
// users: usernet (slirp4netns) with portdriver (builtin) chained.
const nerdctlUsernetConflist = `{
  "cniVersion": "1.0.0",
  "name": "portkit-usernet",
  "plugins": [
    {"type": "usernet", "backend": "slirp4netns", "mtu": 65520},
    {"type": "portdriver", "driver": "builtin", "capabilities": {"portMappings": true}}
  ]
}
`

// rootlessContainerd is containerd-rootless.sh running under `portkit run`
// as the test user, with a private HOME and XDG_RUNTIME_DIR.
type rootlessContainerd struct {
	u        *testenv.User
	home     string
	runtime  string // XDG_RUNTIME_DIR
	stateDir string // the launcher's state dir (RootlessKit's: $XDG_RUNTIME_DIR/containerd-rootless)
	cniBin   string
	netconf  string
	nerdctl  string
	env      []string
	log      string
	cmd      *exec.Cmd
	exited   chan error
	procs    []state.Process // the launcher and everything below it, once up
}

// startRootlessContainerd sets up and starts containerd-rootless.sh; it is
// stopped at cleanup, and nothing it started may outlive it.
func startRootlessContainerd(t *testing.T) *rootlessContainerd {
	t.Helper()
	testenv.RequireRoot(t)
	nerdctlSrc := engineTool(t, "nerdctl-"+nerdctlVersion, "nerdctl")
	scriptSrc := engineTool(t, "nerdctl-"+nerdctlVersion, "containerd-rootless.sh")
	for _, b := range []string{"containerd", "containerd-shim-runc-v2", "runc", "slirp4netns", "nsenter", "newuidmap", "newgidmap", "iptables", "make"} {
		testenv.RequireBinary(t, b)
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		t.Skip("/usr/lib/cni/bridge is missing: apt-get install containernetworking-plugins (CI does)")
	}
	u := testenv.Unprivileged(t)

	// bin: portkit, the rootlesskit symlink the Makefile makes, nerdctl and
	// the script, all readable by the user.
	base, err := os.MkdirTemp("", "pk-nerdctl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	bin := filepath.Join(base, "bin")
	cniBin := filepath.Join(base, "cni")
	for _, d := range []string{base, bin, cniBin} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	copyExec(t, testenv.Binary(t, "portkit"), filepath.Join(bin, "portkit"))
	copyExec(t, nerdctlSrc, filepath.Join(bin, "nerdctl"))
	copyExec(t, scriptSrc, filepath.Join(bin, "containerd-rootless.sh"))
	out, err := runBounded(t, 30*time.Second, exec.Command("make", "-s", "-C", testenv.ModuleRoot(t),
		"install-rootlesskit-compat", "BINDIR="+bin, "ROOTLESSKIT_COMPAT_DIR="+bin))
	if err != nil {
		t.Fatalf("make install-rootlesskit-compat: %v\n%s", err, out)
	}
	if target, err := os.Readlink(filepath.Join(bin, "rootlesskit")); err != nil || target != filepath.Join(bin, "portkit") {
		t.Fatalf("make install-rootlesskit-compat made %q (%v), want a link to %s", target, err, filepath.Join(bin, "portkit"))
	}
	// CNI plugins: Debian's (nerdctl's default bridge network) and ours.
	ents, err := os.ReadDir("/usr/lib/cni")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if err := os.Symlink(filepath.Join("/usr/lib/cni", e.Name()), filepath.Join(cniBin, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	copyExec(t, testenv.Binary(t, "usernet"), filepath.Join(cniBin, "usernet"))
	copyExec(t, testenv.Binary(t, "portdriver"), filepath.Join(cniBin, "portdriver"))

	rc := &rootlessContainerd{u: u, home: u.Dir(t), runtime: u.Dir(t), cniBin: cniBin, nerdctl: filepath.Join(bin, "nerdctl")}
	rc.stateDir = filepath.Join(rc.runtime, "containerd-rootless")
	rc.netconf = filepath.Join(rc.home, ".config/cni/net.d")
	rc.log = filepath.Join(base, "containerd-rootless.log")
	for name, body := range map[string]string{
		// The CRI plugin is for Kubernetes; rootless nerdctl does not use it.
		".config/containerd/config.toml":                "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
		".config/nerdctl/nerdctl.toml":                  fmt.Sprintf("cni_path = %q\ncni_netconfpath = %q\n", cniBin, rc.netconf),
		".config/cni/net.d/50-portkit-usernet.conflist": nerdctlUsernetConflist,
	} {
		p := filepath.Join(rc.home, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("chown", "-R", strconv.Itoa(u.UID)+":"+strconv.Itoa(u.GID), rc.home).CombinedOutput(); err != nil {
		t.Fatalf("chown %s: %v: %s", rc.home, err, out)
	}
	rc.env = []string{"HOME=" + rc.home, "XDG_RUNTIME_DIR=" + rc.runtime,
		"PATH=" + bin + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

	logf, err := os.Create(rc.log)
	if err != nil {
		t.Fatal(err)
	}
	rc.cmd = rc.command(filepath.Join(bin, "containerd-rootless.sh"))
	rc.cmd.Stdout, rc.cmd.Stderr = logf, logf
	rc.cmd.SysProcAttr.Setpgid = true
	if err := rc.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	rc.exited = make(chan error, 1)
	go func() { rc.exited <- rc.cmd.Wait(); logf.Close() }()
	t.Cleanup(func() { rc.stop(t) })
	alive := func() error {
		select {
		case err := <-rc.exited:
			rc.exited <- err
			return fmt.Errorf("containerd-rootless.sh exited: %v\n%s", err, rc.logTail(30))
		default:
			return nil
		}
	}
	for _, f := range []string{filepath.Join(rc.stateDir, "api.sock"), filepath.Join(rc.stateDir, "child_pid"), filepath.Join(rc.runtime, "containerd/containerd.sock")} {
		if err := waitFile(f, 30*time.Second, alive); err != nil {
			t.Fatal(err)
		}
	}
	if p, err := state.ProcessOf(rc.cmd.Process.Pid); err == nil {
		rc.procs = testenv.Descendants(p)
	}
	return rc
}

// command returns cmd run as the test user with rc's environment.
func (rc *rootlessContainerd) command(name string, args ...string) *exec.Cmd {
	cmd := rc.u.Cmd(name, args...)
	var env []string
	for _, kv := range cmd.Env {
		if !strings.HasPrefix(kv, "PATH=") && !strings.HasPrefix(kv, "HOME=") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, rc.env...)
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	return cmd
}

// run runs nerdctl as the user and returns its output.
func (rc *rootlessContainerd) run(t *testing.T, timeout time.Duration, args ...string) (string, error) {
	t.Helper()
	var stdout strings.Builder
	cmd := rc.command(rc.nerdctl, args...)
	cmd.Stdout = &stdout
	stderr, err := runBounded(t, timeout, cmd)
	if err != nil {
		return strings.TrimSpace(stdout.String() + stderr), err
	}
	return strings.TrimSpace(stdout.String()), nil
}

func (rc *rootlessContainerd) logTail(n int) string {
	data, _ := os.ReadFile(rc.log)
	return tail(string(data), n)
}

// childPID is the launcher's child as child_pid names it.
func (rc *rootlessContainerd) childPID(t *testing.T) int {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(rc.stateDir, "child_pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatalf("child_pid %q: %v", data, err)
	}
	return pid
}

// stop sends SIGTERM to the launcher (as a service manager would) and
// checks that it, containerd, the shims and the network are all gone.
func (rc *rootlessContainerd) stop(t *testing.T) {
	t.Helper()
	if p, err := state.ProcessOf(rc.cmd.Process.Pid); err == nil {
		rc.procs = append(rc.procs, testenv.Descendants(p)...)
	}
	_ = rc.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-rc.exited:
	case <-time.After(20 * time.Second):
		t.Errorf("containerd-rootless.sh under portkit run did not exit within 20s of SIGTERM:\n%s", rc.logTail(20))
		_ = syscall.Kill(-rc.cmd.Process.Pid, syscall.SIGKILL)
		<-rc.exited
	}
	testenv.WaitGone(t, rc.procs, 10*time.Second)
	if _, err := os.Stat(filepath.Join(rc.stateDir, "api.sock")); err == nil {
		t.Errorf("%s/api.sock is left after the launcher exited", rc.stateDir)
	}
	if t.Failed() {
		t.Logf("containerd-rootless.sh log (tail):\n%s", rc.logTail(40))
	}
}

// apiInfo fetches /v1/info from the launcher's API socket.
func (rc *rootlessContainerd) apiInfo(t *testing.T) map[string]any {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(rc.stateDir, "api.sock"))
		}}}
	resp, err := c.Get("http://rootlesskit/v1/info")
	if err != nil {
		t.Fatalf("GET /v1/info: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var info map[string]any
	if err := json.Unmarshal(body, &info); err != nil {
		t.Fatalf("/v1/info: %v: %s", err, body)
	}
	return info
}

// apiPorts lists the launcher's published ports (rootlessctl's list-ports).
func (rc *rootlessContainerd) apiPorts(t *testing.T) string {
	t.Helper()
	cmd := rc.command(filepath.Join(filepath.Dir(rc.nerdctl), "portkit"), "--socket", filepath.Join(rc.stateDir, "api.sock"), "list-ports")
	var stdout strings.Builder
	cmd.Stdout = &stdout
	if out, err := runBounded(t, 10*time.Second, cmd); err != nil {
		t.Fatalf("portkit list-ports: %v: %s", err, out)
	}
	return stdout.String()
}

// cniRecordDirs are where usernet and portdriver, running as root of the
// launcher's user namespace, keep their records: /run/portkit/cni in the
// child's mount namespace, or $XDG_RUNTIME_DIR/portkit/cni when the child's
// /run/portkit is the parent's (a copy-up symlink).
func (rc *rootlessContainerd) cniRecordDirs(t *testing.T) []string {
	return []string{
		fmt.Sprintf("/proc/%d/root/run/portkit/cni", rc.childPID(t)),
		filepath.Join(rc.runtime, "portkit/cni"),
	}
}

// cniRecords lists the entries in cniRecordDirs.
func (rc *rootlessContainerd) cniRecords(t *testing.T) []string {
	var out []string
	for _, d := range rc.cniRecordDirs(t) {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			out = append(out, filepath.Join(d, e.Name()))
		}
	}
	return out
}

func copyExec(t *testing.T, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, data, 0o755); err != nil {
		t.Fatal(err)
	}
}

// TestNerdctlRootlessUnderPortkitRun: containerd-rootless.sh under `portkit
// run` (as rootlesskit); nerdctl run -p 8080:80 publishes busybox httpd's
// page on 127.0.0.1:8080 through the builtin driver, first on nerdctl's
// default bridge network, then on our usernet+portdriver conflist; nerdctl
// rm -f takes the port away and leaves no process of ours.
func TestNerdctlRootlessUnderPortkitRun(t *testing.T) {
	const hostPort = 8080
	requirePortsFree(t, []int{hostPort}, nil)
	st := newStepTimer(t)
	before := pidSet()
	rc := startRootlessContainerd(t)
	st.step("containerd-rootless.sh under portkit run")

	// What nerdctl reads from /v1/info: both objects (it dereferences them
	// without nil checks), networkDriver.childIP, and
	// portDriver.disallowLoopbackChildIP (omitempty in RootlessKit: absent
	// means false).
	info := rc.apiInfo(t)
	nd, _ := info["networkDriver"].(map[string]any)
	pd, _ := info["portDriver"].(map[string]any)
	if nd == nil || pd == nil {
		t.Fatalf("/v1/info lacks networkDriver or portDriver: %v", info)
	}
	if ip, _ := nd["childIP"].(string); net.ParseIP(ip) == nil {
		t.Errorf("/v1/info networkDriver.childIP = %v, want the child's address", nd["childIP"])
	}
	if v, ok := pd["disallowLoopbackChildIP"]; ok {
		if _, isBool := v.(bool); !isBool {
			t.Errorf("/v1/info portDriver.disallowLoopbackChildIP = %v, want a bool", v)
		}
	}
	t.Logf("/v1/info: %v", info)

	img := filepath.Join(rc.home, "image.tar")
	buildEngineImage(t, img)
	if err := os.Chown(img, rc.u.UID, rc.u.GID); err != nil {
		t.Fatal(err)
	}
	if out, err := rc.run(t, 60*time.Second, "load", "-i", img); err != nil {
		t.Fatalf("nerdctl load: %v\n%s", err, out)
	}
	st.step("nerdctl load")

	addr := fmt.Sprintf("127.0.0.1:%d", hostPort)
	for _, network := range []string{"", "portkit-usernet"} {
		name := "web"
		args := []string{"run", "-d", "--name", name, "-p", fmt.Sprintf("%d:80", hostPort)}
		if network != "" {
			name = "web-usernet"
			args = []string{"run", "-d", "--name", name, "--network", network, "-p", fmt.Sprintf("%d:80", hostPort)}
		}
		label := "default network"
		if network != "" {
			label = "--network " + network
		}
		args = append(args, engineImageRef, "httpd", "-f", "-p", "80", "-h", "/www")
		if out, err := rc.run(t, 90*time.Second, args...); err != nil {
			t.Fatalf("nerdctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		st.step("nerdctl run -d -p 8080:80 (" + label + ")")
		body, err := httpGetRetry(addr, "/", 15*time.Second)
		if err != nil || body != enginePage {
			t.Fatalf("%s: GET http://%s/: %q, %v", label, addr, body, err)
		}
		ports := rc.apiPorts(t)
		if !strings.Contains(ports, strconv.Itoa(hostPort)) {
			t.Errorf("%s: list-ports does not show %d:\n%s", label, hostPort, ports)
		}
		t.Logf("%s: what nerdctl published through the API:\n%s", label, ports)
		st.step("page on " + addr)
		var ours []state.Process
		if network != "" {
			// The plugins ran and keep a record while the container lives.
			if recs := rc.cniRecords(t); len(recs) == 0 {
				t.Errorf("%s: no usernet/portdriver record while the container runs (looked in %v)", label, rc.cniRecordDirs(t))
			}
			if ours = pluginProcesses(rc.cniBin); len(ours) == 0 {
				t.Errorf("%s: no usernet/portdriver process runs for the container", label)
			}
		}

		if out, err := rc.run(t, 60*time.Second, "rm", "-f", name); err != nil {
			t.Fatalf("nerdctl rm -f %s: %v\n%s", name, err, out)
		}
		st.step("nerdctl rm -f (" + label + ")")
		if err := waitClosed(addr, 5*time.Second); err != nil {
			t.Errorf("%s: after nerdctl rm -f: %v", label, err)
		}
		if l := listening("tcp", hostPort); len(l) > 0 {
			t.Errorf("%s: after nerdctl rm -f, port %d is still bound: %v", label, hostPort, l)
		}
		if ports := rc.apiPorts(t); strings.Contains(ports, strconv.Itoa(hostPort)) {
			t.Errorf("%s: after nerdctl rm -f, list-ports still shows %d:\n%s", label, hostPort, ports)
		}
		// usernet's and portdriver's forwarders run from cniBin, slirp4netns below them.
		testenv.WaitGone(t, ours, 5*time.Second)
		waitNoProcesses(t, 5*time.Second, before, rc.cniBin)
		if recs := rc.cniRecords(t); len(recs) > 0 {
			t.Errorf("%s: after nerdctl rm -f, CNI records are left: %v", label, recs)
		}
	}
}
