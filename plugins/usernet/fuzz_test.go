package main

import (
	"net"
	"testing"
)

// FuzzUsernetConfig feeds parseConfig arbitrary CNI stdin (network config,
// runtimeConfig.portMappings, prevResult). It must never panic, and a
// config it accepts must be one ADD can use.
func FuzzUsernetConfig(f *testing.F) {
	for _, seed := range []string{
		`{"cniVersion":"1.1.0","name":"n","type":"usernet"}`,
		`{"cniVersion":"1.1.0","name":"n","type":"usernet","backend":"pasta","mtu":65520,"runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}}`,
		`{"cniVersion":"0.4.0","name":"n","type":"usernet","backend":"slirp4netns","ipv6":true,"cidr":"10.0.3.0/24","disableHostLoopback":true,"sandbox":true,"seccomp":true}`,
		`{"cniVersion":"1.1.0","name":"n","type":"usernet","mtu":-1}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := parseConfig(data)
		if err != nil {
			if err.Error() == "" {
				t.Fatalf("empty error for %q", data)
			}
			return
		}
		if cfg.Backend != "slirp4netns" && cfg.Backend != "pasta" {
			t.Fatalf("accepted backend %q", cfg.Backend)
		}
		if cfg.MTU < 68 || cfg.MTU > 65521 {
			t.Fatalf("accepted MTU %d", cfg.MTU)
		}
		if _, _, err := net.ParseCIDR(cfg.CIDR); err != nil {
			t.Fatalf("accepted CIDR %q: %v", cfg.CIDR, err)
		}
	})
}
