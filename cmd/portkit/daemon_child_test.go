package main

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
)

// TestDaemonStopsWhenItsChildExits: a daemon given --child-pid serves until
// that process (the container) exits, then withdraws its ports and removes
// its files by itself, so nothing outlives a container whose runtime never
// said goodbye.
func TestDaemonStopsWhenItsChildExits(t *testing.T) {
	u := testenv.Unprivileged(t)
	ns := testenv.ChildNetns(t, u)
	state := filepath.Join(u.Dir(t), "st")
	cmd := u.Cmd(testenv.Binary(t, "portkit"), "daemon", "--state-dir", state, "--port-driver", "builtin",
		"--child-pid", strconv.Itoa(ns.PID), "-p", "127.0.0.1:"+strconv.Itoa(runFreePort(t))+":80/tcp")
	cmd.WaitDelay = 5 * time.Second
	testenv.Start(t, cmd)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(state, "api.sock")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("daemon never served")
		}
		time.Sleep(20 * time.Millisecond)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	if err := ns.Kill(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("daemon exit after its child exited: %v, want a clean exit", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("daemon still running 10 s after its child exited")
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("state dir %s left behind (%v)", state, err)
	}
}
