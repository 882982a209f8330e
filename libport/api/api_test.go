package api_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/portkit/portkit/libport"
	"github.com/portkit/portkit/libport/api"
	"github.com/portkit/portkit/libport/api/apitest"
)

// privateDir returns a new directory with mode 0700, as a state directory has.
func privateDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

// serve starts an API server over a table with d in a private temp dir and
// returns its socket.
func serve(t *testing.T, d libport.Driver, info func() api.Info) string {
	t.Helper()
	sock := filepath.Join(privateDir(t), "api.sock")
	apitest.Serve(t, sock, api.NewServer(apitest.NewTable(t, d), info))
	return sock
}

type reply struct {
	code        int
	contentType string
	allow       string
	body        string
}

// raw sends one request over the socket and returns the reply as bytes,
// so tests see exactly what a client of RootlessKit's API would.
func raw(t *testing.T, sock, method, path, body string) reply {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}, Timeout: 30 * time.Second}
	req, err := http.NewRequest(method, "http://rootlesskit"+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return reply{resp.StatusCode, resp.Header.Get("Content-Type"), resp.Header.Get("Allow"), string(b)}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func TestInfo(t *testing.T) {
	sock := serve(t, apitest.NewEchoDriver(), func() api.Info {
		return api.Info{
			StateDir: "/run/user/1000/portkit",
			ChildPID: 4242,
			NetworkDriver: &api.NetworkDriverInfo{
				Driver:  "slirp4netns",
				DNS:     []net.IP{net.ParseIP("10.0.2.3")},
				ChildIP: net.ParseIP("10.0.2.100"),
			},
		}
	})
	r := raw(t, sock, "GET", "/v1/info", "")
	want := `{"apiVersion":"1.1.1","version":"` + api.ImplementationVersion + `","stateDir":"/run/user/1000/portkit","childPID":4242,` +
		`"networkDriver":{"driver":"slirp4netns","dns":["10.0.2.3"],"childIP":"10.0.2.100"},` +
		`"portDriver":{"driver":"echo","protos":["tcp","tcp4","tcp6","udp","udp4","udp6"]}}`
	if r.code != 200 || r.contentType != "application/json" || r.body != want {
		t.Fatalf("GET /v1/info = %d %s %s\nwant 200 application/json %s", r.code, r.contentType, r.body, want)
	}
}

// TestInfoAlwaysHasBothDrivers: nerdctl reads networkDriver.childIP and
// portDriver.disallowLoopbackChildIP without nil checks.
func TestInfoAlwaysHasBothDrivers(t *testing.T) {
	sock := serve(t, libport.NoneDriver{}, nil)
	r := raw(t, sock, "GET", "/v1/info", "")
	want := `{"apiVersion":"1.1.1","version":"` + api.ImplementationVersion + `","stateDir":"","childPID":0,` +
		`"networkDriver":{"driver":""},"portDriver":{"driver":"none","protos":[]}}`
	if r.code != 200 || r.body != want {
		t.Fatalf("GET /v1/info = %d %s, want 200 %s", r.code, r.body, want)
	}
	// A driver that leaves protos nil still lists them, as an empty list.
	sock = serve(t, libport.NoneDriver{}, func() api.Info {
		return api.Info{Version: "9.9", PortDriver: &libport.DriverInfo{Driver: "odd", DisallowLoopbackChildIP: true}}
	})
	r = raw(t, sock, "GET", "/v1/info", "")
	want = `{"apiVersion":"1.1.1","version":"9.9","stateDir":"","childPID":0,` +
		`"networkDriver":{"driver":""},"portDriver":{"driver":"odd","protos":[],"disallowLoopbackChildIP":true}}`
	if r.body != want {
		t.Fatalf("GET /v1/info = %s, want %s", r.body, want)
	}
}

func TestPortsLifecycle(t *testing.T) {
	sock := serve(t, apitest.NewEchoDriver(), nil)
	if r := raw(t, sock, "GET", "/v1/ports", ""); r.code != 200 || r.body != "null" || r.contentType != "application/json" {
		t.Fatalf("GET /v1/ports on an empty table = %d %q %q, want 200 null", r.code, r.contentType, r.body)
	}
	port := freePort(t)
	body := fmt.Sprintf(`{"proto":"tcp","parentIP":"127.0.0.1","parentPort":%d,"childPort":80}`, port)
	r := raw(t, sock, "POST", "/v1/ports", body)
	want := fmt.Sprintf(`{"id":1,"spec":{"proto":"tcp","parentIP":"127.0.0.1","parentPort":%d,"childPort":80}}`, port)
	if r.code != 201 || r.body != want || r.contentType != "application/json" {
		t.Fatalf("POST /v1/ports = %d %s, want 201 %s", r.code, r.body, want)
	}
	// The port is really published.
	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatalf("published port: %v", err)
	}
	c.Close()
	body2 := fmt.Sprintf(`{"proto":"udp6","parentIP":"::1","parentPort":%d,"childIP":"::1","childPort":53}`, port)
	if r := raw(t, sock, "POST", "/v1/ports", body2); r.code != 201 {
		t.Fatalf("POST udp6: %d %s", r.code, r.body)
	}
	r = raw(t, sock, "GET", "/v1/ports", "")
	want = fmt.Sprintf(`[{"id":1,"spec":{"proto":"tcp","parentIP":"127.0.0.1","parentPort":%d,"childPort":80}},`+
		`{"id":2,"spec":{"proto":"udp6","parentIP":"::1","parentPort":%d,"childPort":53,"childIP":"::1"}}]`, port, port)
	if r.code != 200 || r.body != want {
		t.Fatalf("GET /v1/ports = %d %s, want 200 %s", r.code, r.body, want)
	}
	if r := raw(t, sock, "DELETE", "/v1/ports/1", ""); r.code != 200 || r.body != "" {
		t.Fatalf("DELETE /v1/ports/1 = %d %q, want 200 and no body", r.code, r.body)
	}
	if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
		c.Close()
		t.Fatalf("port %d still answers after DELETE", port)
	}
	if r := raw(t, sock, "DELETE", "/v1/ports/2", ""); r.code != 200 {
		t.Fatalf("DELETE /v1/ports/2 = %d %s", r.code, r.body)
	}
	if r := raw(t, sock, "GET", "/v1/ports", ""); r.body != "null" {
		t.Fatalf("GET /v1/ports after removing all = %s, want null", r.body)
	}
}

