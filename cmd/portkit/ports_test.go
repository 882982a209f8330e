package main

import (
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/api"
	"github.com/portkit/portkit/libport/api/apitest"
)

// apiServer serves the API over a table with d on a socket in a state
// directory owned by u (0700), as `portkit daemon` would, and returns the
// socket. The in-process server stands in for the daemon so that these tests
// pin the API and the CLI alone.
func apiServer(t *testing.T, u *testenv.User, d libport.Driver) (dir, sock string) {
	t.Helper()
	dir = u.Dir(t)
	sock = filepath.Join(dir, "api.sock")
	info := func() api.Info {
		return api.Info{
			StateDir: dir,
			ChildPID: 4242,
			NetworkDriver: &api.NetworkDriverInfo{
				Driver:  "slirp4netns",
				DNS:     []net.IP{net.ParseIP("10.0.2.3")},
				ChildIP: net.ParseIP("10.0.2.100"),
			},
		}
	}
	apitest.Serve(t, sock, api.NewServer(apitest.NewTable(t, d), info))
	return dir, sock
}

// clients runs the same verb with Debian's rootlessctl and with portkit, as
// the unprivileged user, against one socket.
type clients struct {
	t               *testing.T
	u               *testenv.User
	sock            string
	rootlessctl, pk string
}

func newClients(t *testing.T, d libport.Driver) *clients {
	u := testenv.Unprivileged(t)
	rootlessctl := testenv.RequireBinary(t, "rootlessctl")
	_, sock := apiServer(t, u, d)
	return &clients{t: t, u: u, sock: sock, rootlessctl: rootlessctl, pk: testenv.Binary(t, "portkit")}
}

type result struct {
	stdout, stderr string
	code           int
}

func (c *clients) run(bin string, args ...string) result {
	c.t.Helper()
	out, errOut, code := runAs(c.t, c.u, nil, bin, append([]string{"--socket", c.sock}, args...)...)
	return result{out, errOut, code}
}

func (c *clients) rootless(args ...string) result { c.t.Helper(); return c.run(c.rootlessctl, args...) }
func (c *clients) portkit(args ...string) result  { c.t.Helper(); return c.run(c.pk, args...) }

// same runs a read-only verb with both and wants identical bytes and exit code.
func (c *clients) same(args ...string) result {
	c.t.Helper()
	theirs, ours := c.rootless(args...), c.portkit(args...)
	if theirs != ours {
		c.t.Fatalf("%s differs:\nrootlessctl: exit %d\n%s%s\nportkit:     exit %d\n%s%s", strings.Join(args, " "),
			theirs.code, theirs.stdout, theirs.stderr, ours.code, ours.stdout, ours.stderr)
	}
	return ours
}

// want checks one tool's result.
func (c *clients) want(who string, got result, stdout, stderr string, code int) {
	c.t.Helper()
	if got != (result{stdout, stderr, code}) {
		c.t.Fatalf("%s: exit %d, stdout %q, stderr %q\nwant exit %d, stdout %q, stderr %q",
			who, got.code, got.stdout, got.stderr, code, stdout, stderr)
	}
}

func pickPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// answers reports whether a TCP (or UDP) port answers with an echo.
func answers(network, addr string) bool {
	c, err := net.DialTimeout(network, addr, 2*time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		return false
	}
	b := make([]byte, 4)
	n, err := c.Read(b)
	return err == nil && string(b[:n]) == "ping"
}

// TestRootlessctlAgainstNoneDriver: Debian's unmodified rootlessctl reads
// info and an empty list from our API, and an add gets the none driver's
// error as a clean message; portkit prints the same bytes.
func TestRootlessctlAgainstNoneDriver(t *testing.T) {
	c := newClients(t, libport.NoneDriver{})
	dir := filepath.Dir(c.sock)

	info := c.same("info")
	c.want("info", info, fmt.Sprintf(`- REST API version: 1.1.1
- Implementation version: %s
- State Directory: %s
- Child PID: 4242
- Network Driver: slirp4netns
  - DNS: [10.0.2.3]
  - IP: 10.0.2.100
- Port Driver: none
  - Supported protocols: []
`, api.ImplementationVersion, dir), "", 0)

	infoJSON := c.same("info", "--json")
	c.want("info --json", infoJSON, fmt.Sprintf(`{
    "apiVersion": "1.1.1",
    "version": "%s",
    "stateDir": "%s",
    "childPID": 4242,
    "networkDriver": {
        "driver": "slirp4netns",
        "dns": [
            "10.0.2.3"
        ],
        "childIP": "10.0.2.100"
    },
    "portDriver": {
        "driver": "none",
        "protos": []
    }
}
`, api.ImplementationVersion, dir), "", 0)

	header := "ID    PROTO    PARENTIP    PARENTPORT    CHILDIP    CHILDPORT    \n"
	c.want("list-ports", c.same("list-ports"), header, "", 0)
	c.want("list-ports --json", c.same("list-ports", "--json"), "", "", 0)

	port := pickPort(t)
	spec := fmt.Sprintf("127.0.0.1:%d:80/tcp", port)
	c.want("rootlessctl add-ports", c.rootless("add-ports", spec), "", "error: no PortDriver is available\n", 1)
	c.want("portkit add-ports", c.portkit("add-ports", spec), "", "error: no PortDriver is available\n", 1)
	c.want("remove-ports", c.same("remove-ports", "1"), "", "error: unknown id: 1\n", 1)
	c.want("list-ports after refused adds", c.same("list-ports"), header, "", 0)
}

