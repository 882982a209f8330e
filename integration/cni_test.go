package integration

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/portkit/portkit/internal/testenv"
)

// cniVariant is one conflist the README shows, with what a server in the
// container sees as the client's address through it.
type cniVariant struct {
	name     string
	plugins  string // the "plugins" array of the conflist
	backend  string
	ipv6     bool
	loopback bool // the netns reaches the host's loopback through the gateway
	// seen maps "tcp"/"udp" × "loopback"/"peer" to the source address the
	// server sees: an IP, or "child" for the container's own address.
	seen map[string]string
}

var cniVariants = []cniVariant{
	{
		name: "slirp4netns+builtin", backend: "slirp4netns",
		plugins: `[{"type":"usernet","backend":"slirp4netns","mtu":65520,"disableHostLoopback":true},
		           {"type":"portdriver","driver":"builtin","capabilities":{"portMappings":true}}]`,
		// builtin dials the container address; TCP keeps a non-loopback client's address.
		seen: map[string]string{"tcp/loopback": "child", "tcp/peer": "peer", "udp/loopback": "child", "udp/peer": "child"},
	},
	{
		name: "pasta+implicit", backend: "pasta", loopback: true,
		plugins: `[{"type":"usernet","backend":"pasta","capabilities":{"portMappings":true}},
		           {"type":"portdriver","driver":"implicit","capabilities":{"portMappings":true}}]`,
		// pasta splices loopback clients (seen as 127.0.0.1) and keeps others' addresses.
		seen: map[string]string{"tcp/loopback": "127.0.0.1", "tcp/peer": "peer", "udp/loopback": "127.0.0.1", "udp/peer": "peer"},
	},
	{
		// Host loopback stays on: libslirp drops UDP replies to host clients
		// with --disable-host-loopback (podman#4586).
		name: "slirp4netns+slirp4netns", backend: "slirp4netns", loopback: true,
		plugins: `[{"type":"usernet","backend":"slirp4netns"},
		           {"type":"portdriver","driver":"slirp4netns","capabilities":{"portMappings":true}}]`,
		seen: map[string]string{"tcp/loopback": "10.0.2.2", "tcp/peer": "peer", "udp/loopback": "10.0.2.2", "udp/peer": "peer"},
	},
	{
		name: "ipv6", backend: "slirp4netns", ipv6: true, loopback: true,
		plugins: `[{"type":"usernet","backend":"slirp4netns","ipv6":true},
		           {"type":"portdriver","driver":"builtin","capabilities":{"portMappings":true}}]`,
		seen: map[string]string{"tcp/loopback": "child", "tcp/peer": "peer", "udp/loopback": "child", "udp/peer": "child"},
	},
}

func conflist(name, cniVersion, plugins string) []byte {
	return []byte(fmt.Sprintf(`{"cniVersion":%q,"name":%q,"plugins":%s}`, cniVersion, name, plugins))
}

var rootUser = &testenv.User{Name: "root", UID: 0, GID: 0, Home: "/root"}

func TestCNIPublishThroughUsernetAsUser(t *testing.T) {
	u := testenv.Unprivileged(t)
	rt := newCNIRuntime(t, u)
	for _, v := range cniVariants {
		t.Run(v.name, func(t *testing.T) { runVariant(t, rt, u, v) })
	}
}

func TestCNIPublishThroughUsernetAsRoot(t *testing.T) {
	testenv.RequireRoot(t)
	rt := newCNIRuntime(t, nil)
	for _, v := range cniVariants {
		t.Run(v.name, func(t *testing.T) { runVariant(t, rt, rootUser, v) })
	}
}

// freePort returns a host port nobody listens on (TCP and UDP) right now.
func freePort(t *testing.T) int {
	t.Helper()
	for i := 0; i < 50; i++ {
		l, err := net.Listen("tcp", ":0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if c, err := net.ListenPacket("udp", ":"+strconv.Itoa(port)); err == nil {
			c.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

// serveWho answers each TCP connection and UDP datagram with the address
// the server sees the client at.
func serveWho(t *testing.T, nsPath string) (tcpPort, udpPort int) {
	t.Helper()
	l := testenv.Listen(t, nsPath, "tcp", ":0")
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64)
				if _, err := c.Read(buf); err != nil {
					return
				}
				fmt.Fprint(c, c.RemoteAddr().(*net.TCPAddr).IP.String())
			}()
		}
	}()
	pc := testenv.ListenPacket(t, nsPath, "udp", ":0")
	go func() {
		buf := make([]byte, 1500)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo([]byte(from.(*net.UDPAddr).IP.String()), from)
		}
	}()
	return l.Addr().(*net.TCPAddr).Port, pc.LocalAddr().(*net.UDPAddr).Port
}

