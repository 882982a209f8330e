package portmapping

import (
	"encoding/json"
	"net"
	"testing"

	"github.com/portkit/portkit/libport"
)

// FuzzPortMappings decodes arbitrary runtimeConfig.portMappings and turns
// them into specs. No panic; when Specs succeeds every spec is valid and no
// two of them conflict.
func FuzzPortMappings(f *testing.F) {
	for _, seed := range []string{
		`[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]`,
		`[{"HostPort":53,"ContainerPort":53,"Protocol":"UDP","HostIP":"::1"},{"hostPort":8443,"containerPort":443}]`,
		`[{"hostPort":8080,"containerPort":80},{"hostPort":8080,"containerPort":81}]`,
		`[{"hostPort":1e30}]`,
		`[{"hostPort":80,"containerPort":80,"protocol":"sctp"}]`,
	} {
		f.Add([]byte(seed), "10.0.2.100")
	}
	f.Fuzz(func(t *testing.T, data []byte, childIP string) {
		var ms []Mapping
		if err := json.Unmarshal(data, &ms); err != nil {
			return
		}
		for _, m := range ms {
			_ = m.String()
		}
		specs, err := Specs(ms, func(net.IP) string { return childIP })
		if err != nil {
			return
		}
		for i, s := range specs {
			if err := s.Validate(); err != nil {
				t.Fatalf("spec %s from %q is invalid: %v", s, data, err)
			}
			for _, o := range specs[:i] {
				if libport.Conflicts(s, o) {
					t.Fatalf("specs %s and %s from %q conflict", s, o, data)
				}
			}
		}
	})
}