// row is one list-ports line, with the column widths rootlessctl 1.1 gives
// this table (longest cell plus 4; see the README's session).
func row(id, proto, parentIP, parentPort, childIP, childPort string) string {
	return fmt.Sprintf("%-6s%-9s%-13s%-14s%-14s%-13s\n", id, proto, parentIP, parentPort, childIP, childPort)
}

// TestRootlessctlAndPortkitPublishAlike drives a driver that really listens
// with both tools: ports added by either answer and show in both lists,
// printed byte for byte alike.
func TestRootlessctlAndPortkitPublishAlike(t *testing.T) {
	d := apitest.NewEchoDriver()
	c := newClients(t, d)
	p := pickPort(t) // ephemeral: 5 digits, as the column widths below assume
	P, P1 := fmt.Sprint(p), fmt.Sprint(p+1)

	c.want("rootlessctl add-ports", c.rootless("add-ports", "127.0.0.1:"+P+":80/tcp", "[::1]:"+P+":[::1]:80/tcp6"), "1\n2\n", "", 0)
	c.want("portkit add-ports", c.portkit("add-ports", "127.0.0.2:"+P+":10.0.2.100:53/udp4", "127.0.0.3:"+P+"-"+P1+":80-81/tcp"),
		"3\n4\n5\n", "", 0)
	c.want("rootlessctl add-ports --json", c.rootless("add-ports", "--json", "127.0.0.4:"+P+":80/tcp"),
		`{"id":6,"spec":{"proto":"tcp","parentIP":"127.0.0.4","parentPort":`+P+`,"childPort":80}}`+"\n", "", 0)
	c.want("portkit --json add-ports", c.portkit("--json", "add-ports", "127.0.0.5:"+P+":10.0.2.100:80/tcp4"),
		`{"id":7,"spec":{"proto":"tcp4","parentIP":"127.0.0.5","parentPort":`+P+`,"childPort":80,"childIP":"10.0.2.100"}}`+"\n", "", 0)
	for _, addr := range []struct{ network, addr string }{
		{"tcp", "127.0.0.1:" + P}, {"tcp6", "[::1]:" + P}, {"udp4", "127.0.0.2:" + P}, {"tcp", "127.0.0.3:" + P},
		{"tcp", "127.0.0.3:" + P1}, {"tcp", "127.0.0.4:" + P}, {"tcp", "127.0.0.5:" + P},
	} {
		if !answers(addr.network, addr.addr) {
			t.Fatalf("published %s %s does not answer", addr.network, addr.addr)
		}
	}

	header := row("ID", "PROTO", "PARENTIP", "PARENTPORT", "CHILDIP", "CHILDPORT")
	table := header +
		row("1", "tcp", "127.0.0.1", P, "", "80") +
		row("2", "tcp6", "::1", P, "::1", "80") +
		row("3", "udp4", "127.0.0.2", P, "10.0.2.100", "53") +
		row("4", "tcp", "127.0.0.3", P, "", "80") +
		row("5", "tcp", "127.0.0.3", P1, "", "81") +
		row("6", "tcp", "127.0.0.4", P, "", "80") +
		row("7", "tcp4", "127.0.0.5", P, "10.0.2.100", "80")
	c.want("list-ports", c.same("list-ports"), table, "", 0)
	c.want("list-ports --json", c.same("list-ports", "--json"), `{"id":1,"spec":{"proto":"tcp","parentIP":"127.0.0.1","parentPort":`+P+`,"childPort":80}}
{"id":2,"spec":{"proto":"tcp6","parentIP":"::1","parentPort":`+P+`,"childPort":80,"childIP":"::1"}}
{"id":3,"spec":{"proto":"udp4","parentIP":"127.0.0.2","parentPort":`+P+`,"childPort":53,"childIP":"10.0.2.100"}}
{"id":4,"spec":{"proto":"tcp","parentIP":"127.0.0.3","parentPort":`+P+`,"childPort":80}}
{"id":5,"spec":{"proto":"tcp","parentIP":"127.0.0.3","parentPort":`+P1+`,"childPort":81}}
{"id":6,"spec":{"proto":"tcp","parentIP":"127.0.0.4","parentPort":`+P+`,"childPort":80}}
{"id":7,"spec":{"proto":"tcp4","parentIP":"127.0.0.5","parentPort":`+P+`,"childPort":80,"childIP":"10.0.2.100"}}
`, "", 0)
	c.same("info")
	c.same("info", "--json")

	// A conflict is refused with the same message through either tool.
	conflict := "error: port spec 127.0.0.1:" + P + ":90/tcp4 conflicts with port 1 (127.0.0.1:" + P + ":80/tcp)\n"
	c.want("rootlessctl add-ports conflict", c.rootless("add-ports", "127.0.0.1:"+P+":90/tcp4"), "", conflict, 1)
	c.want("portkit add-ports conflict", c.portkit("add-ports", "127.0.0.1:"+P+":90/tcp4"), "", conflict, 1)
	// portkit takes back what it added when a later spec fails (refused specs
	// burn no ID: the table refuses them before reserving one).
	c.want("portkit add-ports with a failing second spec", c.portkit("add-ports", "127.0.0.6:"+P+":80/tcp", "127.0.0.1:"+P+":90/tcp4"),
		"", "error: port spec 127.0.0.1:"+P+":90/tcp4 conflicts with port 1 (127.0.0.1:"+P+":80/tcp) (removed the ports added before it again: IDs 8)\n", 1)
	if answers("tcp", "127.0.0.6:"+P) {
		t.Fatal("a port added before the failing spec still answers")
	}
	c.want("list-ports after refused adds", c.same("list-ports"), table, "", 0)

	c.want("rootlessctl remove-ports", c.rootless("remove-ports", "1", "3"), "1\n3\n", "", 0)
	c.want("portkit remove-ports", c.portkit("remove-ports", "2"), "2\n", "", 0)
	c.want("remove-ports unknown", c.same("remove-ports", "99"), "", "error: unknown id: 99\n", 1)
	c.want("portkit remove-ports stops at the first failure", c.portkit("remove-ports", "4", "99", "5"),
		"4\n", "error: unknown id: 99\n", 1)
	for _, addr := range []struct{ network, addr string }{{"tcp", "127.0.0.1:" + P}, {"tcp6", "[::1]:" + P}, {"tcp", "127.0.0.3:" + P}} {
		if answers(addr.network, addr.addr) {
			t.Fatalf("removed %s %s still answers", addr.network, addr.addr)
		}
	}
	c.want("list-ports after removes", c.same("list-ports"), header+
		row("5", "tcp", "127.0.0.3", P1, "", "81")+
		row("6", "tcp", "127.0.0.4", P, "", "80")+
		row("7", "tcp4", "127.0.0.5", P, "10.0.2.100", "80"), "", 0)
	c.want("rootlessctl remove-ports", c.rootless("remove-ports", "5", "6"), "5\n6\n", "", 0)
	c.want("portkit remove-ports", c.portkit("remove-ports", "7"), "7\n", "", 0)
	c.want("list-ports when empty", c.same("list-ports"), "ID    PROTO    PARENTIP    PARENTPORT    CHILDIP    CHILDPORT    \n", "", 0)
	c.want("list-ports --json when empty", c.same("list-ports", "--json"), "", "", 0)
	if ids := d.Ports(); len(ids) != 0 {
		t.Fatalf("driver still forwards %v after every port was removed", ids)
	}
}