// who asks the server at addr (through a published port) who we are.
func who(dial func(network, addr string) (net.Conn, error), network, addr string) (string, error) {
	var last error
	// UDP may need a retry while a flow is set up; TCP answers the first time.
	for i := 0; i < 5; i++ {
		c, err := dial(network, addr)
		if err != nil {
			return "", err
		}
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("who\n")); err != nil {
			c.Close()
			return "", err
		}
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		c.Close()
		if err == nil {
			return string(buf[:n]), nil
		}
		last = err
		if network == "tcp" {
			break
		}
	}
	return "", last
}

type stateSnapshot struct {
	dirs    []string
	entries map[string]bool
	pids    map[int]bool // processes that existed before: zombies of others' tests are not ours
}

// stateDirs are where the plugins run by u keep their records.
func stateDirs(u *testenv.User) []string {
	if u.UID == 0 {
		return []string{"/run/portkit/cni"}
	}
	id := strconv.Itoa(u.UID)
	return []string{"/run/user/" + id + "/portkit/cni", filepath.Join(os.TempDir(), "portkit-"+id, "cni")}
}

func snapshotState(u *testenv.User) stateSnapshot {
	s := stateSnapshot{dirs: stateDirs(u), entries: map[string]bool{}, pids: map[int]bool{}}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			s.pids[pid] = true
		}
	}
	for _, d := range s.dirs {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			s.entries[filepath.Join(d, e.Name())] = true
		}
	}
	return s
}

// newEntries lists state entries that appeared since s.
func (s stateSnapshot) newEntries() []string {
	var out []string
	for _, d := range s.dirs {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			if p := filepath.Join(d, e.Name()); !s.entries[p] {
				out = append(out, p)
			}
		}
	}
	return out
}

// ourProcesses lists live processes started from the plugin binaries, or
// network processes attached to the netns of holder pid.
func ourProcesses(pluginDir string, holder int, old map[int]bool) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() || old[pid] {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		if i := strings.LastIndexByte(string(stat), ')'); i > 0 && len(stat) > i+2 && stat[i+2] == 'Z' {
			// A zombie has no exe to look at; its name says whether it is ours.
			comm, _ := os.ReadFile("/proc/" + e.Name() + "/comm")
			switch strings.TrimSpace(string(comm)) {
			case "usernet", "portdriver", "slirp4netns", "pasta":
				out = append(out, fmt.Sprintf("zombie %d %s", pid, stat[:i+1]))
			}
			continue
		}
		exe, _ := os.Readlink("/proc/" + e.Name() + "/exe")
		cmdline, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		args := strings.ReplaceAll(string(cmdline), "\x00", " ")
		switch {
		case strings.HasPrefix(exe, pluginDir+"/"):
			out = append(out, fmt.Sprintf("%d %s", pid, args))
		case holder > 0 && (strings.Contains(args, "/proc/"+strconv.Itoa(holder)+"/") || strings.Contains(args, "-t "+strconv.Itoa(holder)+" ")):
			out = append(out, fmt.Sprintf("%d %s", pid, args))
		}
	}
	return out
}

