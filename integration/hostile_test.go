package integration

// Hostile input through every surface a user or a runtime feeds portkit:
// the REST API, the CLI, CNI stdin and environment, OCI hook stdin and
// annotations. Each input must get a clear error and change nothing: the
// port list, the state files and the set of processes stay as they were.

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
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport"
)

// deepJSON is n nested arrays: a stack-depth attack on a JSON decoder.
func deepJSON(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }

// unixHTTP is an HTTP client over the unix socket at path.
func unixHTTP(path string) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}
}

// userStateBases are the directories under which the test user's portkit
// state lives (one of them, depending on /run/user).
func userStateBases(u *testenv.User) []string {
	return []string{"/run/user/" + strconv.Itoa(u.UID) + "/portkit", filepath.Join(os.TempDir(), "portkit-"+strconv.Itoa(u.UID))}
}

func snapshotDirs(t *testing.T, dirs ...string) map[string]string {
	all := map[string]string{}
	for _, d := range dirs {
		for k, v := range dirSnapshot(t, d) {
			all[k] = v
		}
	}
	return all
}

// TestHostileAPIRequestsAreRefused sends malformed and malicious requests
// to a builtin daemon's API socket: each gets a 4xx with a JSON message,
// the port list and the state directory stay as they were, and the daemon
// keeps serving.
func TestHostileAPIRequestsAreRefused(t *testing.T) {
	u := testenv.Unprivileged(t)
	d, ns := builtinDaemon(t, u)
	l := testenv.Listen(t, ns.Path, "tcp4", "127.0.0.1:0")
	echoIn(l)
	hostPort := freePort(t)
	if _, err := d.client.AddPort(context.Background(), libport.Spec{Proto: "tcp4", ParentIP: "127.0.0.1", ParentPort: hostPort, ChildPort: l.Addr().(*net.TCPAddr).Port}); err != nil {
		t.Fatal(err)
	}
	listBefore := d.list(t)
	stateBefore := dirSnapshot(t, d.dir)
	hc := unixHTTP(d.sock)
	free := freePort(t)
	spec := func(fields string) string { return "{" + fields + "}" }
	for _, tc := range []struct {
		name, method, path, body string
	}{
		{"huge body", "POST", "/v1/ports", `{"proto":"tcp","parentIP":"` + strings.Repeat("1", 16<<20) + `"}`},
		{"huge whitespace", "POST", "/v1/ports", strings.Repeat(" ", 8<<20) + `{}`},
		{"deep JSON", "POST", "/v1/ports", deepJSON(100000)},
		{"deep object", "POST", "/v1/ports", strings.Repeat(`{"a":`, 50000) + "1" + strings.Repeat("}", 50000)},
		{"negative port", "POST", "/v1/ports", spec(`"proto":"tcp","parentPort":-1,"childPort":80`)},
		{"zero port", "POST", "/v1/ports", spec(`"proto":"tcp","parentPort":0,"childPort":80`)},
		{"port 65536", "POST", "/v1/ports", spec(fmt.Sprintf(`"proto":"tcp","parentPort":65536,"childPort":%d`, free))},
		{"overflowing port", "POST", "/v1/ports", spec(`"proto":"tcp","parentPort":99999999999999999999,"childPort":80`)},
		{"2^32+port", "POST", "/v1/ports", spec(fmt.Sprintf(`"proto":"tcp","parentPort":%d,"childPort":80`, 1<<32+free))},
		{"float port", "POST", "/v1/ports", spec(fmt.Sprintf(`"proto":"tcp","parentPort":%d.5,"childPort":80`, free))},
		{"string port", "POST", "/v1/ports", spec(`"proto":"tcp","parentPort":"8080","childPort":80`)},
		{"unknown proto", "POST", "/v1/ports", spec(fmt.Sprintf(`"proto":"sctp","parentPort":%d,"childPort":80`, free))},
		{"NUL in proto", "POST", "/v1/ports", spec(fmt.Sprintf(`"proto":"tcp\u0000","parentPort":%d,"childPort":80`, free))},
		{"NUL in address", "POST", "/v1/ports", spec(fmt.Sprintf(`"proto":"tcp","parentIP":"127.0.0.1\u0000evil","parentPort":%d,"childPort":80`, free))},
		{"path as address", "POST", "/v1/ports", spec(fmt.Sprintf(`"proto":"tcp","childIP":"../../etc/passwd","parentPort":%d,"childPort":80`, free))},
		{"tcp4 with IPv6", "POST", "/v1/ports", spec(fmt.Sprintf(`"proto":"tcp4","parentIP":"::1","parentPort":%d,"childPort":80`, free))},
		{"unknown field", "POST", "/v1/ports", spec(fmt.Sprintf(`"proto":"tcp","parentPort":%d,"childPort":80,"exec":"sh"`, free))},
		{"duplicate of the existing port", "POST", "/v1/ports", spec(fmt.Sprintf(`"proto":"tcp4","parentIP":"127.0.0.1","parentPort":%d,"childPort":80`, hostPort))},
		{"two objects", "POST", "/v1/ports", spec(fmt.Sprintf(`"proto":"tcp","parentPort":%d,"childPort":80`, free)) + "{}"},
		{"null", "POST", "/v1/ports", "null"},
		{"array", "POST", "/v1/ports", `[{"proto":"tcp"}]`},
		{"not JSON", "POST", "/v1/ports", "\x00\x01\x02\xff"},
		{"empty", "POST", "/v1/ports", ""},
		{"delete negative", "DELETE", "/v1/ports/-1", ""},
		{"delete overflowing", "DELETE", "/v1/ports/99999999999999999999", ""},
		{"delete traversal", "DELETE", "/v1/ports/..%2f..%2fetc", ""},
		{"delete NUL", "DELETE", "/v1/ports/1%00", ""},
		{"delete unknown", "DELETE", "/v1/ports/424242", ""},
		{"PUT", "PUT", "/v1/ports", "{}"},
		{"unknown path", "GET", "/v1/../../etc/passwd", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, "http://portkit"+tc.path, strings.NewReader(tc.body))
			if tc.path == "/v1/ports/1%00" || strings.Contains(tc.path, "%2f") {
				req.URL.RawPath = tc.path
			}
			req.Header.Set("Content-Type", "application/json")
			start := time.Now()
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatalf("%s %s: %v", tc.method, tc.path, err)
			}
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			var msg struct{ Message string }
			_ = json.Unmarshal(body, &msg)
			show := msg.Message
			if len(show) > 200 {
				show = show[:200] + "…"
			}
			t.Logf("%d in %v: %s", resp.StatusCode, time.Since(start).Round(time.Millisecond), show)
			if resp.StatusCode < 400 || resp.StatusCode >= 500 {
				t.Errorf("status %d (%s), want a 4xx refusal", resp.StatusCode, body)
			}
			if tc.method != "PUT" && tc.path != "/v1/../../etc/passwd" && msg.Message == "" {
				t.Errorf("no JSON message in %q", body)
			}
		})
	}
	if got := d.list(t); strings.Join(got, "\n") != strings.Join(listBefore, "\n") {
		t.Errorf("the port list changed:\n%v\nwas\n%v", got, listBefore)
	}
	if diff := diffSnapshots(stateBefore, dirSnapshot(t, d.dir)); len(diff) > 0 {
		t.Errorf("the state dir changed: %v", diff)
	}
	if err := ping("127.0.0.1:"+strconv.Itoa(hostPort), "still"); err != nil {
		t.Errorf("the existing port after the hostile requests: %v", err)
	}
}