func TestErrors(t *testing.T) {
	echo := serve(t, apitest.NewEchoDriver(), nil)
	none := serve(t, libport.NoneDriver{}, nil)
	port := freePort(t)
	if r := raw(t, echo, "POST", "/v1/ports", fmt.Sprintf(`{"proto":"tcp","parentPort":%d,"childPort":80}`, port)); r.code != 201 {
		t.Fatalf("setup: %d %s", r.code, r.body)
	}
	for _, tc := range []struct {
		sock, method, path, body string
		code                     int
		message                  string
	}{
		{none, "POST", "/v1/ports", `{"proto":"tcp","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}`, 400,
			"no PortDriver is available"},
		{echo, "POST", "/v1/ports", "garbage", 400,
			"bad port spec: invalid JSON at byte 1: invalid character 'g' looking for beginning of value"},
		{echo, "POST", "/v1/ports", "", 400,
			`bad port spec: empty request body: send a JSON object such as {"proto":"tcp","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}`},
		{echo, "POST", "/v1/ports", `{"proto":"tcp"`, 400, "bad port spec: the JSON ends early: unexpected EOF"},
		{echo, "POST", "/v1/ports", `{"proto":"tcp","parentPort":1,"childPort":1,"hostPort":1}`, 400,
			`bad port spec: json: unknown field "hostPort"`},
		{echo, "POST", "/v1/ports", `{"proto":"tcp","parentPort":"8080","childPort":80}`, 400,
			`bad port spec: field "parentPort": want int, got string`},
		{echo, "POST", "/v1/ports", `{"proto":"tcp","parentPort":1e9999,"childPort":80}`, 400,
			`bad port spec: field "parentPort": want int, got number 1e9999`},
		{echo, "POST", "/v1/ports", `[1]`, 400, "bad port spec: want a JSON object, got array"},
		{echo, "POST", "/v1/ports", `{"proto":"tcp","parentPort":1,"childPort":1} {}`, 400,
			"bad port spec: more than one JSON value in the request body: send one object"},
		{echo, "POST", "/v1/ports", `null`, 400, "bad port spec: want a JSON object, got null"},
		{echo, "POST", "/v1/ports", `{}`, 400, `port spec 0:0/: unknown protocol "": want one of tcp, tcp4, tcp6, udp, udp4, udp6`},
		{echo, "POST", "/v1/ports", `{"proto":"sctp","parentPort":8080,"childPort":80}`, 400,
			`port spec 8080:80/sctp: unknown protocol "sctp": want one of tcp, tcp4, tcp6, udp, udp4, udp6`},
		{echo, "POST", "/v1/ports", `{"proto":"tcp4","parentIP":"::1","parentPort":8080,"childPort":80}`, 400,
			"port spec [::1]:8080:80/tcp4: parent IP ::1 is IPv6 but the protocol is IPv4-only: use tcp6/udp6 or an IPv4 address"},
		{echo, "POST", "/v1/ports", fmt.Sprintf(`{"proto":"tcp6","parentIP":"::1","parentPort":%d,"childPort":81}`, port), 400,
			fmt.Sprintf("port spec [::1]:%d:81/tcp6 conflicts with port 1 (%d:80/tcp)", port, port)},
		{echo, "POST", "/v1/ports", `{"proto":"tcp","parentPort":` + strings.Repeat(" ", api.MaxBodyBytes) + `1}`, 413,
			"bad port spec: request body over 1048576 bytes: http: request body too large"},
		{echo, "DELETE", "/v1/ports/x", "", 400, `bad id "x": a port ID is a number, as list-ports shows`},
		{echo, "DELETE", "/v1/ports/99", "", 400, "unknown id: 99"},
		{echo, "DELETE", "/v1/ports/", "", 400, `bad id "": a port ID is a number, as list-ports shows`},
		{none, "DELETE", "/v1/ports/1", "", 400, "unknown id: 1"},
		{echo, "DELETE", "/v1/ports/1/2", "", 404,
			`no such API path "/v1/ports/1/2": this socket serves RootlessKit's API v1 (/v1/info, /v1/ports, /v1/ports/{id})`},
		{echo, "GET", "/v2/info", "", 404,
			`no such API path "/v2/info": this socket serves RootlessKit's API v1 (/v1/info, /v1/ports, /v1/ports/{id})`},
		{echo, "PUT", "/v1/ports", "", 405, "method PUT is not allowed on /v1/ports: use GET or POST"},
		{echo, "POST", "/v1/info", "", 405, "method POST is not allowed on /v1/info: use GET"},
		{echo, "GET", "/v1/ports/1", "", 405, "method GET is not allowed on /v1/ports/1: use DELETE"},
	} {
		r := raw(t, tc.sock, tc.method, tc.path, tc.body)
		b, _ := json.Marshal(map[string]string{"message": tc.message})
		want := string(b) + "\n"
		if r.code != tc.code || r.body != want || r.contentType != "application/json" {
			t.Errorf("%s %s %.60q = %d %s %s\nwant %d application/json %s", tc.method, tc.path, tc.body,
				r.code, r.contentType, r.body, tc.code, want)
		}
		if tc.code == 405 && r.allow == "" {
			t.Errorf("%s %s: 405 without an Allow header", tc.method, tc.path)
		}
	}
	// Nothing of the refused requests stayed.
	if r := raw(t, echo, "GET", "/v1/ports", ""); !strings.HasPrefix(r.body, `[{"id":1,`) || strings.Count(r.body, `"id"`) != 1 {
		t.Fatalf("after refused requests: %s", r.body)
	}
}