// assertClean fails t if anything of ours outlived DEL: processes, state
// directories, records or sockets.
func assertClean(t *testing.T, rt *cniRuntime, snap stateSnapshot, holder int) {
	t.Helper()
	var procs []string
	deadline := time.Now().Add(3 * time.Second)
	for {
		procs = ourProcesses(rt.pluginDir, holder, snap.pids)
		if len(procs) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(procs) > 0 {
		t.Errorf("processes left after DEL:\n%s", strings.Join(procs, "\n"))
	}
	if left := snap.newEntries(); len(left) > 0 {
		t.Errorf("state left after DEL: %v", left)
	}
}

func parseResult(t *testing.T, raw json.RawMessage, cniVersion string) *current.Result {
	t.Helper()
	var probe struct {
		CNIVersion string `json:"cniVersion"`
	}
	if err := json.Unmarshal(raw, &probe); err != nil {
		t.Fatalf("result %s: %v", raw, err)
	}
	if probe.CNIVersion != cniVersion {
		t.Fatalf("result has cniVersion %q, want %q: %s", probe.CNIVersion, cniVersion, raw)
	}
	r, err := version.NewResult(cniVersion, raw)
	if err != nil {
		t.Fatalf("result %s: %v", raw, err)
	}
	cur, err := current.NewResultFromResult(r)
	if err != nil {
		t.Fatal(err)
	}
	return cur
}

// childIP returns the container's address of the family of want (4 or 6).
func childIP(res *current.Result, nsPath string, family int) net.IP {
	for _, ip := range res.IPs {
		if ip.Interface == nil || res.Interfaces[*ip.Interface].Sandbox != nsPath {
			continue
		}
		if (ip.Address.IP.To4() != nil) == (family == 4) {
			return ip.Address.IP
		}
	}
	return nil
}

func runVariant(t *testing.T, rt *cniRuntime, owner *testenv.User, v cniVariant) {
	testenv.RequireBinary(t, v.backend)
	ns := testenv.ChildNetns(t, owner)
	tcpChild, udpChild := serveWho(t, ns.Path)
	tcpHost, udpHost := freePort(t), freePort(t)
	hostIP, loop := "", "127.0.0.1"
	if v.ipv6 {
		hostIP, loop = "::1", "::1"
	}
	a := attachmentArgs{containerID: "ctr-" + strings.ReplaceAll(v.name, "+", "-"), netns: ns.Path, ifName: "eth0",
		caps: map[string]any{"portMappings": []map[string]any{
			{"hostPort": tcpHost, "containerPort": tcpChild, "protocol": "tcp", "hostIP": hostIP},
			{"hostPort": udpHost, "containerPort": udpChild, "protocol": "udp", "hostIP": hostIP},
		}}}
	list := conflist("portkit-"+strings.ReplaceAll(v.name, "+", "-"), "1.1.0", v.plugins)
	snap := snapshotState(owner)

	deleted := false
	t.Cleanup(func() {
		if !deleted {
			_ = rt.del(t, list, a)
		}
	})
	raw, err := rt.add(t, list, a)
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	res := parseResult(t, raw, "1.1.0")
	if len(res.Interfaces) != 1 || res.Interfaces[0].Name != "eth0" || res.Interfaces[0].Sandbox != ns.Path || res.Interfaces[0].Mac == "" || res.Interfaces[0].Mtu == 0 {
		t.Fatalf("ADD result interfaces: %s", raw)
	}
	if len(res.Routes) == 0 || len(res.DNS.Nameservers) == 0 || res.IPs[0].Gateway == nil {
		t.Fatalf("ADD result lacks a default route, DNS or gateway: %s", raw)
	}
	family := 4
	if v.ipv6 {
		family = 6
	}
	child := childIP(res, ns.Path, family)
	if child == nil {
		t.Fatalf("ADD result has no IPv%d address in %s: %s", family, ns.Path, raw)
	}
	t.Logf("ADD: %s", raw)

	expect := func(key, peer string) string {
		switch w := v.seen[key]; w {
		case "child":
			return child.String()
		case "peer":
			return peer
		default:
			return w
		}
	}
	// A host client on loopback, through each mapping.
	for _, proto := range []string{"tcp", "udp"} {
		port := tcpHost
		if proto == "udp" {
			port = udpHost
		}
		got, err := who(net.Dial, proto, net.JoinHostPort(loop, strconv.Itoa(port)))
		if err != nil && proto == "udp" && v.backend == "pasta" {
			// Debian 12's pasta loses the reply to a loopback UDP client when
			// the host port differs from the container's (it sends it on fd 0:
			// sendmmsg → ENOTSOCK, seen with strace). README says so.
			t.Logf("udp client on %s through rootless pasta: reply lost (known pasta 2023-03-09 bug): %v", loop, err)
		} else if err != nil {
			t.Errorf("%s client on %s → host port %d: %v", proto, loop, port, err)
		} else if want := expect(proto+"/loopback", ""); got != want {
			t.Errorf("%s client on %s: the server saw %s, want %s", proto, loop, got, want)
		}
	}
	// A client on another "host" (a peer netns on a veth), for the source address.
	p := testenv.NewPeer(t)
	hostAddr, peerAddr := p.LocalIP4, p.PeerIP4
	if v.ipv6 {
		// The IPv6 mappings listen on ::1 only: a peer cannot reach them.
		hostAddr = nil
	}
	for _, proto := range []string{"tcp", "udp"} {
		if hostAddr == nil {
			break
		}
		port := tcpHost
		if proto == "udp" {
			port = udpHost
		}
		got, err := who(p.Dial, proto, net.JoinHostPort(hostAddr.String(), strconv.Itoa(port)))
		if err != nil {
			t.Errorf("%s client on peer %s → %s:%d: %v", proto, peerAddr, hostAddr, port, err)
		} else if want := expect(proto+"/peer", peerAddr.String()); got != want {
			t.Errorf("%s client on peer %s: the server saw %s, want %s", proto, peerAddr, got, want)
		}
	}

	// The container reaches a server on the host side.
	hl, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer hl.Close()
	go func() {
		for {
			c, err := hl.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("host"))
			c.Close()
		}
	}()
	target := p.LocalIP4.String() // a non-loopback host address
	if v.loopback {
		target = res.IPs[0].Gateway.String() // the gateway leads to the host's loopback
		if res.IPs[0].Gateway.To4() == nil {
			for _, ip := range res.IPs {
				if ip.Gateway.To4() != nil {
					target = ip.Gateway.String()
				}
			}
		}
	}
	hostPort := strconv.Itoa(hl.Addr().(*net.TCPAddr).Port)
	err = testenv.Do(ns.Path, func() error {
		c, err := net.DialTimeout("tcp4", net.JoinHostPort(target, hostPort), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4)
		_, err = c.Read(buf)
		if err == nil && string(buf) != "host" {
			err = fmt.Errorf("got %q", buf)
		}
		return err
	})
	if err != nil {
		t.Errorf("container → host server at %s:%s: %v", target, hostPort, err)
	}

	if err := rt.check(t, list, a); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	if err := rt.del(t, list, a); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	deleted = true
	assertClean(t, rt, snap, ns.PID)
	for _, proto := range []string{"tcp", "udp"} {
		port := tcpHost
		if proto == "udp" {
			port = udpHost
		}
		if _, err := who(net.Dial, proto, net.JoinHostPort(loop, strconv.Itoa(port))); err == nil {
			t.Errorf("host port %d/%s still answers after DEL", port, proto)
		}
	}
	if err := rt.del(t, list, a); err != nil {
		t.Errorf("second DEL: %v", err)
	}
}

