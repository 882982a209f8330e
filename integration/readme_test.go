package integration

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
)

// readmeSession is one `console` block of README.md marked with
// <!-- readme-test: NAME -->: commands ("$ " lines) and what each prints.
type readmeSession struct {
	name  string
	steps []readmeStep
}

type readmeStep struct {
	command string
	output  string
}

var readmeMarker = regexp.MustCompile(`^<!-- readme-test: ([a-z0-9-]+) -->$`)

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
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case readmeMarker.MatchString(line):
			sessions = append(sessions, readmeSession{name: readmeMarker.FindStringSubmatch(line)[1]})
			cur = &sessions[len(sessions)-1]
		case cur != nil && !inBlock && line == "```console":
			inBlock = true
		case cur != nil && inBlock && line == "```":
			inBlock, cur = false, nil
		case cur != nil && inBlock && strings.HasPrefix(line, "$ "):
			cur.steps = append(cur.steps, readmeStep{command: strings.TrimPrefix(line, "$ ")})
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

// TestReadmeSessions runs every marked README session as the unprivileged
// user, in one shell, and compares what each command prints with what the
// README shows. Paths and ports in the README are replaced by fresh ones so
// the session cannot collide with anything else on the machine.
func TestReadmeSessions(t *testing.T) {
	testenv.RequireBinary(t, "rootlessctl")
	u := testenv.Unprivileged(t)
	sessions := readmeSessions(t)
	if len(sessions) == 0 {
		t.Fatal("README.md has no <!-- readme-test: … --> sessions")
	}
	portkit := testenv.Binary(t, "portkit")
	for _, s := range sessions {
		t.Run(s.name, func(t *testing.T) {
			dir := u.Dir(t)
			state := filepath.Join(dir, "state")
			subst := []string{"/tmp/portkit-demo", state}
			for _, port := range []string{"8080", "5353"} {
				subst = append(subst, port, strconv.Itoa(freeShortPort(t)))
			}
			replacer := strings.NewReplacer(subst...)

			var script strings.Builder
			script.WriteString("set -u\nexec 2>&1\n")
			for i, step := range s.steps {
				cmd := replacer.Replace(step.command)
				fmt.Fprintf(&script, "echo '@@step %d@@'\n", i)
				if strings.HasSuffix(cmd, "&") {
					// Background commands print nothing in the README; a
					// daemon is waited for the way a user would, by its socket.
					fmt.Fprintf(&script, "%s >/dev/null 2>&1 &\nbg=\"$! ${bg:-}\"\n", strings.TrimSuffix(cmd, "&"))
					if strings.Contains(cmd, "portkit daemon") {
						fmt.Fprintf(&script, "for i in $(seq 200); do [ -S %s/api.sock ] && break; sleep 0.05; done\n", state)
					}
					continue
				}
				script.WriteString(cmd + "\n")
			}
			script.WriteString("echo '@@end@@'\nkill ${bg:-} 2>/dev/null\nwait\n")

			cmd := u.Cmd("sh", "-c", script.String())
			cmd.Env = append(cmd.Env, "PATH="+filepath.Dir(portkit)+":"+os.Getenv("PATH"))
			cmd.Dir = dir
			done := make(chan struct{})
			var out []byte
			var err error
			go func() { out, err = cmd.CombinedOutput(); close(done) }()
			select {
			case <-done:
			case <-time.After(60 * time.Second):
				_ = cmd.Process.Kill()
				<-done
				t.Fatalf("README session %s did not finish in 60 s:\n%s", s.name, out)
			}
			if err != nil {
				t.Fatalf("README session %s: %v\n%s", s.name, err, out)
			}
			got := splitSteps(string(out))
			for i, step := range s.steps {
				want := replacer.Replace(step.output)
				if got[i] != want {
					t.Errorf("README session %s, `$ %s`:\nREADME shows:\n%s\nportkit printed:\n%s", s.name, step.command, want, got[i])
				}
			}
			if _, err := os.Stat(state); !os.IsNotExist(err) {
				t.Errorf("state dir %s left behind after the daemon stopped", state)
			}
		})
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
