package main

import (
	"strings"
	"testing"
)

func TestParseSettings(t *testing.T) {
	tests := []struct {
		name    string
		in      map[string]string
		wantErr string // substring; empty means success
		check   func(t *testing.T, s settings)
	}{
		{name: "defaults", in: map[string]string{keyNet: "slirp4netns"}, check: func(t *testing.T, s settings) {
			if s.PortDriver != "builtin" || s.MTU != 65520 || len(s.Ports) != 0 {
				t.Errorf("got %+v", s)
			}
		}},
		{name: "pasta picks implicit", in: map[string]string{keyNet: "pasta", keyPorts: "8080:80/tcp"}, check: func(t *testing.T, s settings) {
			if s.PortDriver != "implicit" || len(s.Ports) != 1 || s.Ports[0].ParentPort != 8080 {
				t.Errorf("got %+v", s)
			}
		}},
		{name: "ports with a range and spaces", in: map[string]string{keyPorts: "127.0.0.1:8080:80/tcp, 9000-9002:9000-9002/udp"}, check: func(t *testing.T, s settings) {
			if len(s.Ports) != 4 || s.Ports[3].ChildPort != 9002 || s.Ports[0].ParentIP != "127.0.0.1" {
				t.Errorf("got %+v", s.Ports)
			}
		}},
		{name: "flags", in: map[string]string{keyIPv6: "true", keyDisableHostLoopback: "1", keyMTU: "1500"}, check: func(t *testing.T, s settings) {
			if !s.IPv6 || !s.DisableHostLoopback || s.MTU != 1500 {
				t.Errorf("got %+v", s)
			}
		}},
		{name: "bad port spec", in: map[string]string{keyPorts: "8080:80/sctp"}, wantErr: `annotation io.portkit.ports="8080:80/sctp"`},
		{name: "bad net", in: map[string]string{keyNet: "bridge"}, wantErr: "want one of slirp4netns, pasta, none"},
		{name: "bad mtu", in: map[string]string{keyMTU: "9"}, wantErr: `io.portkit.mtu="9"`},
		{name: "bad bool", in: map[string]string{keyIPv6: "yes please"}, wantErr: "want true or false"},
		{name: "unknown key", in: map[string]string{"io.portkit.prots": "80:80/tcp"}, wantErr: "unknown portkit annotation"},
		{name: "implicit without pasta", in: map[string]string{keyPortDriver: "implicit"}, wantErr: "needs io.portkit.net=pasta"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := parseSettings(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, s)
		})
	}
}

func TestWantedOnlyForPortkitAnnotations(t *testing.T) {
	if wanted(map[string]string{"org.opencontainers.image.ref.name": "x"}) {
		t.Error("a container without io.portkit.* annotations must be left alone")
	}
	if !wanted(map[string]string{keyNet: "none"}) {
		t.Error("io.portkit.net must be acted on")
	}
}
