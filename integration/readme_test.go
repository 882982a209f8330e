package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
)

// readmeSession is one `console` block of README.md marked with
// <!-- readme-test: NAME --> (run as the unprivileged user, prompt "$ ") or
// <!-- readme-test: NAME as=root --> (run as root, prompt "# "): commands
// and what each prints. A line starting with "> " (the shell's PS2 prompt)
// continues the command above it, as in a here-document.
type readmeSession struct {
	name  string
	root  bool
	steps []readmeStep
}

type readmeStep struct {
	command string
	output  string
}

var readmeMarker = regexp.MustCompile(`^<!-- readme-test: ([a-z0-9-]+)( as=root)? -->$`)

func readmeSessions(t *testing.T) []readmeSession {
	t.Helper()
	f, err := os.Open(filepath.Join(testenv.ModuleRoot(t), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var sessions []readmeSession
	var cur *readmeSession
	inBlock := false
	prompt := "$ "
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case readmeMarker.MatchString(line):
			m := readmeMarker.FindStringSubmatch(line)
			sessions = append(sessions, readmeSession{name: m[1], root: m[2] != ""})
			cur = &sessions[len(sessions)-1]
			prompt = "$ "
			if cur.root {
				prompt = "# "
			}
		case cur != nil && !inBlock && line == "```console":
			inBlock = true
		case cur != nil && inBlock && line == "```":
			inBlock, cur = false, nil
		case cur != nil && inBlock && strings.HasPrefix(line, prompt):
			cur.steps = append(cur.steps, readmeStep{command: strings.TrimPrefix(line, prompt)})
		case cur != nil && inBlock && strings.HasPrefix(line, "> ") && len(cur.steps) > 0 && cur.steps[len(cur.steps)-1].output == "":
			last := &cur.steps[len(cur.steps)-1]
			last.command += "\n" + strings.TrimPrefix(line, "> ")
		case cur != nil && inBlock:
			if len(cur.steps) == 0 {
				t.Fatalf("README session %s: output before the first command: %q", cur.name, line)
			}
			cur.steps[len(cur.steps)-1].output += line + "\n"
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return sessions
}

// cnitoolVersion is the cnitool scripts/engines-deps.sh builds into the
// tools cache; the README's CNI session runs it.
const cnitoolVersion = "v1.3.0"

// stateDirFlag finds the state directory a background command serves, so
// the harness waits for its API socket as a user would and checks that it
// is gone at the end.
var stateDirFlag = regexp.MustCompile(`--state-dir[= ](\S+)`)

// TestReadmeSessions runs every marked README session in one shell — as
// the unprivileged user, or as root when marked as=root — and compares what
// each command prints with what the README shows. Paths, names and ports in
// the README are replaced by fresh ones so the session cannot collide with
// anything else on the machine, and the test checks that each session
// leaves nothing behind.
func TestReadmeSessions(t *testing.T) {
	testenv.RequireBinary(t, "rootlessctl")
	u := testenv.Unprivileged(t)
	sessions := readmeSessions(t)
	if len(sessions) == 0 {
		t.Fatal("README.md has no <!-- readme-test: … --> sessions")
	}
	portkit := testenv.Binary(t, "portkit")
	binDir := filepath.Dir(portkit)
	for _, s := range sessions {
		t.Run(s.name, func(t *testing.T) {
			dir := u.Dir(t)
			subst := []string{"/tmp/portkit-demo", filepath.Join(dir, "state")}
			for _, port := range []string{"8080", "5353"} {
				subst = append(subst, port, strconv.Itoa(freeShortPort(t)))
			}
			path := binDir + ":" + os.Getenv("PATH")
			env := map[string]string{}
			var netnsName string
			if s.root {
				testenv.RequireRoot(t)
				testenv.RequireBinary(t, "ip")
				testenv.Binary(t, "usernet")
				testenv.Binary(t, "portdriver")
				cnitool := engineTool(t, "cnitool-"+cnitoolVersion, "cnitool")
				path = binDir + ":" + filepath.Dir(cnitool) + ":" + os.Getenv("PATH")
				netnsName = fmt.Sprintf("portkit-readme-%d", rand.IntN(1000000))
				netconf := filepath.Join(dir, "net.d")
				subst = append(subst,
					"/opt/cni/bin", binDir, // where `make install` puts the plugins
					"/etc/cni/net.d", netconf,
					"ctr1", netnsName)
				t.Cleanup(func() { cleanupNetns(t, netnsName, cnitool, binDir, netconf) })
			} else {
				// These machines have no logind: give the user the runtime
				// directory a desktop session would.
				xdg := filepath.Join(dir, "run")
				if err := os.Mkdir(xdg, 0o700); err != nil {
					t.Fatal(err)
				}
				if err := os.Chown(xdg, u.UID, u.GID); err != nil {
					t.Fatal(err)
				}
				env["XDG_RUNTIME_DIR"] = xdg
			}
			replacer := strings.NewReplacer(subst...)

			var script strings.Builder
			var stateDirs []string
			script.WriteString("set -u\nexec 2>&1\n")
			for i, step := range s.steps {
				cmd := replacer.Replace(step.command)
				fmt.Fprintf(&script, "echo '@@step %d@@'\n", i)
				if strings.HasSuffix(cmd, "&") {
					// Background commands print nothing in the README; a
					// daemon is waited for the way a user would, by its socket.
					fmt.Fprintf(&script, "%s >/dev/null 2>&1 &\nbg=\"$! ${bg:-}\"\n", strings.TrimSuffix(cmd, "&"))
					if m := stateDirFlag.FindStringSubmatch(cmd); m != nil {
						fmt.Fprintf(&script, "for i in $(seq 200); do [ -S %s/api.sock ] && break; sleep 0.05; done\n", m[1])
						// `portkit run` serves the API just before its child
						// execs the command (a server the session talks to
						// next): wait for the exec too, as a user's typing would.
						fmt.Fprintf(&script, "for i in $(seq 200); do c=$(cat /proc/$(cat %s/child_pid 2>/dev/null)/comm 2>/dev/null); [ \"$c\" != exe ] && [ \"$c\" != portkit ] && break; sleep 0.05; done\n", m[1])
						stateDirs = append(stateDirs, os.Expand(m[1], func(k string) string { return env[k] }))
					}
					continue
				}
				script.WriteString(cmd + "\n")
			}
			script.WriteString("echo '@@end@@'\nkill ${bg:-} 2>/dev/null\nwait\n")

			var cmd *exec.Cmd
			if s.root {
				cmd = exec.Command("sh", "-c", script.String())
				cmd.Env = rootEnv()
			} else {
				cmd = u.Cmd("sh", "-c", script.String())
			}
			cmd.Env = append(cmd.Env, "PATH="+path)
			for k, v := range env {
				cmd.Env = append(cmd.Env, k+"="+v)
			}
			cmd.Dir = dir
			if cmd.SysProcAttr == nil {
				cmd.SysProcAttr = &syscall.SysProcAttr{}
			}
			cmd.SysProcAttr.Setpgid = true // so a timeout kills the background commands too
			done := make(chan struct{})
			var out []byte
			var err error
			go func() { out, err = cmd.CombinedOutput(); close(done) }()
			select {
			case <-done:
			case <-time.After(90 * time.Second):
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				<-done
				t.Fatalf("README session %s did not finish in 90 s:\n%s", s.name, out)
			}
			if err != nil {
				t.Fatalf("README session %s: %v\n%s", s.name, err, out)
			}
			got := splitSteps(string(out))
			for i, step := range s.steps {
				want := replacer.Replace(step.output)
				if got[i] != want {
					t.Errorf("README session %s, `%s`:\nREADME shows:\n%s\nthe session printed:\n%s", s.name, step.command, want, got[i])
				}
			}
			for _, d := range stateDirs {
				if _, err := os.Stat(d); !os.IsNotExist(err) {
					t.Errorf("README session %s: state dir %s left behind after its process stopped", s.name, d)
				}
			}
			if s.root {
				for _, left := range leftoversMentioning(netnsName, "/run/portkit", "/var/lib/cni") {
					t.Errorf("README session %s: %s still mentions netns %s after the session", s.name, left, netnsName)
				}
				for _, p := range testenv.ProcessesMentioning(netnsName) {
					t.Errorf("README session %s: process %s left behind", s.name, p)
				}
				if _, err := os.Stat("/run/netns/" + netnsName); err == nil {
					t.Errorf("README session %s: netns %s left behind", s.name, netnsName)
				}
			}
		})
	}
}

// rootEnv is the environment of a root session: the test's, without what
// would change how portkit, cnitool or the plugins behave.
func rootEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case k == "PATH", k == "XDG_RUNTIME_DIR", k == "NETCONFPATH", k == "CAP_ARGS",
			strings.HasPrefix(k, "CNI_"), strings.HasPrefix(k, "ROOTLESSKIT_"), strings.HasPrefix(k, "PORTKIT_"):
			continue
		}
		env = append(env, kv)
	}
	return env
}