func TestClient(t *testing.T) {
	ctx := context.Background()
	sock := serve(t, apitest.NewEchoDriver(), func() api.Info {
		return api.Info{StateDir: "/state", ChildPID: 7, NetworkDriver: &api.NetworkDriverInfo{Driver: "pasta", ChildIP: net.ParseIP("10.0.2.100")}}
	})
	c := api.NewClient(sock)
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.APIVersion != api.APIVersion || info.StateDir != "/state" || info.ChildPID != 7 ||
		info.NetworkDriver == nil || info.NetworkDriver.Driver != "pasta" || !info.NetworkDriver.ChildIP.Equal(net.ParseIP("10.0.2.100")) ||
		info.PortDriver == nil || info.PortDriver.Driver != "echo" || len(info.PortDriver.Protos) != 6 {
		t.Fatalf("Info = %+v", info)
	}
	list, err := c.ListPorts(ctx)
	if err != nil || list != nil {
		t.Fatalf("ListPorts on an empty table = %v, %v; want nil", list, err)
	}
	port := freePort(t)
	spec := libport.Spec{Proto: "tcp4", ParentIP: "127.0.0.1", ParentPort: port, ChildPort: 80}
	st, err := c.AddPort(ctx, spec)
	if err != nil || st.ID != 1 || st.Spec != spec {
		t.Fatalf("AddPort = %+v, %v", st, err)
	}
	_, err = c.AddPort(ctx, spec)
	var apiErr *api.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 400 ||
		err.Error() != fmt.Sprintf("port spec 127.0.0.1:%d:80/tcp4 conflicts with port 1 (127.0.0.1:%d:80/tcp4)", port, port) {
		t.Fatalf("AddPort of a conflicting spec: %#v", err)
	}
	list, err = c.ListPorts(ctx)
	if err != nil || len(list) != 1 || list[0] != st {
		t.Fatalf("ListPorts = %v, %v", list, err)
	}
	if err := c.RemovePort(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := c.RemovePort(ctx, 1); err == nil || err.Error() != "unknown id: 1" {
		t.Fatalf("RemovePort of a removed ID: %v, want the server's unknown id: 1", err)
	}
}

func TestClientConnectionErrors(t *testing.T) {
	dir := privateDir(t)
	missing := filepath.Join(dir, "api.sock")
	_, err := api.NewClient(missing).Info(context.Background())
	if err == nil || !strings.Contains(err.Error(), missing) || !strings.Contains(err.Error(), "is the daemon running") {
		t.Fatalf("Info on a missing socket: %v", err)
	}
	// A socket whose server died.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	_, err = api.NewClient(stale).ListPorts(context.Background())
	if err == nil || !strings.Contains(err.Error(), "nothing listens on it") {
		t.Fatalf("ListPorts on a stale socket: %v", err)
	}
	// A server that is not RootlessKit's API.
	other := filepath.Join(dir, "other.sock")
	apitest.Serve(t, other, http.NotFoundHandler())
	err = api.NewClient(other).RemovePort(context.Background(), 3)
	if err == nil || !strings.Contains(err.Error(), `unexpected HTTP status 404 Not Found, body "404 page not found\n"`) {
		t.Fatalf("RemovePort on a foreign server: %v", err)
	}
}

func TestServeSocketModeAndCleanup(t *testing.T) {
	dir := privateDir(t)
	sock := filepath.Join(dir, "api.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- api.Serve(ctx, sock, api.NewServer(libport.NewTable(libport.NoneDriver{}), nil)) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := api.NewClient(sock).Info(ctx); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("server did not come up")
		}
		time.Sleep(5 * time.Millisecond)
	}
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("API socket mode %v, want a socket with 0600", fi.Mode())
	}
	// A second server on the same path must not steal the socket.
	if err := api.Serve(ctx, sock, http.NotFoundHandler()); err == nil || !strings.Contains(err.Error(), "another server is listening") {
		t.Fatalf("second Serve on a live socket: %v", err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left behind after shutdown: %v", err)
	}
}

func TestListenRefuses(t *testing.T) {
	loose := t.TempDir()
	if err := os.Chmod(loose, 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := api.Listen(filepath.Join(loose, "api.sock"))
	if err == nil || !strings.Contains(err.Error(), "has mode 0755") || !strings.Contains(err.Error(), "chmod 700 "+loose) {
		t.Fatalf("Listen in a 0755 directory: %v", err)
	}

	dir := privateDir(t)
	file := filepath.Join(dir, "api.sock")
	if err := os.WriteFile(file, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := api.Listen(file); err == nil || !strings.Contains(err.Error(), "is not a socket") {
		t.Fatalf("Listen over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(file); string(b) != "precious" {
		t.Fatal("Listen replaced a regular file")
	}

	if _, err := api.Listen(filepath.Join(dir, "missing", "api.sock")); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("Listen in a missing directory: %v", err)
	}
	long := filepath.Join(dir, strings.Repeat("x", 120), "api.sock")
	if _, err := api.Listen(long); err == nil || !strings.Contains(err.Error(), "use a shorter state directory") {
		t.Fatalf("Listen on a long path: %v", err)
	}

	// A stale socket (its server died) is replaced.
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	l, err = api.Listen(stale)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	l.Close()
}