// TestHostileCLIArgumentsAreRefused feeds bad arguments to `portkit` as
// the user: each exits 1 with "error: …" and changes nothing.
func TestHostileCLIArgumentsAreRefused(t *testing.T) {
	u := testenv.Unprivileged(t)
	d, _ := builtinDaemon(t, u)
	bin := testenv.Binary(t, "portkit")
	home := u.Dir(t)
	victim := filepath.Join(home, "victim")
	os.WriteFile(victim, []byte("precious"), 0o600)
	os.Chown(victim, u.UID, u.GID)
	link := filepath.Join(home, "link-to-dir")
	os.Symlink(d.dir, link)
	os.Lchown(link, u.UID, u.GID)
	listBefore := d.list(t)
	stateBefore := snapshotDirs(t, d.dir, home)
	sock := "--socket=" + d.sock
	for _, tc := range []struct {
		name string
		args []string
		want string // in stderr
	}{
		{"range of 65,535 ports", []string{"add-ports", sock, "127.0.0.1:1-65535:1-65535/tcp"}, "error:"},
		{"range past 65535", []string{"add-ports", sock, "60000-70000:60000-70000/tcp"}, "out of range"},
		{"unequal ranges", []string{"add-ports", sock, "20000-20009:80-81/tcp"}, "same length"},
		{"negative port", []string{"add-ports", sock, "-1:80/tcp"}, "error:"},
		{"overflowing port", []string{"add-ports", sock, "99999999999999999999:80/tcp"}, "out of range"},
		{"unknown proto", []string{"add-ports", sock, "20000:80/sctp"}, "sctp"},
		{"huge spec", []string{"add-ports", sock, strings.Repeat("1", 100<<10) + ":80/tcp"}, "out of range"},
		{"bad second spec undoes the first", []string{"add-ports", sock, fmt.Sprintf("127.0.0.1:%d:80/tcp", freePort(t)), "x:80/tcp"}, "error:"},
		{"remove non-number", []string{"remove-ports", sock, "../1"}, "error:"},
		{"remove overflowing", []string{"remove-ports", sock, "99999999999999999999"}, "error:"},
		{"socket path traversal", []string{"list-ports", "--socket=" + d.dir + "/../../../../etc/passwd"}, "error:"},
		{"socket is a file", []string{"list-ports", "--socket=" + victim}, "error:"},
		{"daemon state dir is a symlink", []string{"daemon", "--state-dir", link, "--port-driver", "none"}, "symlink"},
		{"daemon state dir is a file", []string{"daemon", "--state-dir", victim, "--port-driver", "none"}, "error:"},
		{"daemon state dir in use", []string{"daemon", "--state-dir", d.dir, "--port-driver", "none"}, "already served"},
		{"daemon netns is not a netns", []string{"daemon", "--state-dir", filepath.Join(home, "st2"), "--port-driver", "builtin", "--netns", victim}, "error:"},
		{"daemon netns traversal", []string{"daemon", "--state-dir", filepath.Join(home, "st3"), "--port-driver", "builtin", "--netns", "/proc/self/../1/ns/net"}, "error:"},
		{"daemon unknown driver", []string{"daemon", "--state-dir", filepath.Join(home, "st4"), "--port-driver", "../../bin/sh"}, "unknown port driver"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := u.Cmd(bin, tc.args...)
			var stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = io.Discard, &stderr
			done := make(chan error, 1)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			go func() { done <- cmd.Wait() }()
			var err error
			select {
			case err = <-done:
			case <-time.After(60 * time.Second):
				cmd.Process.Kill()
				<-done
				t.Fatalf("portkit %s hung", tc.name)
			}
			msg := strings.TrimSpace(stderr.String())
			if len(msg) > 300 {
				msg = msg[:300] + "…"
			}
			t.Logf("exit %v: %s", cmd.ProcessState.ExitCode(), msg)
			if err == nil || cmd.ProcessState.ExitCode() != 1 {
				t.Errorf("exit %v, want 1", err)
			}
			if !strings.Contains(stderr.String(), tc.want) || !strings.HasPrefix(stderr.String(), "error: ") {
				t.Errorf("stderr %q, want \"error: …\" mentioning %q", msg, tc.want)
			}
		})
	}
	if got := d.list(t); strings.Join(got, "\n") != strings.Join(listBefore, "\n") {
		t.Errorf("the port list changed:\n%v\nwas\n%v", got, listBefore)
	}
	if diff := diffSnapshots(stateBefore, snapshotDirs(t, d.dir, home)); len(diff) > 0 {
		t.Errorf("files changed: %v", diff)
	}
}

