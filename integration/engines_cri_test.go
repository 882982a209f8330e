package integration

// The Kubernetes path: kubelet → containerd's CRI → a conflist with a
// bridge network from Debian's containernetworking-plugins and portdriver
// (builtin) chained as the portMappings plugin. crictl stands in for the
// kubelet. The containerd here is the test's own (root, state and socket in
// a temp dir), configured as docs/engines.md shows.

import (
	"fmt"
	"net"
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

// criImage is the one image the CRI test uses: its default command is
// the sandbox's (a pause stand-in); the workload container runs echod.
const criImage = engineImageRef

// criConflist is the network the CRI plugin loads (docs/engines.md shows
// it with /var/lib/cni/networks as host-local's dataDir).
const criConflist = `{
  "cniVersion": "1.0.0",
  "name": "portkit-cri",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "pkcri0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.213.17.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "@IPAMDIR@"
      }
    },
    {
      "type": "portdriver",
      "driver": "builtin",
      "capabilities": {"portMappings": true}
    }
  ]
}
`

// criContainerdConfig is containerd 1.6's config for the CRI test.
// restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, and without it
// every sandbox fails with "can't get final child's PID from pipe".
const criContainerdConfig = `version = 2
root = "@DIR@/root"
state = "@DIR@/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "@DIR@/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "@DIR@/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "@IMAGE@"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "@DIR@/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "@BINDIR@"
    conf_dir = "@CONFDIR@"
    max_conf_num = 1
`

// criEnv is one running containerd with the CRI plugin and our conflist.
type criEnv struct {
	dir          string // containerd's root, state and socket live here
	sock         string
	binDir       string // CNI plugins: bridge, host-local, loopback, portdriver
	crictl       string
	crictlConfig string
	log          string
}

// startCRI starts containerd and imports the test image; everything it
// made is removed at cleanup (pods first, then containerd and its shims).
func startCRI(t *testing.T) *criEnv {
	t.Helper()
	testenv.RequireRoot(t)
	crictl := engineTool(t, "crictl-"+crictlVersion, "crictl")
	containerd := testenv.RequireBinary(t, "containerd")
	ctr := testenv.RequireBinary(t, "ctr")
	testenv.RequireBinary(t, "runc")
	testenv.RequireBinary(t, "containerd-shim-runc-v2")
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if _, err := os.Stat("/usr/lib/cni/" + p); err != nil {
			t.Skipf("/usr/lib/cni/%s is missing: apt-get install containernetworking-plugins (CI does)", p)
		}
	}
	// The bridge the conflist names outlives every pod (the bridge plugin
	// never deletes it); containerd's shims keep their sockets in
	// /run/containerd/s whatever the config says.
	_, hadRunContainerd := os.Stat("/run/containerd")
	t.Cleanup(func() {
		_ = exec.Command("ip", "link", "del", "pkcri0").Run()
		if hadRunContainerd != nil {
			_ = os.Remove("/run/containerd/s")
			_ = os.Remove("/run/containerd")
		}
	})
	// Not t.TempDir: containerd's socket path must stay under 108 bytes.
	dir, err := os.MkdirTemp("", "pk-cri-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &criEnv{dir: dir, sock: filepath.Join(dir, "containerd.sock"), binDir: filepath.Join(dir, "cni-bin"), crictl: crictl, log: filepath.Join(dir, "containerd.log")}
	confDir := filepath.Join(dir, "net.d")
	for _, d := range []string{e.binDir, confDir, filepath.Join(dir, "ipam"), filepath.Join(dir, "logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		if err := os.Symlink("/usr/lib/cni/"+p, filepath.Join(e.binDir, p)); err != nil {
			t.Fatal(err)
		}
	}
	// A copy, not a link: the processes portdriver leaves running are then
	// recognisable by their executable.
	data, err := os.ReadFile(testenv.Binary(t, "portdriver"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.binDir, "portdriver"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	conf := strings.ReplaceAll(criConflist, "@IPAMDIR@", filepath.Join(dir, "ipam"))
	if err := os.WriteFile(filepath.Join(confDir, "10-portkit.conflist"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	// crictl reads /etc/crictl.yaml unless told otherwise; ours says
	// nothing the flags do not, and keeps crictl from warning about it.
	e.crictlConfig = filepath.Join(dir, "crictl.yaml")
	if err := os.WriteFile(e.crictlConfig, []byte("runtime-endpoint: unix://"+e.sock+"\nimage-endpoint: unix://"+e.sock+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := strings.NewReplacer("@DIR@", dir, "@IMAGE@", criImage, "@BINDIR@", e.binDir, "@CONFDIR@", confDir).Replace(criContainerdConfig)
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}

	logf, err := os.Create(e.log)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(containerd, "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); logf.Close() }()
	t.Cleanup(func() {
		// Pods first, so CNI DEL runs while containerd can still send it.
		if out, err := e.run(t, 60*time.Second, "rmp", "--force", "--all"); err != nil {
			t.Logf("crictl rmp --all: %v: %s", err, out)
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		// Shims outlive containerd by design; ours name our socket.
		for _, p := range processesOf(nil, e.sock) {
			pid, _ := strconv.Atoi(strings.Fields(p)[0])
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if t.Failed() {
			if log, err := os.ReadFile(e.log); err == nil {
				t.Logf("containerd log (tail):\n%s", tail(string(log), 40))
			}
		}
	})
	alive := func() error {
		select {
		case err := <-exited:
			exited <- err
			log, _ := os.ReadFile(e.log)
			return fmt.Errorf("containerd exited: %v\n%s", err, tail(string(log), 30))
		default:
			return nil
		}
	}
	if err := waitFile(e.sock, 30*time.Second, alive); err != nil {
		t.Fatal(err)
	}

	img := filepath.Join(dir, "image.tar")
	buildEngineImage(t, img)
	if out, err := runBounded(t, 60*time.Second, exec.Command(ctr, "--address", e.sock, "--namespace", "k8s.io",
		"images", "import", "--snapshotter", "native", img)); err != nil {
		t.Fatalf("ctr images import %s: %v\n%s", img, err, out)
	}
	// The CRI plugin must see the image before a sandbox can use it.
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := e.run(t, 20*time.Second, "inspecti", criImage)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("CRI does not see %s: %v\n%s", criImage, err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return e
}

// run runs crictl against e's containerd and returns its standard output,
// or on failure its error output.
func (e *criEnv) run(t *testing.T, timeout time.Duration, args ...string) (string, error) {
	t.Helper()
	ep := "unix://" + e.sock
	full := append([]string{"--config", e.crictlConfig, "--runtime-endpoint", ep, "--image-endpoint", ep, "--timeout", "60s"}, args...)
	cmd := exec.Command(e.crictl, full...)
	var stdout strings.Builder
	cmd.Stdout = &stdout
	stderr, err := runBounded(t, timeout, cmd)
	if err != nil {
		return strings.TrimSpace(stdout.String() + stderr), err
	}
	return strings.TrimSpace(stdout.String()), nil
}

// writeJSON writes v as JSON into dir/name and returns the path.
func writeJSON(t *testing.T, dir, name string, v any) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, mustJSON(t, v), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// criPodConfig is a CRI PodSandboxConfig as crictl reads it (protobuf field
// names; protocol is the enum: 0 TCP, 1 UDP, 2 SCTP).
func criPodConfig(name, logDir string, mappings ...map[string]any) map[string]any {
	return map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "portkit", "uid": name + "-uid", "attempt": 0},
		"log_directory": logDir,
		"port_mappings": mappings,
		"linux":         map[string]any{},
	}
}

func portMapping(proto, containerPort, hostPort int, hostIP string) map[string]any {
	m := map[string]any{"protocol": proto, "container_port": containerPort, "host_port": hostPort}
	if hostIP != "" {
		m["host_ip"] = hostIP
	}
	return m
}

const (
	criTCP  = 0
	criUDP  = 1
	criSCTP = 2
)

// TestKubernetesHostPortThroughContainerdCRI: a pod with hostPort 18080/tcp,
// 15353/udp and a 127.0.0.1-only 18081/tcp, run by containerd's CRI (crictl
// in the kubelet's place) on a bridge network with portdriver chained,
// reached from the host and from a peer (whose address the pod sees);
// stopp and rmp (the second DEL, with an empty CNI_NETNS) leave no port,
// process or state of ours.
func TestKubernetesHostPortThroughContainerdCRI(t *testing.T) {
	const tcpPort, udpPort, loopPort = 18080, 15353, 18081
	requirePortsFree(t, []int{tcpPort, loopPort}, []int{udpPort})
	st := newStepTimer(t)
	before := pidSet()
	snap := snapshotState(rootUser)
	e := startCRI(t)
	st.step("containerd started, image imported")

	logDir := filepath.Join(e.dir, "logs")
	pod := writeJSON(t, e.dir, "pod.json", criPodConfig("pk-hostport", logDir,
		portMapping(criTCP, 80, tcpPort, ""),
		portMapping(criUDP, 53, udpPort, ""),
		portMapping(criTCP, 80, loopPort, "127.0.0.1"),
	))
	ctrCfg := writeJSON(t, e.dir, "echod.json", map[string]any{
		"metadata": map[string]any{"name": "echod"},
		"image":    map[string]any{"image": criImage},
		"command":  []string{"/echod", "-tcp", ":80", "-udp", ":53"},
		"log_path": "echod.log",
		"linux":    map[string]any{},
	})
	podID, err := e.run(t, 90*time.Second, "runp", pod)
	if err != nil {
		t.Fatalf("crictl runp: %v\n%s", err, podID)
	}
	st.step("crictl runp (bridge + portdriver ADD)")
	ctrID, err := e.run(t, 60*time.Second, "create", podID, ctrCfg, pod)
	if err != nil {
		t.Fatalf("crictl create: %v\n%s", err, ctrID)
	}
	if out, err := e.run(t, 60*time.Second, "start", ctrID); err != nil {
		t.Fatalf("crictl start: %v\n%s", err, out)
	}
	st.step("crictl create + start echod")
	reply, err := askTCPRetry(fmt.Sprintf("127.0.0.1:%d", tcpPort), "hello-tcp", 10*time.Second)
	if err != nil || !strings.HasSuffix(reply, " hello-tcp") {
		t.Fatalf("TCP through hostPort %d: %q, %v", tcpPort, reply, err)
	}
	t.Logf("TCP 127.0.0.1:%d -> pod: %s", tcpPort, reply)
	reply, err = askUDP(fmt.Sprintf("127.0.0.1:%d", udpPort), "hello-udp")
	if err != nil || !strings.HasSuffix(reply, " hello-udp") {
		t.Fatalf("UDP through hostPort %d: %q, %v", udpPort, reply, err)
	}
	t.Logf("UDP 127.0.0.1:%d -> pod: %s", udpPort, reply)
	reply, err = askTCP(fmt.Sprintf("127.0.0.1:%d", loopPort), "hello-hostip")
	if err != nil || !strings.HasSuffix(reply, " hello-hostip") {
		t.Fatalf("TCP through hostIP 127.0.0.1 hostPort %d: %q, %v", loopPort, reply, err)
	}

	// From another "host": the pod sees the peer's own address (builtin
	// keeps the TCP source), and the 127.0.0.1-only port is not there.
	peer := testenv.NewPeer(t)
	c, err := peer.Dial("tcp4", net.JoinHostPort(peer.LocalIP4.String(), strconv.Itoa(tcpPort)))
	if err != nil {
		t.Fatalf("peer dial hostPort %d: %v", tcpPort, err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintln(c, "from-peer")
	buf := make([]byte, 256)
	n, _ := c.Read(buf)
	c.Close()
	if got := strings.TrimSpace(string(buf[:n])); !strings.HasPrefix(got, peer.PeerIP4.String()+":") {
		t.Errorf("the pod saw the peer's connection as %q, want it from %s", got, peer.PeerIP4)
	}
	if c, err := peer.Dial("tcp4", net.JoinHostPort(peer.LocalIP4.String(), strconv.Itoa(loopPort))); err == nil {
		c.Close()
		t.Errorf("hostPort %d with hostIP 127.0.0.1 answered on %s", loopPort, peer.LocalIP4)
	}
	st.step("traffic: TCP, UDP, hostIP, peer")

	if out, err := e.run(t, 60*time.Second, "stopp", podID); err != nil {
		t.Fatalf("crictl stopp: %v\n%s", err, out)
	}
	st.step("crictl stopp (DEL with the netns)")
	if err := waitClosed(fmt.Sprintf("127.0.0.1:%d", tcpPort), 5*time.Second); err != nil {
		t.Error(err)
	}
	for _, p := range []struct {
		proto string
		port  int
	}{{"tcp", tcpPort}, {"udp", udpPort}, {"tcp", loopPort}} {
		if l := listening(p.proto, p.port); len(l) > 0 {
			t.Errorf("after stopp, host %s port %d is still bound: %v", p.proto, p.port, l)
		}
	}
	waitNoProcesses(t, 5*time.Second, before, e.binDir)
	if out, err := e.run(t, 60*time.Second, "rmp", podID); err != nil {
		t.Fatalf("crictl rmp (the second DEL, CNI_NETNS empty): %v\n%s", err, out)
	}
	st.step("crictl rmp (DEL with CNI_NETNS empty)")
	waitNoProcesses(t, 5*time.Second, before, e.binDir)
	if left := snap.newEntries(); len(left) > 0 {
		t.Errorf("portkit state left after rmp: %v", left)
	}
}

// TestKubernetesSCTPHostPortRefused: a pod asking for an SCTP hostPort
// fails at RunPodSandbox with portdriver's CNI error naming the mapping,
// and leaves no port, process or state of ours.
func TestKubernetesSCTPHostPortRefused(t *testing.T) {
	st := newStepTimer(t)
	before := pidSet()
	snap := snapshotState(rootUser)
	e := startCRI(t)
	st.step("containerd started, image imported")
	tcpPort := freePort(t)
	pod := writeJSON(t, e.dir, "pod-sctp.json", criPodConfig("pk-sctp", filepath.Join(e.dir, "logs"),
		portMapping(criTCP, 80, tcpPort, ""),
		portMapping(criSCTP, 9999, 19999, ""),
	))
	out, err := e.run(t, 90*time.Second, "runp", pod)
	st.step("crictl runp (refused)")
	if err == nil {
		t.Fatalf("crictl runp with an sctp hostPort succeeded (pod %s); want portdriver's error", out)
	}
	for _, want := range []string{"portdriver", "sctp", "19999"} {
		if !strings.Contains(strings.ToLower(out), want) {
			t.Errorf("runp error does not mention %q:\n%s", want, out)
		}
	}
	t.Logf("runp error: %s", out)
	if l := listening("tcp", tcpPort); len(l) > 0 {
		t.Errorf("the tcp mapping of the refused pod is bound: %v", l)
	}
	waitNoProcesses(t, 5*time.Second, before, e.binDir)
	if left := snap.newEntries(); len(left) > 0 {
		t.Errorf("portkit state left after the refused ADD: %v", left)
	}
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