var builtinPlugins = cniVariants[0].plugins

func TestCNIDelAfterNetnsGone(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "slirp4netns")
	rt := newCNIRuntime(t, u)
	ns := testenv.ChildNetns(t, u)
	list := conflist("portkit-gone", "1.1.0", builtinPlugins)
	a := attachmentArgs{containerID: "ctr-gone", netns: ns.Path, ifName: "eth0",
		caps: map[string]any{"portMappings": []map[string]any{{"hostPort": freePort(t), "containerPort": 80, "protocol": "tcp"}}}}
	snap := snapshotState(u)
	if _, err := rt.add(t, list, a); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if err := syscall.Kill(ns.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(ns.Path); err != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := rt.del(t, list, a); err != nil {
		t.Fatalf("DEL after the netns is gone: %v", err)
	}
	a.netns = "" // as containerd sends the second DEL
	if err := rt.del(t, list, a); err != nil {
		t.Fatalf("DEL with an empty CNI_NETNS: %v", err)
	}
	assertClean(t, rt, snap, ns.PID)
}

func TestCNIAddWithTakenHostPort(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "slirp4netns")
	rt := newCNIRuntime(t, u)
	ns := testenv.ChildNetns(t, u)
	taken, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := taken.Addr().(*net.TCPAddr).Port
	list := conflist("portkit-taken", "1.1.0", builtinPlugins)
	a := attachmentArgs{containerID: "ctr-taken", netns: ns.Path, ifName: "eth0",
		caps: map[string]any{"portMappings": []map[string]any{{"hostPort": port, "containerPort": 80, "protocol": "tcp"}}}}
	snap := snapshotState(u)
	_, err = rt.add(t, list, a)
	if err == nil || !strings.Contains(err.Error(), strconv.Itoa(port)) {
		t.Fatalf("ADD with host port %d taken: got %v, want an error naming the port", port, err)
	}
	t.Logf("ADD with a taken port: %v", err)
	// libcni leaves the rollback to the runtime, which sends DEL.
	if err := rt.del(t, list, a); err != nil {
		t.Fatalf("DEL after the failed ADD: %v", err)
	}
	assertClean(t, rt, snap, ns.PID)
}