// TestSocketFromEnvironment: --socket wins, then $ROOTLESSKIT_STATE_DIR, then
// $PORTKIT_STATE_DIR, as rootlessctl finds its socket (it knows only the first two).
func TestSocketFromEnvironment(t *testing.T) {
	u := testenv.Unprivileged(t)
	bin := testenv.Binary(t, "portkit")
	dir, sock := apiServer(t, u, libport.NoneDriver{})
	empty := u.Dir(t)
	wantInfo := "- State Directory: " + dir + "\n"
	for _, tc := range []struct {
		env  []string
		args []string
		ok   bool
	}{
		{[]string{"ROOTLESSKIT_STATE_DIR=" + dir}, nil, true},
		{[]string{"PORTKIT_STATE_DIR=" + dir}, nil, true},
		{[]string{"ROOTLESSKIT_STATE_DIR=" + dir, "PORTKIT_STATE_DIR=" + empty}, nil, true},
		{[]string{"ROOTLESSKIT_STATE_DIR=" + empty, "PORTKIT_STATE_DIR=" + dir}, nil, false},
		{[]string{"ROOTLESSKIT_STATE_DIR=" + empty}, []string{"--socket", sock}, true},
	} {
		args := append(append([]string{}, tc.args...), "info")
		out, errOut, code := runAs(t, u, tc.env, bin, args...)
		if got := code == 0 && strings.Contains(out, wantInfo); got != tc.ok {
			t.Errorf("env %v portkit %v: exit %d, %q %q; want success %v", tc.env, args, code, out, errOut, tc.ok)
		}
	}
	// The command's own --socket, after its name, works too.
	if out, errOut, code := runAs(t, u, nil, bin, "info", "--socket", sock); code != 0 || !strings.Contains(out, wantInfo) {
		t.Fatalf("portkit info --socket: exit %d, %q %q", code, out, errOut)
	}
}

