package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/portkit/portkit/internal/testenv"
	"github.com/portkit/portkit/libport/state"
)

// TestRunPublishesTCPAndUDPThroughEachDriver runs echod (it answers with the
// client address it sees) inside `portkit run` for every network × port
// driver pair that fits, as the unprivileged user, and checks what a user
// checks: TCP and UDP from a host client get through, and the server sees
// the client address the README's driver table promises.
func TestRunPublishesTCPAndUDPThroughEachDriver(t *testing.T) {
	u := testenv.Unprivileged(t)
	echod := testenv.Binary(t, "echod")
	bin := testenv.Binary(t, "portkit")
	for _, tc := range []struct {
		net, driver string
		seen        string // the address echod sees for a 127.0.0.1 client
	}{
		{"slirp4netns", "builtin", "127.0.0.1"},
		{"slirp4netns", "slirp4netns", "10.0.2.2"},
		{"slirp4netns", "socat", "127.0.0.1"},
		{"pasta", "implicit", "127.0.0.1"},
		{"pasta", "builtin", "127.0.0.1"},
		{"pasta", "socat", "127.0.0.1"},
	} {
		t.Run(tc.net+"-"+tc.driver, func(t *testing.T) {
			requireRunTools(t, tc.net)
			if tc.driver == "socat" {
				testenv.RequireBinary(t, "socat")
			}
			tcpHost, udpPort := runFreePort(t), runFreePort(t)
			// UDP keeps its port number: Debian 12's pasta loses replies to
			// loopback clients on a remapped UDP port (README).
			cmd := u.Cmd(bin, "run", "--state-dir="+runStateDir(t, u), "--net="+tc.net, "--port-driver="+tc.driver,
				"-p", fmt.Sprintf("127.0.0.1:%d:8080/tcp", tcpHost),
				"-p", fmt.Sprintf("127.0.0.1:%d:%d/udp", udpPort, udpPort),
				"--", echod, "-tcp", ":8080", "-udp", fmt.Sprintf(":%d", udpPort))
			var errb bytes.Buffer
			cmd.Stderr = &errb
			cmd.WaitDelay = 5 * time.Second
			testenv.Start(t, cmd)
			// Stopped as a user stops it (SIGTERM) before Start's cleanup kills it.
			t.Cleanup(func() {
				_ = cmd.Process.Signal(syscall.SIGTERM)
				done := make(chan struct{})
				go func() { _ = cmd.Wait(); close(done) }()
				select {
				case <-done:
				case <-time.After(10 * time.Second):
					t.Errorf("portkit run did not stop 10 s after SIGTERM")
				}
			})

			reply, err := runAskTCP(fmt.Sprintf("127.0.0.1:%d", tcpHost), 20*time.Second)
			if err != nil {
				t.Fatalf("TCP through 127.0.0.1:%d: %v\n%s", tcpHost, err, errb.String())
			}
			if !strings.HasPrefix(reply, tc.seen+":") {
				t.Errorf("TCP: echod saw %q, want the client as %s (README driver table)", reply, tc.seen)
			}
			reply, err = runAskUDP(fmt.Sprintf("127.0.0.1:%d", udpPort), 10*time.Second)
			if err != nil {
				t.Fatalf("UDP through 127.0.0.1:%d: %v\n%s", udpPort, err, errb.String())
			}
			if !strings.HasPrefix(reply, tc.seen+":") {
				t.Errorf("UDP: echod saw %q, want the client as %s (README driver table)", reply, tc.seen)
			}
		})
	}
}

// runAskTCP sends a line to echod until it answers (the server in a
// just-started run may not listen yet) and returns the address it saw.
func runAskTCP(addr string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		reply, err := func() (string, error) {
			c, err := net.DialTimeout("tcp4", addr, time.Second)
			if err != nil {
				return "", err
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := fmt.Fprintln(c, "ping"); err != nil {
				return "", err
			}
			return bufio.NewReader(c).ReadString('\n')
		}()
		if err == nil {
			return strings.TrimSpace(reply), nil
		}
		if time.Now().After(deadline) {
			return "", err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runAskUDP sends datagrams to echod until one is answered.
func runAskUDP(addr string, timeout time.Duration) (string, error) {
	c, err := net.Dial("udp4", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	buf := make([]byte, 2048)
	deadline := time.Now().Add(timeout)
	for {
		if _, err := c.Write([]byte("ping")); err != nil {
			return "", err
		}
		_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		n, err := c.Read(buf)
		if err == nil {
			return string(buf[:n]), nil
		}
		if time.Now().After(deadline) {
			return "", err
		}
	}
}

// TestRunKilledLeavesNoProcess: even SIGKILL of `portkit run` (no chance to
// clean up) takes its command, slirp4netns and the netns helper with it.
func TestRunKilledLeavesNoProcess(t *testing.T) {
	requireRunTools(t, "slirp4netns")
	u := testenv.Unprivileged(t)
	echod := testenv.Binary(t, "echod")
	bin := testenv.Binary(t, "portkit")
	tcpHost := runFreePort(t)
	cmd := u.Cmd(bin, "run", "--state-dir="+runStateDir(t, u), "--net=slirp4netns", "--port-driver=builtin",
		"-p", fmt.Sprintf("127.0.0.1:%d:8080/tcp", tcpHost), "--", echod, "-tcp", ":8080")
	cmd.WaitDelay = 5 * time.Second
	testenv.Start(t, cmd)
	if _, err := runAskTCP(fmt.Sprintf("127.0.0.1:%d", tcpHost), 20*time.Second); err != nil {
		t.Fatalf("portkit run never served: %v", err)
	}
	children := testenv.Descendants(mustProcess(t, cmd.Process.Pid))[1:]
	if len(children) < 3 {
		t.Fatalf("want the command, slirp4netns and the helper under portkit run, found %d processes", len(children))
	}
	_ = cmd.Process.Kill()
	testenv.WaitGone(t, children, 5*time.Second)
}

func mustProcess(t *testing.T, pid int) state.Process {
	t.Helper()
	p, err := state.ProcessOf(pid)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