func TestCNIAddWithBadConfig(t *testing.T) {
	u := testenv.Unprivileged(t)
	rt := newCNIRuntime(t, u)
	ns := testenv.ChildNetns(t, u)
	a := attachmentArgs{containerID: "ctr-bad", netns: ns.Path, ifName: "eth0"}
	for _, tc := range []struct{ plugins, field string }{
		{`[{"type":"usernet","mtu":"big"}]`, "mtu"},
		{`[{"type":"usernet","backend":"tap"}]`, "backend"},
		{`[{"type":"usernet","cidr":"10.0.2.0/30"}]`, "cidr"},
		{`[{"type":"usernet","sandbocks":true}]`, "sandbocks"},
		{`[{"type":"usernet"},{"type":"portdriver","driver":"iptables","capabilities":{"portMappings":true}}]`, "driver"},
	} {
		snap := snapshotState(u)
		list := conflist("portkit-bad", "1.1.0", tc.plugins)
		_, err := rt.add(t, list, a)
		var ce *cniError
		if !errors.As(err, &ce) || ce.Code != types.ErrInvalidNetworkConfig || !strings.Contains(ce.Msg, `"`+tc.field+`"`) {
			t.Errorf("%s: got %v, want CNI error 7 naming %q", tc.plugins, err, tc.field)
		}
		if strings.Contains(tc.plugins, "portdriver") {
			// usernet's ADD succeeded before portdriver refused: the runtime DELs.
			if err := rt.del(t, list, a); err != nil {
				t.Errorf("DEL: %v", err)
			}
		}
		assertClean(t, rt, snap, ns.PID)
	}
}

func TestCNIGCRemovesAttachmentsNotValid(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "slirp4netns")
	rt := newCNIRuntime(t, u)
	list := conflist("portkit-gc", "1.1.0", builtinPlugins)
	snap := snapshotState(u)
	var holders []int
	for i := 0; i < 2; i++ {
		ns := testenv.ChildNetns(t, u)
		holders = append(holders, ns.PID)
		a := attachmentArgs{containerID: fmt.Sprintf("ctr-gc-%d", i), netns: ns.Path, ifName: "eth0",
			caps: map[string]any{"portMappings": []map[string]any{{"hostPort": freePort(t), "containerPort": 80, "protocol": "tcp"}}}}
		if _, err := rt.add(t, list, a); err != nil {
			t.Fatalf("ADD %d: %v", i, err)
		}
	}
	// A runtime that lost its cache: only the plugins' own GC can clean up.
	fresh := *rt
	fresh.cacheDir = rt.cacheDir + "-empty"
	if err := fresh.gc(t, list, []types.GCAttachment{}); err != nil {
		t.Fatalf("GC: %v", err)
	}
	for _, h := range holders {
		assertClean(t, rt, snap, h)
	}
}

func TestCNIStatusWithoutSlirp4netns(t *testing.T) {
	u := testenv.Unprivileged(t)
	rt := newCNIRuntime(t, u)
	list := conflist("portkit-status", "1.1.0", builtinPlugins)
	if err := rt.status(t, list); err != nil {
		t.Fatalf("STATUS with slirp4netns installed: %v", err)
	}
	rt.env = []string{"PATH=/nonexistent"}
	err := rt.status(t, list)
	var ce *cniError
	if !errors.As(err, &ce) || ce.Code != 50 || !strings.Contains(ce.Msg, "slirp4netns") {
		t.Fatalf("STATUS without slirp4netns on PATH: got %v, want CNI error 50 naming slirp4netns", err)
	}
}

func TestCNIEveryVersionRoundTrips(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "slirp4netns")
	rt := newCNIRuntime(t, u)
	ns := testenv.ChildNetns(t, u)
	tcpChild, _ := serveWho(t, ns.Path)
	for _, ver := range []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(ver, func(t *testing.T) {
			list := conflist("portkit-ver", ver, builtinPlugins)
			port := freePort(t)
			a := attachmentArgs{containerID: "ctr-ver", netns: ns.Path, ifName: "eth0",
				caps: map[string]any{"portMappings": []map[string]any{{"hostPort": port, "containerPort": tcpChild, "protocol": "tcp"}}}}
			snap := snapshotState(u)
			raw, err := rt.add(t, list, a)
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			// portdriver passed usernet's result on, converted to ver.
			res := parseResult(t, raw, ver)
			if len(res.Interfaces) != 1 || res.Interfaces[0].Sandbox != ns.Path || len(res.IPs) == 0 {
				t.Errorf("result: %s", raw)
			}
			if _, err := who(net.Dial, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port))); err != nil {
				t.Errorf("published port %d: %v", port, err)
			}
			if ok, _ := version.GreaterThanOrEqualTo(ver, "0.4.0"); ok {
				if err := rt.check(t, list, a); err != nil {
					t.Errorf("CHECK: %v", err)
				}
			}
			if err := rt.del(t, list, a); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			assertClean(t, rt, snap, 0)
		})
	}
}