// TestPortkitAgainstRootlessKit runs the same verbs with rootlessctl and
// portkit against a real RootlessKit (Debian's 1.1, builtin port driver, as
// the unprivileged user): our client reads RootlessKit's API and prints the
// same bytes. RootlessKit lists ports in random order, so at most one port
// is published when lists are compared.
func TestPortkitAgainstRootlessKit(t *testing.T) {
	u := testenv.Unprivileged(t)
	rootlesskit := testenv.RequireBinary(t, "rootlesskit")
	testenv.RequireBinary(t, "slirp4netns")
	rootlessctl := testenv.RequireBinary(t, "rootlessctl")
	stateDir := filepath.Join(u.Dir(t), "rk")
	cmd := u.Cmd(rootlesskit, "--state-dir="+stateDir, "--net=slirp4netns", "--disable-host-loopback",
		"--port-driver=builtin", "sleep", "infinity")
	var rkErr strings.Builder
	cmd.Stderr = &rkErr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		// SIGTERM lets RootlessKit stop slirp4netns and its child.
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	sock := filepath.Join(stateDir, "api.sock")
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case <-exited:
			t.Fatalf("rootlesskit exited: %s", rkErr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("rootlesskit did not serve %s: %s", sock, rkErr.String())
		}
	}
	c := &clients{t: t, u: u, sock: sock, rootlessctl: rootlessctl, pk: testenv.Binary(t, "portkit")}
	info := c.same("info")
	if !strings.Contains(info.stdout, "- Port Driver: builtin\n  - Supported protocols: [tcp tcp4 tcp6 udp udp4 udp6]\n") {
		t.Fatalf("rootlesskit info: %q", info.stdout)
	}
	c.same("info", "--json")
	c.same("list-ports")
	c.same("list-ports", "--json")
	p := fmt.Sprint(pickPort(t))
	c.want("portkit add-ports", c.portkit("add-ports", "127.0.0.1:"+p+":80/tcp"), "1\n", "", 0)
	c.same("list-ports")
	c.same("list-ports", "--json")
	// RootlessKit's own refusals come through as its message.
	c.want("rootlessctl add-ports conflict", c.rootless("add-ports", "127.0.0.1:"+p+":80/tcp"), "", "error: conflict with ID 1\n", 1)
	c.want("portkit add-ports conflict", c.portkit("add-ports", "127.0.0.1:"+p+":80/tcp"), "", "error: conflict with ID 1\n", 1)
	c.want("remove-ports unknown", c.same("remove-ports", "7"), "", "error: unknown id: 7\n", 1)
	c.want("portkit remove-ports", c.portkit("remove-ports", "1"), "1\n", "", 0)
	c.want("portkit add-ports --json", c.portkit("add-ports", "--json", "127.0.0.1:"+p+":81/tcp"),
		`{"id":2,"spec":{"proto":"tcp","parentIP":"127.0.0.1","parentPort":`+p+`,"childPort":81}}`+"\n", "", 0)
	c.want("rootlessctl remove-ports", c.rootless("remove-ports", "2"), "2\n", "", 0)
	c.same("list-ports")
}
