package portmapping

import (
	"encoding/json"
	"net"
	"strings"
	"testing"

	"github.com/portkit/portkit/libport"
)

func TestUnmarshalAcceptsBothKeyCases(t *testing.T) {
	for _, in := range []string{
		`{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"127.0.0.1"}`, // Podman, libcni
		`{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":"127.0.0.1"}`, // containerd CRI
	} {
		var m Mapping
		if err := json.Unmarshal([]byte(in), &m); err != nil {
			t.Fatalf("%s: %v", in, err)
		}
		want := Mapping{HostPort: 8080, ContainerPort: 80, Protocol: "tcp", HostIP: "127.0.0.1"}
		if m != want {
			t.Fatalf("%s: got %+v, want %+v", in, m, want)
		}
	}
}

func TestUnmarshalRefusesTyposAndWrongTypes(t *testing.T) {
	for in, wantErr := range map[string]string{
		`{"hostport":8080,"containerPrt":80}`: `unknown key "containerPrt"`,
		`{"hostPort":"8080"}`:                 `key "hostPort": "8080" is not the right type`,
		`[1]`:                                 "must be an object",
	} {
		var m Mapping
		err := json.Unmarshal([]byte(in), &m)
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("%s: got error %v, want one containing %q", in, err, wantErr)
		}
	}
}

func TestSpec(t *testing.T) {
	for _, tc := range []struct {
		m       Mapping
		childIP string
		want    libport.Spec
		wantErr string
	}{
		{m: Mapping{HostPort: 8080, ContainerPort: 80}, childIP: "10.0.2.100",
			want: libport.Spec{Proto: "tcp", ParentPort: 8080, ChildIP: "10.0.2.100", ChildPort: 80}},
		{m: Mapping{HostPort: 5353, ContainerPort: 53, Protocol: "UDP", HostIP: "::1"},
			want: libport.Spec{Proto: "udp", ParentIP: "::1", ParentPort: 5353, ChildPort: 53}},
		{m: Mapping{HostPort: 9000, ContainerPort: 9000, Protocol: "sctp"}, wantErr: "port mapping 9000->9000/sctp: protocol \"sctp\" is not supported"},
		{m: Mapping{HostPort: 0, ContainerPort: 80}, wantErr: "parent port 0 is out of range"},
		{m: Mapping{HostPort: 80, ContainerPort: 70000}, wantErr: "child port 70000 is out of range"},
		{m: Mapping{HostPort: 80, ContainerPort: 80, HostIP: "localhost"}, wantErr: `hostIP "localhost" is not an IP address`},
	} {
		got, err := tc.m.Spec(tc.childIP)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%+v: got %v, want error containing %q", tc.m, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%+v: got %+v, %v; want %+v", tc.m, got, err, tc.want)
		}
	}
}

func TestSpecsRefusesDuplicateHostPorts(t *testing.T) {
	_, err := Specs([]Mapping{{HostPort: 8080, ContainerPort: 80}, {HostPort: 8080, ContainerPort: 81, HostIP: "127.0.0.1"}}, nil)
	if err == nil || !strings.Contains(err.Error(), "both claim host port 8080") {
		t.Fatalf("got %v, want a conflict naming host port 8080", err)
	}
	specs, err := Specs([]Mapping{{HostPort: 8080, ContainerPort: 80}, {HostPort: 8080, ContainerPort: 80, Protocol: "udp"}},
		func(host net.IP) string { return "10.0.2.100" })
	if err != nil || len(specs) != 2 || specs[1].ChildIP != "10.0.2.100" {
		t.Fatalf("tcp and udp on one port: got %+v, %v", specs, err)
	}
}
