package integration

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
)

// hostHTTPServer serves "hello from the host" on host loopback for the
// container to reach through its network driver.
func hostHTTPServer(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "hello from the host")
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return l.Addr().(*net.TCPAddr).Port
}

// TestPublishThroughOCIHook runs real rootless runc and crun containers whose
// bundles carry the hook and io.portkit.* annotations, and checks what a user
// would: the published TCP and UDP ports reach echod in the container, the
// client address it sees is the one the README promises, the container
// reaches a host server, and kill+delete leaves nothing of ours behind.
func TestPublishThroughOCIHook(t *testing.T) {
	testenv.RequireRoot(t)
	rootlessctl := testenv.RequireBinary(t, "rootlessctl")
	u := testenv.Unprivileged(t)
	cases := []struct {
		net, driver string
		// gateway is the address the container dials to reach host loopback
		// (empty: read the default route).
		gateway string
		// client is the address echod sees for a 127.0.0.1 client.
		client string
		// sameUDPPort: publish UDP on the container's own port number. Debian
		// 12's pasta (2023-03-09) drops the replies of a loopback UDP flow
		// whose port it translates (47001→9000 loses them, 47001→47001 works).
		sameUDPPort bool
	}{
		{net: "slirp4netns", driver: "builtin", gateway: "10.0.2.2", client: "127.0.0.1"},
		{net: "slirp4netns", driver: "slirp4netns", gateway: "10.0.2.2", client: "10.0.2.2"},
		{net: "pasta", driver: "implicit", client: "127.0.0.1", sameUDPPort: true},
	}
	for _, rt := range ociRuntimes {
		for _, tc := range cases {
			t.Run(rt.name+"/"+tc.net+"+"+tc.driver, func(t *testing.T) {
				testenv.RequireBinary(t, tc.net)
				tcpPort, udpPort := freePort(t), freePort(t)
				xdg := u.Dir(t)
				childUDP := 9000
				if tc.sameUDPPort {
					childUDP = udpPort
				}
				annotations := map[string]string{
					"io.portkit.net":         tc.net,
					"io.portkit.port-driver": tc.driver,
					"io.portkit.ports":       fmt.Sprintf("127.0.0.1:%d:8080/tcp,127.0.0.1:%d:%d/udp", tcpPort, udpPort, childUDP),
				}
				b := newOCIBundle(t, rt, u, annotations, "/echod", "-tcp", ":8080", "-udp", fmt.Sprintf(":%d", childUDP))
				b.setHookEnv(t, "XDG_RUNTIME_DIR="+xdg)
				b.start(t)
				stateDir := filepath.Join(xdg, "portkit", "oci", b.id)

				reply, err := askTCPRetry(fmt.Sprintf("127.0.0.1:%d", tcpPort), "ping", 10*time.Second)
				if err != nil {
					t.Fatalf("TCP through the published port: %v", err)
				}
				if !strings.HasPrefix(reply, tc.client+":") || !strings.HasSuffix(reply, " ping") {
					t.Errorf("TCP reply %q: want the server to see the client as %s (README driver table)", reply, tc.client)
				}
				reply, err = askUDP(fmt.Sprintf("127.0.0.1:%d", udpPort), "ping")
				if err != nil {
					t.Fatalf("UDP through the published port: %v", err)
				}
				if !strings.HasPrefix(reply, tc.client+":") || !strings.HasSuffix(reply, " ping") {
					t.Errorf("UDP reply %q: want the server to see the client as %s", reply, tc.client)
				}

				hostPort := hostHTTPServer(t)
				gw := tc.gateway
				if gw == "" {
					gw = b.defaultGateway(t)
				}
				// busybox-static's wget segfaults in Debian 12; speak HTTP with
				// nc. Its input stays open for a while: nc half-closes at the
				// end of its input, and Debian 12's pasta then never passes
				// on the server's close (nor, reliably, its reply).
				out, err := b.run("exec", b.id, "sh", "-c",
					fmt.Sprintf(`{ printf 'GET / HTTP/1.0\r\n\r\n'; sleep 2; } | nc -w 5 %s %d`, gw, hostPort))
				if err != nil || !strings.Contains(out, "hello from the host") {
					t.Errorf("container → host server at %s:%d: %v: %q", gw, hostPort, err, out)
				}

				// The attachment's API socket serves rootlessctl, unmodified.
				ctl := func(args ...string) (string, error) {
					out, err := u.Cmd(rootlessctl, append([]string{"--socket", filepath.Join(stateDir, "api.sock")}, args...)...).CombinedOutput()
					return string(out), err
				}
				if out, err := ctl("list-ports"); err != nil || !strings.Contains(out, fmt.Sprint(tcpPort)) {
					t.Errorf("rootlessctl list-ports: %v:\n%s", err, out)
				}
				ports := []int{tcpPort}
				if tc.driver != "implicit" { // pasta takes its ports at start only
					added := freePort(t)
					if out, err := ctl("add-ports", fmt.Sprintf("127.0.0.1:%d:8080/tcp", added)); err != nil {
						t.Errorf("rootlessctl add-ports: %v:\n%s", err, out)
					} else if reply, err := askTCP(fmt.Sprintf("127.0.0.1:%d", added), "added"); err != nil || !strings.HasSuffix(reply, " added") {
						t.Errorf("through the port rootlessctl added: %q, %v", reply, err)
					}
					ports = append(ports, added)
				}

				procs := testenv.AttachmentProcesses(t, stateDir)
				if len(procs) == 0 {
					t.Fatalf("no forwarder processes recorded in %s", stateDir)
				}
				b.stop(t)
				testenv.WaitGone(t, procs, 5*time.Second)
				if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
					t.Errorf("state dir %s still there after poststop (err %v)", stateDir, err)
				}
				for _, p := range ports {
					if _, err := askTCP(fmt.Sprintf("127.0.0.1:%d", p), "ping"); err == nil {
						t.Errorf("port %d still answers after the container was deleted", p)
					}
				}
			})
		}
	}
}