// runPlugin runs a CNI plugin binary directly, as a runtime would, as u.
func runPlugin(t *testing.T, u *testenv.User, bin string, env map[string]string, stdin []byte) (stdout, stderr string, code int) {
	t.Helper()
	cmd := u.Cmd(bin)
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdin = bytes.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%s hung on hostile input", filepath.Base(bin))
	}
	return o.String(), e.String(), cmd.ProcessState.ExitCode()
}

// TestHostileCNIInputIsRefused runs the plugins with hostile configs and
// environments: each answers with a CNI error object (code and message)
// and exit 1, creates no state and starts no process.
func TestHostileCNIInputIsRefused(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireRoot(t)
	ns := testenv.ChildNetns(t, u)
	usernet, portdriver := testenv.Binary(t, "usernet"), testenv.Binary(t, "portdriver")
	pluginDir := filepath.Dir(usernet)
	home := u.Dir(t)
	shadowLike := filepath.Join(home, "secret")
	os.WriteFile(shadowLike, []byte("root-only"), 0o600) // owned by root
	nsLink := filepath.Join(home, "nslink")
	os.Symlink("/proc/1/ns/net", nsLink)
	prev := `{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"` + ns.Path + `"}],"ips":[{"address":"10.0.2.100/24","interface":0}]}`
	goodPort := freePort(t)
	pm := func(m string) string {
		return `{"cniVersion":"1.1.0","name":"hostile","type":"portdriver","driver":"builtin","prevResult":` + prev + `,"runtimeConfig":{"portMappings":[` + m + `]}}`
	}
	un := func(fields string) string {
		return `{"cniVersion":"1.1.0","name":"hostile","type":"usernet"` + fields + `}`
	}
	env := func(over map[string]string) map[string]string {
		e := map[string]string{"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr-hostile", "CNI_NETNS": ns.Path, "CNI_IFNAME": "eth0", "CNI_PATH": pluginDir}
		for k, v := range over {
			e[k] = v
		}
		return e
	}
	for _, tc := range []struct {
		name   string
		plugin string
		env    map[string]string
		stdin  string
	}{
		{"huge config", usernet, env(nil), un(`,"pad":"` + strings.Repeat("x", 16<<20) + `"`)},
		{"deep config", usernet, env(nil), deepJSON(100000)},
		{"not JSON", usernet, env(nil), "\x00\xff{"},
		{"negative mtu", usernet, env(nil), un(`,"mtu":-1`)},
		{"overflowing mtu", usernet, env(nil), un(`,"mtu":99999999999999999999`)},
		{"NUL in backend", usernet, env(nil), un(`,"backend":"slirp4netns\u0000"`)},
		{"backend is a path", usernet, env(nil), un(`,"backend":"../../../bin/sh"`)},
		{"network name traversal", usernet, env(map[string]string{"CNI_NETNS": nsLink}), `{"cniVersion":"1.1.0","name":"../../../etc","type":"usernet"}`},
		{"netns is the host's (symlink)", usernet, env(map[string]string{"CNI_NETNS": nsLink}), un("")},
		{"netns is a file", usernet, env(map[string]string{"CNI_NETNS": shadowLike}), un("")},
		{"netns traversal", usernet, env(map[string]string{"CNI_NETNS": "/proc/self/../1/ns/net"}), un("")},
		{"container ID traversal", usernet, env(map[string]string{"CNI_CONTAINERID": "../../etc/passwd"}), un("")},
		{"container ID with a space", usernet, env(map[string]string{"CNI_CONTAINERID": "ctr hostile"}), un("")},
		{"ifname traversal", usernet, env(map[string]string{"CNI_IFNAME": "../eth0"}), un("")},
		{"negative hostPort", portdriver, env(nil), pm(`{"hostPort":-1,"containerPort":80}`)},
		{"hostPort 65536", portdriver, env(nil), pm(`{"hostPort":65536,"containerPort":80}`)},
		{"overflowing hostPort", portdriver, env(nil), pm(`{"hostPort":1e30,"containerPort":80}`)},
		{"sctp", portdriver, env(nil), pm(fmt.Sprintf(`{"hostPort":%d,"containerPort":80,"protocol":"sctp"}`, goodPort))},
		{"NUL in hostIP", portdriver, env(nil), pm(fmt.Sprintf(`{"hostPort":%d,"containerPort":80,"hostIP":"127.0.0.1\u0000"}`, goodPort))},
		{"unknown mapping key", portdriver, env(nil), pm(fmt.Sprintf(`{"hostPort":%d,"containerPort":80,"cmd":"sh"}`, goodPort))},
		{"conflicting mappings", portdriver, env(nil), pm(fmt.Sprintf(`{"hostPort":%d,"containerPort":80},{"hostPort":%d,"containerPort":81}`, goodPort, goodPort))},
		{"driver is a path", portdriver, env(nil), `{"cniVersion":"1.1.0","name":"hostile","type":"portdriver","driver":"../../bin/sh","prevResult":` + prev + `}`},
		{"unknown cniVersion", usernet, env(nil), `{"cniVersion":"9.9.9","name":"hostile","type":"usernet"}`},
		{"unknown command", usernet, env(map[string]string{"CNI_COMMAND": "EXEC"}), un("")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshotDirs(t, userStateBases(u)...)
			pidsBefore := snapshotState(u).pids
			stdout, stderr, code := runPlugin(t, u, tc.plugin, tc.env, []byte(tc.stdin))
			var e struct {
				Code *int   `json:"code"`
				Msg  string `json:"msg"`
			}
			jerr := json.Unmarshal([]byte(stdout), &e)
			show := e.Msg
			if len(show) > 200 {
				show = show[:200] + "…"
			}
			c := -1
			if e.Code != nil {
				c = *e.Code
			}
			t.Logf("exit %d, code %d: %s", code, c, show)
			if code == 0 || jerr != nil || e.Code == nil || *e.Code == 0 || e.Msg == "" {
				t.Errorf("exit %d, stdout %.300q, stderr %.300q: want a CNI error object and a non-zero exit", code, stdout, stderr)
			}
			if diff := diffSnapshots(before, snapshotDirs(t, userStateBases(u)...)); len(diff) > 0 {
				t.Errorf("state changed: %v", diff)
			}
			if procs := ourProcesses(pluginDir, 0, pidsBefore); len(procs) > 0 {
				t.Errorf("processes left: %v", procs)
			}
		})
	}
}

