package main

import (
	"github.com/portkit/portkit/plugins/internal/cniconf"

	"errors"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

const prev = `"prevResult":{"cniVersion":"1.0.0",
	"interfaces":[{"name":"veth0"},{"name":"eth0","sandbox":"/run/netns/c1"}],
	"ips":[{"address":"10.88.0.1/16","interface":0},{"address":"10.88.0.5/16","interface":1},{"address":"fd00::5/64","interface":1}]}`

func TestSpecsDialTheSandboxAddressOfTheHostFamily(t *testing.T) {
	c, err := parseConfig([]byte(`{"cniVersion":"1.0.0","name":"k8s","type":"portdriver",` + prev + `,
		"runtimeConfig":{"portMappings":[
			{"HostPort":18080,"ContainerPort":80,"Protocol":"tcp","HostIP":""},
			{"hostPort":15353,"containerPort":53,"protocol":"udp","hostIP":"::1"}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Driver != "builtin" {
		t.Fatalf("default driver %q", c.Driver)
	}
	specs, err := c.specs("/run/netns/c1", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if len(specs) != 2 || specs[0].String() != "18080:10.88.0.5:80/tcp" || specs[1].String() != "[::1]:15353:[fd00::5]:53/udp" {
		t.Fatalf("specs: %v", specs)
	}
}

func TestConfigErrorsNameTheField(t *testing.T) {
	for _, tc := range []struct{ body, field, says string }{
		{`"driver":"iptables"`, "driver", `"iptables" is not a port driver`},
		{`"driver":7`, "driver", "got a JSON number"},
		{`"snat":true`, "snat", "unknown field"},
		{`"runtimeConfig":{"portMappings":[{"HostPort":9000,"ContainerPort":9000,"Protocol":"sctp"}]}`, "runtimeConfig.portMappings", `9000->9000/sctp: protocol "sctp" is not supported`},
	} {
		_, err := parseConfig([]byte(`{"cniVersion":"1.0.0","name":"n","type":"portdriver",` + tc.body + `}`))
		var fe *cniconf.FieldError
		if !errors.As(err, &fe) || fe.Field != tc.field || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: got %v, want field %q saying %q", tc.body, err, tc.field, tc.says)
			continue
		}
		var te *types.Error
		if !errors.As(cniconf.Error(err), &te) || te.Code != types.ErrInvalidNetworkConfig {
			t.Errorf("%s: CNI error %+v, want code 7", tc.body, te)
		}
	}
}