// TestOCIHookDefaultStateDir runs the hooks as installed, without
// XDG_RUNTIME_DIR (runc and crun give a hook only its own env): the state
// lands in the user's fallback directory, where crun's createContainer hook
// finds it from inside the container, and poststop removes it.
func TestOCIHookDefaultStateDir(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "slirp4netns")
	u := testenv.Unprivileged(t)
	for _, rt := range ociRuntimes {
		t.Run(rt.name, func(t *testing.T) {
			port := freePort(t)
			annotations := map[string]string{"io.portkit.ports": fmt.Sprintf("127.0.0.1:%d:8080/tcp", port)}
			b := newOCIBundle(t, rt, u, annotations, "/echod", "-tcp", ":8080")
			b.start(t)
			var stateDir string
			for _, base := range []string{fmt.Sprintf("/run/user/%d/portkit", u.UID), fmt.Sprintf("/tmp/portkit-%d", u.UID)} {
				if _, err := os.Stat(filepath.Join(base, "oci", b.id, "api.sock")); err == nil {
					stateDir = filepath.Join(base, "oci", b.id)
					break
				}
			}
			if stateDir == "" {
				t.Fatalf("no state dir with api.sock for %s under /run/user/%d/portkit or /tmp/portkit-%d", b.id, u.UID, u.UID)
			}
			if reply, err := askTCPRetry(fmt.Sprintf("127.0.0.1:%d", port), "ping", 10*time.Second); err != nil || !strings.HasPrefix(reply, "127.0.0.1:") || !strings.HasSuffix(reply, " ping") {
				t.Fatalf("TCP through the published port: %q, %v", reply, err)
			}
			procs := testenv.AttachmentProcesses(t, stateDir)
			b.stop(t)
			testenv.WaitGone(t, procs, 5*time.Second)
			if _, err := os.Stat(stateDir); !os.IsNotExist(err) {
				t.Errorf("state dir %s still there after poststop (err %v)", stateDir, err)
			}
		})
	}
}

// TestOCIHookRejectsBadPortsAnnotation: a bundle whose io.portkit.ports is
// wrong does not start, the error names the annotation, and nothing is left.
func TestOCIHookRejectsBadPortsAnnotation(t *testing.T) {
	testenv.RequireRoot(t)
	u := testenv.Unprivileged(t)
	for _, rt := range ociRuntimes {
		t.Run(rt.name, func(t *testing.T) {
			xdg := u.Dir(t)
			annotations := map[string]string{"io.portkit.ports": "8080:80/sctp"}
			b := newOCIBundle(t, rt, u, annotations, "/echod", "-tcp", ":8080")
			b.setHookEnv(t, "XDG_RUNTIME_DIR="+xdg)
			b.runFails(t, xdg, `io.portkit.ports="8080:80/sctp"`)
		})
	}
}

// TestOCIHookTakenPortLeavesNothing: a published port that another process
// holds makes the container fail to start (with rootless crun, from the
// createContainer hook, after the forwarder tried), the error names the
// port, and no process or state of ours is left.
func TestOCIHookTakenPortLeavesNothing(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireBinary(t, "slirp4netns")
	u := testenv.Unprivileged(t)
	taken, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	port := taken.Addr().(*net.TCPAddr).Port
	for _, rt := range ociRuntimes {
		t.Run(rt.name, func(t *testing.T) {
			xdg := u.Dir(t)
			spec := fmt.Sprintf("127.0.0.1:%d:8080/tcp", port)
			annotations := map[string]string{"io.portkit.net": "slirp4netns", "io.portkit.port-driver": "builtin", "io.portkit.ports": spec}
			b := newOCIBundle(t, rt, u, annotations, "/echod", "-tcp", ":8080")
			b.setHookEnv(t, "XDG_RUNTIME_DIR="+xdg)
			b.runFails(t, xdg, spec, "address already in use")
		})
	}
}

// TestOCIHookCrunNeedsCreateContainerHook: rootless crun hides the
// container's netns from createRuntime, so without the createContainer
// hook the container must not start, and the error says what to add.
func TestOCIHookCrunNeedsCreateContainerHook(t *testing.T) {
	testenv.RequireRoot(t)
	u := testenv.Unprivileged(t)
	for _, rt := range ociRuntimes {
		if rt.name != "crun" {
			continue
		}
		xdg := u.Dir(t)
		annotations := map[string]string{"io.portkit.net": "slirp4netns", "io.portkit.ports": "127.0.0.1:18080:8080/tcp"}
		b := newOCIBundle(t, rt, u, annotations, "/echod", "-tcp", ":8080")
		b.setHookEnv(t, "XDG_RUNTIME_DIR="+xdg)
		b.editConfig(t, func(cfg map[string]any) { delete(cfg["hooks"].(map[string]any), "createContainer") })
		b.runFails(t, xdg, "permission denied", `"args": ["portkit-oci-hook", "createContainer"]`, "hooks.createContainer")
	}
}
