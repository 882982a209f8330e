package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/portkit/portkit/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// runAs runs a binary as u with env added to u's environment and returns
// its stdout, stderr and exit code.
func runAs(t *testing.T, u *testenv.User, env []string, bin string, args ...string) (string, string, int) {
	t.Helper()
	cmd := u.Cmd(bin, args...)
	cmd.Env = append(cmd.Env, env...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s %s: %v", bin, strings.Join(args, " "), err)
	}
	return out.String(), errOut.String(), code
}

func TestHelp(t *testing.T) {
	u := testenv.Unprivileged(t)
	bin := testenv.Binary(t, "portkit")
	out, errOut, code := runAs(t, u, nil, bin, "--help")
	if code != 0 || errOut != "" {
		t.Fatalf("portkit --help: exit %d, stderr %q", code, errOut)
	}
	for name, cmd := range commands {
		if !strings.Contains(out, "  "+name+" ") || !strings.Contains(out, cmd.summary) {
			t.Errorf("portkit --help does not list %s (%q):\n%s", name, cmd.summary, out)
		}
	}
	for _, name := range []string{"add-ports", "list-ports", "remove-ports", "info"} {
		if _, ok := commands[name]; !ok {
			t.Fatalf("command %s is not registered", name)
		}
	}
	// Every command answers --help with its usage and exit 0, and so does
	// `portkit help NAME`.
	for name := range commands {
		for _, args := range [][]string{{name, "--help"}, {name, "-h"}, {"help", name}} {
			out, errOut, code := runAs(t, u, nil, bin, args...)
			if code != 0 || !strings.Contains(out+errOut, "Usage: portkit "+name) {
				t.Errorf("portkit %s: exit %d, output %q %q; want exit 0 and its usage", strings.Join(args, " "), code, out, errOut)
			}
		}
	}
	// An API command's help shows its flags.
	out, _, _ = runAs(t, u, nil, bin, "list-ports", "--help")
	if !strings.Contains(out, "-json") || !strings.Contains(out, "-socket") {
		t.Errorf("list-ports --help lacks its flags:\n%s", out)
	}
}

func TestUsageErrors(t *testing.T) {
	u := testenv.Unprivileged(t)
	bin := testenv.Binary(t, "portkit")
	for _, tc := range []struct {
		args   []string
		stderr string
	}{
		{nil, "error: no command given: run 'portkit --help' for the list\n"},
		{[]string{"frobnicate"}, "error: unknown command \"frobnicate\": run 'portkit --help' for the list\n"},
		{[]string{"--bogus", "info"}, "error: flag provided but not defined: -bogus: run 'portkit --help' for the global flags\n"},
		{[]string{"list-ports", "--bogus"}, "error: portkit list-ports: flag provided but not defined: -bogus: run 'portkit list-ports --help'\n"},
		{[]string{"list-ports", "extra"}, "error: list-ports takes no arguments, got [\"extra\"]\n"},
		{[]string{"add-ports"}, "error: no port specified: add-ports SPEC..., e.g. add-ports 127.0.0.1:8080:80/tcp\n"},
		{[]string{"remove-ports"}, "error: no ID specified: remove-ports ID..., with IDs from list-ports\n"},
		{[]string{"--socket", "/nonexistent/api.sock", "add-ports", "127.0.0.1:8080:80/sctp"},
			"error: port spec \"127.0.0.1:8080:80/sctp\": unknown protocol \"sctp\": want one of tcp, tcp4, tcp6, udp, udp4, udp6\n"},
		{[]string{"--socket", "/nonexistent/api.sock", "remove-ports", "1", "x"},
			"error: port ID \"x\" is not a number: list-ports shows the IDs\n"},
		{[]string{"info"},
			"error: no API socket: pass --socket PATH, or set ROOTLESSKIT_STATE_DIR or PORTKIT_STATE_DIR to the daemon's state directory\n"},
		{[]string{"info", "--socket", "/nonexistent/api.sock"},
			"error: API socket /nonexistent/api.sock: GET /v1/info: dial unix /nonexistent/api.sock: connect: no such file or directory: " +
				"no API socket there; is the daemon running, and is the path its state directory's api.sock?\n"},
	} {
		out, errOut, code := runAs(t, u, nil, bin, tc.args...)
		if code != 1 || out != "" || errOut != tc.stderr {
			t.Errorf("portkit %s: exit %d, stdout %q, stderr %q\nwant exit 1, no stdout, stderr %q",
				strings.Join(tc.args, " "), code, out, errOut, tc.stderr)
		}
	}
}

// TestParseFlagsInterspersed: flags may follow arguments (add-ports SPEC
// --json), and "--" ends the flags.
func TestParseFlagsInterspersed(t *testing.T) {
	for _, tc := range []struct {
		args []string
		json bool
		rest []string
	}{
		{[]string{"a", "--json", "b"}, true, []string{"a", "b"}},
		{[]string{"--json", "a"}, true, []string{"a"}},
		{[]string{"a", "b"}, false, []string{"a", "b"}},
		{[]string{"a", "--", "--json", "b"}, false, []string{"a", "--json", "b"}},
		{[]string{"--", "-1"}, false, []string{"-1"}},
		{nil, false, nil},
	} {
		fs, f := newAPIFlags("test", true)
		rest, err := parseFlags(fs, "", tc.args)
		if err != nil || f.json != tc.json || strings.Join(rest, " ") != strings.Join(tc.rest, " ") {
			t.Errorf("parseFlags(%q) = %q, json %v, %v; want %q, json %v", tc.args, rest, f.json, err, tc.rest, tc.json)
		}
	}
}

// TestRootlesskitName: installed as `rootlesskit` (a symlink), portkit is
// `portkit run`, as containerd-rootless.sh calls it with run's flags and no verb.
func TestRootlesskitName(t *testing.T) {
	u := testenv.Unprivileged(t)
	bin := testenv.Binary(t, "portkit")
	link := filepath.Join(u.Dir(t), "rootlesskit")
	if err := os.Symlink(bin, link); err != nil {
		t.Fatal(err)
	}
	out, errOut, code := runAs(t, u, nil, link, "--help")
	if code != 0 || !strings.Contains(out+errOut, "Usage: portkit run") {
		t.Fatalf("rootlesskit --help: exit %d, %q %q; want run's usage", code, out, errOut)
	}
}