// leftoversMentioning lists files under roots whose content names s (the
// session's netns, unique to it): CNI records, forwarder configs and
// libcni's result cache all name the netns they serve.
func leftoversMentioning(s string, roots ...string) []string {
	var out []string
	for _, root := range roots {
		_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			if data, err := os.ReadFile(p); err == nil && strings.Contains(string(data), s) {
				out = append(out, p)
			}
			return nil
		})
	}
	return out
}

// cleanupNetns removes what a failed root session may have left: the
// attachment (cnitool del for each network in the session's netconf dir),
// processes naming its netns, then the netns. A passing session leaves none
// of these (the test checks that before this runs).
func cleanupNetns(t *testing.T, name, cnitool, pluginDir, netconf string) {
	netnsPath := "/var/run/netns/" + name
	if _, err := os.Stat(netnsPath); err == nil || len(leftoversMentioning(name, "/run/portkit", "/var/lib/cni")) > 0 {
		files, _ := filepath.Glob(filepath.Join(netconf, "*.conflist"))
		for _, f := range files {
			var conf struct{ Name string }
			if data, err := os.ReadFile(f); err != nil || json.Unmarshal(data, &conf) != nil || conf.Name == "" {
				continue
			}
			cmd := exec.Command(cnitool, "del", conf.Name, netnsPath)
			cmd.Env = append(rootEnv(), "PATH="+pluginDir+":"+os.Getenv("PATH"), "CNI_PATH="+pluginDir, "NETCONFPATH="+netconf)
			if out, err := runBounded(t, 30*time.Second, cmd); err != nil {
				t.Logf("cleanup: cnitool del %s %s: %v: %s", conf.Name, netnsPath, err, out)
			}
		}
	}
	for _, p := range testenv.ProcessesMentioning(name) {
		if pid, err := strconv.Atoi(strings.Fields(p)[0]); err == nil {
			t.Logf("cleanup: killing leftover %s", p)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	if _, err := os.Stat(netnsPath); err == nil {
		_ = exec.Command("ip", "netns", "del", name).Run()
	}
}

// splitSteps cuts the shell's output at the step markers.
func splitSteps(out string) map[int]string {
	steps := map[int]string{}
	cur := -1
	for _, line := range strings.SplitAfter(out, "\n") {
		var n int
		if _, err := fmt.Sscanf(line, "@@step %d@@", &n); err == nil {
			cur = n
			continue
		}
		if strings.HasPrefix(line, "@@end@@") {
			cur = -1
			continue
		}
		if cur >= 0 {
			steps[cur] += line
		}
	}
	return steps
}

// freeShortPort is a free TCP and UDP port of four digits, so that the
// README's table columns keep their widths when a port is replaced.
func freeShortPort(t *testing.T) int {
	t.Helper()
	for i := 0; i < 200; i++ {
		port := 2000 + rand.IntN(8000)
		l, err := net.Listen("tcp", ":"+strconv.Itoa(port))
		if err != nil {
			continue
		}
		c, err := net.ListenPacket("udp", ":"+strconv.Itoa(port))
		l.Close()
		if err != nil {
			continue
		}
		c.Close()
		return port
	}
	t.Fatal("no free four-digit port")
	return 0
}
