package main

import (
	"bytes"
	"strings"
	"testing"
)

// FuzzHookInput feeds the hook an arbitrary OCI state on stdin and
// arbitrary io.portkit.* annotation values. No panic; an accepted state has
// an ID that names one directory, and accepted annotations validate.
func FuzzHookInput(f *testing.F) {
	f.Add([]byte(`{"ociVersion":"1.0.2","id":"ctr","status":"creating","pid":4242,"bundle":"/b","annotations":{"io.portkit.net":"slirp4netns"}}`),
		"slirp4netns", "builtin", "8080:80/tcp,127.0.0.1:5353:53/udp", "65520", "false")
	f.Add([]byte(`{"id":"../x","pid":-1}`), "pasta", "implicit", "8000-8009:9000-9009/tcp", "1500", "true")
	f.Add([]byte(`{"id":"a\u0000b"}`), "none", "none", "", "", "")
	f.Add([]byte(`[[[[`), "tap", "iptables", "1-65535:1-65535/tcp", "-1", "yes")
	f.Fuzz(func(t *testing.T, state []byte, net, driver, ports, mtu, loopback string) {
		st, err := readState(bytes.NewReader(state))
		if err == nil && (st.ID == "" || st.ID == "." || st.ID == ".." || strings.ContainsAny(st.ID, "/\x00")) {
			t.Fatalf("accepted container id %q", st.ID)
		}
		ann := map[string]string{}
		for k, v := range map[string]string{keyNet: net, keyPortDriver: driver, keyPorts: ports, keyMTU: mtu, keyDisableHostLoopback: loopback} {
			if v != "" {
				ann[k] = v
			}
		}
		if len(ports) > 4096 {
			return // a range expands to one spec per port: keep each run fast
		}
		s, err := parseSettings(ann)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error")
			}
			return
		}
		if err := s.validate(); err != nil {
			t.Fatalf("parseSettings accepted %v but validate refuses it: %v", ann, err)
		}
		for _, p := range s.Ports {
			if err := p.Validate(); err != nil {
				t.Fatalf("accepted invalid spec %s: %v", p, err)
			}
		}
	})
}
