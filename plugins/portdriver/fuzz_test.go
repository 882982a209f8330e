package main

import (
	"testing"
)

// FuzzPortdriverConfig feeds parseConfig arbitrary CNI stdin, with
// runtimeConfig.portMappings and prevResult. It must never panic; an
// accepted config names a known driver, and its port mappings either turn
// into valid specs or are refused with an error.
func FuzzPortdriverConfig(f *testing.F) {
	prev := `"prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"/proc/1/ns/net"}],"ips":[{"address":"10.0.2.100/24","interface":0}]}`
	for _, seed := range []string{
		`{"cniVersion":"1.1.0","name":"n","type":"portdriver",` + prev + `}`,
		`{"cniVersion":"1.1.0","name":"n","type":"portdriver","driver":"builtin",` + prev + `,"runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"127.0.0.1"}]}}`,
		`{"cniVersion":"1.0.0","name":"n","type":"portdriver","driver":"slirp4netns",` + prev + `,"runtimeConfig":{"portMappings":[{"HostPort":53,"ContainerPort":53,"Protocol":"udp","HostIP":"::1"}]}}`,
		`{"cniVersion":"1.1.0","name":"n","type":"portdriver","driver":"none","runtimeConfig":{"portMappings":[{"hostPort":-1}]}}`,
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
		known := false
		for _, d := range Drivers {
			known = known || cfg.Driver == d
		}
		if !known {
			t.Fatalf("accepted driver %q", cfg.Driver)
		}
		if cfg.prev == nil {
			return
		}
		specs, err := cfg.specs("/proc/1/ns/net", "eth0")
		if err != nil {
			return
		}
		for _, s := range specs {
			if err := s.Validate(); err != nil {
				t.Fatalf("spec %s from %q is invalid: %v", s, data, err)
			}
		}
	})
}
