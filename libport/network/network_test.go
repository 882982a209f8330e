package network

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
)

// The test binary doubles as the code under test run as the unprivileged
// user (agent) and as a client inside the child netns (dial).
const (
	agentEnv = "PORTKIT_NETWORK_TEST_AGENT"
	dialEnv  = "PORTKIT_NETWORK_TEST_DIAL"
)

func TestMain(m *testing.M) {
	if cfg := os.Getenv(agentEnv); cfg != "" {
		os.Exit(agentMain(cfg))
	}
	if addr := os.Getenv(dialEnv); addr != "" {
		os.Exit(dialMain(addr))
	}
	testenv.Main(m)
}

// agentReport is what the agent prints after Start.
type agentReport struct {
	Err                                string
	PID, MTU                           int
	IfName, MAC, IP, Gateway, DNS, IP6 string
	Backend                            string
}

// agentMain starts the network, prints a report, then on "stop" stops it;
// on EOF it exits without stopping (the owner dies).
func agentMain(cfgJSON string) int {
	var cfg Config
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		fmt.Println(`{"Err":"bad config"}`)
		return 2
	}
	n, err := Start(context.Background(), cfg)
	enc := json.NewEncoder(os.Stdout)
	if err != nil {
		enc.Encode(agentReport{Err: err.Error()})
		return 1
	}
	r := agentReport{PID: n.PID, MTU: n.MTU, IfName: n.IfName, MAC: n.MAC, IP: n.IP.String(),
		Gateway: n.Gateway.String(), DNS: n.DNS.String(), Backend: n.Backend}
	if n.IP6.IP != nil {
		r.IP6 = n.IP6.String()
	}
	enc.Encode(r)
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if sc.Text() == "stop" {
			if err := n.Stop(); err != nil {
				fmt.Println("stop:", err)
				return 1
			}
			select {
			case <-n.Done():
				fmt.Println("stopped")
			default:
				fmt.Println("stop returned but Done is open")
			}
			return 0
		}
	}
	return 0
}

func dialMain(addr string) int {
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	// Speak first: pasta's tap path stalls server-speaks-first connections.
	io.WriteString(c, "hi\n")
	b, err := io.ReadAll(c)
	os.Stdout.Write(b)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

var selfCopy struct {
	sync.Once
	path string
	err  error
}

// selfBinary copies the test binary where the test user may run it (go
// test's own build directory is private to root).
func selfBinary(t *testing.T) string {
	selfCopy.Do(func() {
		exe, err := os.Executable()
		if err != nil {
			selfCopy.err = err
			return
		}
		dir, err := os.MkdirTemp("", "portkit-network-test-")
		if err != nil {
			selfCopy.err = err
			return
		}
		os.Chmod(dir, 0o755)
		data, err := os.ReadFile(exe)
		if err != nil {
			selfCopy.err = err
			return
		}
		selfCopy.path = filepath.Join(dir, "network.test")
		selfCopy.err = os.WriteFile(selfCopy.path, data, 0o755)
	})
	if selfCopy.err != nil {
		t.Fatal(selfCopy.err)
	}
	t.Cleanup(func() {}) // the copy lives for the test process; removed below
	return selfCopy.path
}

type agent struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	out    *bufio.Reader
	report agentReport
}

// startAgent runs network.Start as the unprivileged user u.
func startAgent(t *testing.T, u *testenv.User, cfg Config) *agent {
	t.Helper()
	return startAgentIn(t, nil, u, cfg)
}