// TestHostileOCIHookInputIsRefused runs portkit-oci-hook createRuntime as
// the user with hostile states and annotations: each fails (exit 1) with a
// message naming what is wrong, starts nothing and leaves no state.
func TestHostileOCIHookInputIsRefused(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireRoot(t)
	hook := testenv.Binary(t, "portkit-oci-hook")
	pluginDir := filepath.Dir(hook)
	ns := testenv.ChildNetns(t, u)
	home := u.Dir(t)
	bundle := filepath.Join(home, "bundle")
	os.Mkdir(bundle, 0o700)
	os.Symlink("/etc/shadow", filepath.Join(bundle, "config.json"))
	exec.Command("chown", "-hR", fmt.Sprintf("%d:%d", u.UID, u.GID), bundle).Run()
	stateJSON := func(id string, pid int, bundle string, ann map[string]string) string {
		b, _ := json.Marshal(map[string]any{"ociVersion": "1.0.2", "id": id, "status": "creating", "pid": pid, "bundle": bundle, "annotations": ann})
		return string(b)
	}
	good := map[string]string{"io.portkit.net": "slirp4netns"}
	with := func(k, v string) map[string]string {
		m := map[string]string{"io.portkit.net": "slirp4netns"}
		m[k] = v
		return m
	}
	for _, tc := range []struct {
		name, stdin, want string
	}{
		{"huge state", `{"id":"x","pad":"` + strings.Repeat("x", 4<<20) + `"}`, "state"},
		{"deep state", deepJSON(100000), "state"},
		{"not JSON", "\x00\xff", "state"},
		{"id traversal", stateJSON("../../../tmp/evil", ns.PID, "", good), "id"},
		{"id with NUL", stateJSON("a\x00b", ns.PID, "", good), "id"},
		{"id dot-dot", stateJSON("..", ns.PID, "", good), "id"},
		{"negative pid", stateJSON("ctr-h1", -1, "", good), "pid"},
		{"host pid 1", stateJSON("ctr-h2", 1, "", good), "ctr-h2"},
		{"pid of nobody's process", stateJSON("ctr-h3", os.Getpid(), "", good), "ctr-h3"},
		{"bundle config is a symlink to /etc/shadow", stateJSON("ctr-h4", ns.PID, bundle, nil), "config"},
		{"bundle traversal", stateJSON("ctr-h5", ns.PID, "/proc/self/../../etc", nil), "config"},
		{"65,535-port range", stateJSON("ctr-h6", ns.PID, "", with("io.portkit.ports", "1-65535:1-65535/tcp")), ""},
		{"port out of range", stateJSON("ctr-h7", ns.PID, "", with("io.portkit.ports", "99999:80/tcp")), "io.portkit.ports"},
		{"negative port", stateJSON("ctr-h8", ns.PID, "", with("io.portkit.ports", "-1:80/tcp")), "io.portkit.ports"},
		{"unknown proto", stateJSON("ctr-h9", ns.PID, "", with("io.portkit.ports", "8080:80/sctp")), "io.portkit.ports"},
		{"NUL in ports", stateJSON("ctr-h10", ns.PID, "", with("io.portkit.ports", "8080:80/tcp\x00")), "io.portkit.ports"},
		{"negative mtu", stateJSON("ctr-h11", ns.PID, "", with("io.portkit.mtu", "-1")), "io.portkit.mtu"},
		{"overflowing mtu", stateJSON("ctr-h12", ns.PID, "", with("io.portkit.mtu", "99999999999999999999")), "io.portkit.mtu"},
		{"net is a path", stateJSON("ctr-h13", ns.PID, "", map[string]string{"io.portkit.net": "../../bin/sh"}), "io.portkit.net"},
		{"driver is a path", stateJSON("ctr-h14", ns.PID, "", with("io.portkit.port-driver", "/bin/sh")), "io.portkit.port-driver"},
		{"bool is not a bool", stateJSON("ctr-h15", ns.PID, "", with("io.portkit.disable-host-loopback", "yes please")), "io.portkit.disable-host-loopback"},
		{"huge annotation", stateJSON("ctr-h16", ns.PID, "", with("io.portkit.ports", strings.Repeat("8080:80/tcp,", 50000))), "8080:80/tcp"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshotDirs(t, userStateBases(u)...)
			pidsBefore := snapshotState(u).pids
			cmd := u.Cmd(hook, "createRuntime")
			cmd.Stdin = strings.NewReader(tc.stdin)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			done := make(chan error, 1)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			go func() { done <- cmd.Wait() }()
			var err error
			select {
			case err = <-done:
			case <-time.After(90 * time.Second):
				cmd.Process.Kill()
				<-done
				t.Fatal("the hook hung")
			}
			msg := strings.TrimSpace(out.String())
			if len(msg) > 300 {
				msg = msg[:300] + "…"
			}
			t.Logf("exit %d: %s", cmd.ProcessState.ExitCode(), msg)
			if err == nil {
				// Poststop so that a wrongly accepted container is not left running.
				st := u.Cmd(hook, "poststop")
				st.Stdin = strings.NewReader(tc.stdin)
				st.Run()
				t.Errorf("the hook accepted it")
			} else if !strings.Contains(out.String(), tc.want) {
				t.Errorf("message %q does not mention %q", msg, tc.want)
			}
			if diff := diffSnapshots(before, snapshotDirs(t, userStateBases(u)...)); len(diff) > 0 {
				t.Errorf("state changed: %v", diff)
			}
			if procs := ourProcesses(pluginDir, ns.PID, pidsBefore); len(procs) > 0 {
				t.Errorf("processes left: %v", procs)
			}
		})
	}
}
