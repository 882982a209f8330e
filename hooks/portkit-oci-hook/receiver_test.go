package main

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestMapUID(t *testing.T) {
	tests := []struct {
		uidMap    string
		uid, want int
		wantErr   bool
	}{
		{"         0       1001          1\n", 0, 1001, false},    // rootless container root
		{"         0          0 4294967295\n", 1001, 1001, false}, // the initial user namespace
		{"0 1001 1\n1 100000 65536\n", 1000, 100999, false},       // subordinate range
		{"0 1001 1\n", 5, 0, true},                                // unmapped
		{"garbage\n0 2000 1\n", 0, 2000, false},                   // unparsable lines skipped
	}
	for _, tc := range tests {
		got, err := mapUID(tc.uidMap, tc.uid)
		if (err != nil) != tc.wantErr || (err == nil && got != tc.want) {
			t.Errorf("mapUID(%q, %d) = %d, %v; want %d (error %v)", tc.uidMap, tc.uid, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestFindCreateContainerHook(t *testing.T) {
	tests := []struct {
		name, config string
		wantErr      string
	}{
		{"installed name", `{"hooks":{"createContainer":[{"path":"/usr/local/bin/portkit-oci-hook","args":["portkit-oci-hook","createContainer"]}]}}`, ""},
		{"wrong stage argument", `{"hooks":{"createContainer":[{"path":"/usr/local/bin/portkit-oci-hook","args":["portkit-oci-hook","createRuntime"]}]}}`, "no createContainer hook"},
		{"another hook only", `{"hooks":{"createContainer":[{"path":"/usr/bin/other","args":["other","createContainer"]}]}}`, "no createContainer hook"},
		{"no hooks", `{}`, `"args": ["portkit-oci-hook", "createContainer"]`},
		{"bad json", `{`, "bundle config"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(tc.config), 0o644); err != nil {
				t.Fatal(err)
			}
			err := findCreateContainerHook(dir)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err %v, want it to contain %q", err, tc.wantErr)
			}
		})
	}
	if err := findCreateContainerHook(""); err == nil {
		t.Error("no bundle: want an error")
	}
}

// TestReceiveNetnsRefuses sends the receiver what a confused or hostile
// peer might: it takes only one network namespace, not the host's, with
// the message naming its container.
func TestReceiveNetnsRefuses(t *testing.T) {
	hostNetns, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer hostNetns.Close()
	notNetns, err := os.Open("/proc/self/ns/uts")
	if err != nil {
		t.Fatal(err)
	}
	defer notNetns.Close()
	tests := []struct {
		name, msg string
		fds       []int
		want      string
	}{
		{"no descriptor", "netns c1\n", nil, "want one namespace descriptor"},
		{"two descriptors", "netns c1\n", []int{int(hostNetns.Fd()), int(notNetns.Fd())}, "want one namespace descriptor"},
		{"another container", "netns c2\n", []int{int(hostNetns.Fd())}, "unexpected message"},
		{"not a netns", "netns c1\n", []int{int(notNetns.Fd())}, "not a network namespace"},
		{"the host's netns", "netns c1\n", []int{int(hostNetns.Fd())}, "shares the host's network namespace"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(pair[1])
			f := os.NewFile(uintptr(pair[0]), "receiver end")
			c, err := net.FileConn(f)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var oob []byte
			if len(tc.fds) > 0 {
				oob = unix.UnixRights(tc.fds...)
			}
			if err := unix.Sendmsg(pair[1], []byte(tc.msg), oob, nil, 0); err != nil {
				t.Fatal(err)
			}
			fd, err := receiveNetns(c.(*net.UnixConn), "c1")
			if err == nil {
				unix.Close(fd)
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want it to say %q", err, tc.want)
			}
		})
	}
}