// startAgentIn runs network.Start as u inside host (nil: our own netns).
func startAgentIn(t *testing.T, host *testenv.IsolatedHost, u *testenv.User, cfg Config) *agent {
	t.Helper()
	b, _ := json.Marshal(cfg)
	cmd := u.Cmd(selfBinary(t))
	if host != nil {
		cmd = host.Cmd(u, selfBinary(t))
	}
	cmd.Env = append(cmd.Env, agentEnv+"="+string(b))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	testenv.Start(t, cmd)
	a := &agent{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
	line, err := a.out.ReadString('\n')
	if err != nil {
		t.Fatalf("agent for %s: no report: %v", cfg.Backend, err)
	}
	if err := json.Unmarshal([]byte(line), &a.report); err != nil {
		t.Fatalf("agent report %q: %v", line, err)
	}
	if a.report.Err != "" {
		t.Fatalf("network.Start(%s) as %s: %s", cfg.Backend, u.Name, a.report.Err)
	}
	pid := a.report.PID
	t.Cleanup(func() {
		// Whatever happened in the test, the agent's death must take the
		// network process with it.
		a.cmd.Process.Kill()
		deadline := time.Now().Add(3 * time.Second)
		for processAlive(pid) {
			if time.Now().After(deadline) {
				t.Errorf("%s (pid %d) still running at the end of the test", cfg.Backend, pid)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	return a
}

func (a *agent) stop(t *testing.T) {
	t.Helper()
	if _, err := io.WriteString(a.stdin, "stop\n"); err != nil {
		t.Fatal(err)
	}
	line, _ := a.out.ReadString('\n')
	if strings.TrimSpace(line) != "stopped" {
		t.Fatalf("Stop: %q", line)
	}
	if err := a.cmd.Wait(); err != nil {
		t.Fatalf("agent: %v", err)
	}
}

// processAlive reads /proc: a zombie (PID 1 here does not reap) is dead.
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || (s[i+2] != 'Z' && s[i+2] != 'X')
}

// parentServer listens on the parent's loopback and greets every client.
func parentServer(t *testing.T) int {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	serveGreeting(l)
	return l.Addr().(*net.TCPAddr).Port
}

func serveGreeting(l net.Listener) {
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			bufio.NewReader(c).ReadString('\n')
			io.WriteString(c, "hello from the parent")
			c.Close()
		}
	}()
}

// dialFromChild connects from inside ns, as u, and returns what it read.
func dialFromChild(t *testing.T, u *testenv.User, ns *testenv.Netns, addr string) (string, error) {
	t.Helper()
	cmd := ns.Command(u, selfBinary(t))
	cmd.Env = append(cmd.Env, dialEnv+"="+addr)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%v: %s", err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

type ipLink struct {
	IfName  string `json:"ifname"`
	MTU     int    `json:"mtu"`
	Address string `json:"address"`
	Flags   []string
	Addr    []struct {
		Family    string `json:"family"`
		Local     string `json:"local"`
		PrefixLen int    `json:"prefixlen"`
	} `json:"addr_info"`
}

// checkInfo compares the report with the interface and route in the child.
func checkInfo(t *testing.T, u *testenv.User, ns *testenv.Netns, r agentReport, cfg Config) {
	t.Helper()
	var links []ipLink
	out := ns.Run(t, u, "ip", "-j", "addr", "show", "dev", r.IfName)
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		t.Fatalf("ip -j addr show dev %s: %v: %s", r.IfName, err, out)
	}
	l := links[0]
	if l.MTU != r.MTU || r.MTU != cfg.MTU {
		t.Errorf("MTU: reported %d, config %d, interface %d", r.MTU, cfg.MTU, l.MTU)
	}
	if !strings.EqualFold(l.Address, r.MAC) {
		t.Errorf("MAC: reported %s, interface %s", r.MAC, l.Address)
	}
	found := false
	for _, a := range l.Addr {
		if a.Family == "inet" && fmt.Sprintf("%s/%d", a.Local, a.PrefixLen) == r.IP {
			found = true
		}
	}
	if !found {
		t.Errorf("address %s reported, interface has %s", r.IP, out)
	}
	route := ns.Run(t, u, "ip", "route", "show", "default")
	if !strings.Contains(route, "via "+r.Gateway+" dev "+r.IfName) {
		t.Errorf("default route %q does not go via the reported gateway %s on %s", route, r.Gateway, r.IfName)
	}
}

func requireNetworkTools(t *testing.T, backend string) {
	testenv.RequireBinary(t, backend)
	testenv.RequireBinary(t, "nsenter")
	testenv.RequireBinary(t, "ip")
}

func TestStartReachesParentLoopbackAndStops(t *testing.T) {
	for _, tc := range []struct {
		backend, gateway, cidr string
		mtu                    int
		sandbox                bool
	}{
		{"slirp4netns", "10.0.2.2", "", 0, false},
		{"pasta", "10.0.2.2", "", 0, false},
		{"slirp4netns", "10.99.0.2", "10.99.0.0/16", 1500, false},
		{"pasta", "10.99.0.2", "10.99.0.0/16", 1500, false},
		{"slirp4netns", "10.0.2.2", "", 0, true},
	} {
		name := fmt.Sprintf("%s-%s", tc.backend, tc.gateway)
		if tc.sandbox {
			name += "-sandbox-seccomp"
		}
		t.Run(name, func(t *testing.T) {
			requireNetworkTools(t, tc.backend)
			u := testenv.Unprivileged(t)
			ns := testenv.ChildNetns(t, u)
			cfg := Config{Backend: tc.backend, NetnsPath: ns.Path, CIDR: tc.cidr, MTU: tc.mtu, Sandbox: tc.sandbox, Seccomp: tc.sandbox}
			a := startAgent(t, u, cfg)
			cfg.Default()
			checkInfo(t, u, ns, a.report, cfg)
			if a.report.Gateway != tc.gateway {
				t.Errorf("gateway %s, want %s", a.report.Gateway, tc.gateway)
			}
			port := parentServer(t)
			got, err := dialFromChild(t, u, ns, net.JoinHostPort(tc.gateway, strconv.Itoa(port)))
			if err != nil || got != "hello from the parent" {
				t.Fatalf("child -> parent loopback via %s: %q, %v", tc.gateway, got, err)
			}
			pid := a.report.PID
			a.stop(t)
			if processAlive(pid) {
				t.Fatalf("%s (pid %d) alive after Stop", tc.backend, pid)
			}
		})
	}
}

func TestDisableHostLoopbackBlocksGateway(t *testing.T) {
	for _, backend := range Backends {
		t.Run(backend, func(t *testing.T) {
			requireNetworkTools(t, backend)
			u := testenv.Unprivileged(t)
			ns := testenv.ChildNetns(t, u)
			// Without the mapping, pasta sends gateway traffic to the real
			// network: run it in a host stand-in whose uplink is a dead end.
			var host *testenv.IsolatedHost
			var port int
			if testenv.IsRoot() {
				host = testenv.NewIsolatedHost(t)
				l := testenv.Listen(t, host.Path, "tcp4", "127.0.0.1:0")
				serveGreeting(l)
				port = l.Addr().(*net.TCPAddr).Port
			} else if backend == "pasta" {
				t.Skip("pasta with --no-map-gw forwards to the real network: needs root for an isolated host namespace")
			} else {
				port = parentServer(t)
			}
			// Control: without the option the same set-up reaches the server.
			a := startAgentIn(t, host, u, Config{Backend: backend, NetnsPath: ns.Path})
			if got, err := dialFromChild(t, u, ns, net.JoinHostPort("10.0.2.2", strconv.Itoa(port))); got != "hello from the parent" {
				t.Fatalf("control: child did not reach the parent's loopback: %q, %v", got, err)
			}
			a.stop(t)
			ns = testenv.ChildNetns(t, u)
			a = startAgentIn(t, host, u, Config{Backend: backend, NetnsPath: ns.Path, DisableHostLoopback: true})
			for _, addr := range []string{"10.0.2.2", "127.0.0.1"} {
				got, err := dialFromChild(t, u, ns, net.JoinHostPort(addr, strconv.Itoa(port)))
				if err == nil || got != "" {
					t.Errorf("child reached the parent's loopback via %s despite DisableHostLoopback: %q", addr, got)
				}
			}
			a.stop(t)
		})
	}
}

// TestOwnerDeathStopsNetwork kills the process that called Start: its
// network process must not outlive it.
func TestOwnerDeathStopsNetwork(t *testing.T) {
	for _, backend := range Backends {
		t.Run(backend, func(t *testing.T) {
			requireNetworkTools(t, backend)
			u := testenv.Unprivileged(t)
			ns := testenv.ChildNetns(t, u)
			a := startAgent(t, u, Config{Backend: backend, NetnsPath: ns.Path})
			pid := a.report.PID
			if !processAlive(pid) {
				t.Fatalf("%s (pid %d) not running after Start", backend, pid)
			}
			a.cmd.Process.Kill()
			a.cmd.Wait()
			deadline := time.Now().Add(3 * time.Second)
			for processAlive(pid) {
				if time.Now().After(deadline) {
					t.Fatalf("%s (pid %d) outlived its owner by 3 s", backend, pid)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

// TestStartFailureNamesToolError makes the tool itself fail at start: the
// error carries the tool's own message and nothing is left running.
func TestStartFailureNamesToolError(t *testing.T) {
	u := testenv.Unprivileged(t)
	busy, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyPort := busy.Addr().(*net.TCPAddr).Port
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"slirp4netns-api-socket", Config{Backend: "slirp4netns", APISocket: "/nonexistent/portkit/api.sock"}, "api_bindlisten: bind"},
		{"pasta-port-taken", Config{Backend: "pasta", Ports: []libport.Spec{{Proto: "tcp4", ParentIP: "127.0.0.1", ParentPort: busyPort, ChildPort: 80}}}, strconv.Itoa(busyPort)},
		{"not-a-netns", Config{Backend: "slirp4netns", NetnsPath: "/proc/self/status"}, "/proc/self/status"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			requireNetworkTools(t, tc.cfg.Backend)
			if tc.cfg.NetnsPath == "" {
				tc.cfg.NetnsPath = testenv.ChildNetns(t, u).Path
			}
			before := childPIDs(t)
			_, err := runAgent(t, u, tc.cfg)
			if err == nil {
				t.Fatal("Start succeeded")
			}
			t.Logf("error: %v", err)
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error does not mention %q: %v", tc.want, err)
			}
			if after := childPIDs(t); len(after) > len(before) {
				t.Errorf("processes left behind: %v (before %v)", after, before)
			}
		})
	}
}

// runAgent is startAgent for a Start that is expected to fail.
func runAgent(t *testing.T, u *testenv.User, cfg Config) (agentReport, error) {
	b, _ := json.Marshal(cfg)
	cmd := u.Cmd(selfBinary(t))
	cmd.Env = append(cmd.Env, agentEnv+"="+string(b))
	out, _ := cmd.Output()
	var r agentReport
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("agent output %q: %v", out, err)
	}
	if r.Err != "" {
		return r, fmt.Errorf("%s", r.Err)
	}
	return r, nil
}

// childPIDs lists running slirp4netns and pasta processes.
func childPIDs(t *testing.T) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		switch strings.TrimSpace(string(comm)) {
		case "slirp4netns", "pasta", "passt":
			if processAlive(pid) {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

func TestPastaPortArgs(t *testing.T) {
	for _, tc := range []struct {
		specs []string
		want  string
		err   string
	}{
		{nil, "--tcp-ports=none --udp-ports=none", ""},
		{[]string{"8080:80/tcp"}, "--tcp-ports=8080:80 --udp-ports=none", ""},
		{[]string{"127.0.0.1:8080:8080/tcp", "5353:53/udp"}, "--tcp-ports=127.0.0.1/8080 --udp-ports=5353:53", ""},
		{[]string{"8080:80/tcp4"}, "--tcp-ports=0.0.0.0/8080:80 --udp-ports=none", ""},
		{[]string{"[::1]:8080:80/tcp6"}, "--tcp-ports=::1/8080:80 --udp-ports=none", ""},
		{[]string{"8080:80/tcp6"}, "", "pasta forwards IPv4 too"},
		{[]string{"8080:10.0.2.100:80/tcp"}, "", "chosen child IP"},
	} {
		var specs []libport.Spec
		for _, s := range tc.specs {
			p, err := libport.ParseSpec(s)
			if err != nil {
				t.Fatal(err)
			}
			specs = append(specs, p...)
		}
		got, err := pastaPortArgs(specs)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%v: error %v, want one containing %q", tc.specs, err, tc.err)
			}
			continue
		}
		if err != nil || strings.Join(got, " ") != tc.want {
			t.Errorf("%v: %q, %v; want %q", tc.specs, got, err, tc.want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Config{Backend: "slirp4netns", NetnsPath: "/proc/1/ns/net"}
	for _, tc := range []struct {
		name string
		edit func(*Config)
		err  string
	}{
		{"defaults", func(*Config) {}, ""},
		{"unknown backend", func(c *Config) { c.Backend = "vpnkit" }, `unknown network backend "vpnkit"`},
		{"no netns", func(c *Config) { c.NetnsPath = "" }, "namespace path is empty"},
		{"mtu", func(c *Config) { c.MTU = 70000 }, "MTU 70000 is out of range"},
		{"ipv6 mtu", func(c *Config) { c.IPv6, c.MTU = true, 1000 }, "MTU 1000 is out of range 1280"},
		{"cidr", func(c *Config) { c.CIDR = "10.0.2.0/30" }, "too small"},
		{"cidr6", func(c *Config) { c.CIDR = "fd00::/64" }, "not IPv4"},
		{"cidr junk", func(c *Config) { c.CIDR = "nope" }, `CIDR "nope"`},
		{"ifname", func(c *Config) { c.IfName = "a/b" }, "interface name"},
		{"outbound", func(c *Config) { c.OutboundAddr = "x" }, "outbound address"},
		{"pasta sandbox", func(c *Config) { c.Backend, c.Sandbox = "pasta", true }, "slirp4netns options"},
		{"slirp ports", func(c *Config) {
			c.Ports = []libport.Spec{{Proto: "tcp", ParentPort: 1, ChildPort: 1}}
		}, "takes no ports"},
	} {
		c := ok
		tc.edit(&c)
		c.Default()
		err := c.Validate()
		if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.err)
		}
	}
}
