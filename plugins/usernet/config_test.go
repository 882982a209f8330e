package main

import (
	"github.com/portkit/portkit/plugins/internal/cniconf"

	"errors"
	"net"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
)

func TestParseConfigDefaults(t *testing.T) {
	c, err := parseConfig([]byte(`{"cniVersion":"1.1.0","name":"rootless","type":"usernet"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Backend != "slirp4netns" || c.MTU != 65520 || c.CIDR != "10.0.2.0/24" || c.IPv6 || c.DisableHostLoopback {
		t.Fatalf("defaults: got %+v", c)
	}
}

func TestParseConfigRefusesBadFieldsByName(t *testing.T) {
	base := `"cniVersion":"1.1.0","name":"rootless","type":"usernet"`
	for _, tc := range []struct{ body, field, says string }{
		{`"backend":"vde"`, "backend", `"vde" is not a backend`},
		{`"mtu":"big"`, "mtu", "got a JSON string, want a number"},
		{`"mtu":20`, "mtu", "out of range 68-65521"},
		{`"mtu":1000,"ipv6":true`, "mtu", "out of range 1280-65521"},
		{`"mtu":65521,"backend":"pasta"`, "mtu", "out of range 68-65520"},
		{`"cidr":"10.0.2.0"`, "cidr", "not a CIDR"},
		{`"cidr":"fd00::/64"`, "cidr", "not IPv4"},
		{`"cidr":"10.0.2.0/28"`, "cidr", "too small"},
		{`"backend":"pasta","sandbox":true`, "sandbox", "slirp4netns option"},
		{`"backend":"pasta","seccomp":true`, "seccomp", "slirp4netns option"},
		{`"outboundAddr":"eth0x"`, "outboundAddr", "not an IP address"},
		{`"ipv6":"yes"`, "ipv6", "want a boolean"},
		{`"mtuu":1500`, "mtuu", "unknown field"},
		{`"runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80}]}`, "runtimeConfig.portMappings", "slirp4netns takes no ports at start"},
		{`"backend":"pasta","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"sctp"}]}`, "runtimeConfig.portMappings", `"sctp" is not supported`},
	} {
		_, err := parseConfig([]byte("{" + base + "," + tc.body + "}"))
		var fe *cniconf.FieldError
		if !errors.As(err, &fe) || fe.Field != tc.field || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: got %v, want field %q and %q", tc.body, err, tc.field, tc.says)
			continue
		}
		// Bad config is CNI error 7, as the spec says.
		var te *types.Error
		if !errors.As(cniconf.Error(err), &te) || te.Code != types.ErrInvalidNetworkConfig || !strings.Contains(te.Msg, `"`+tc.field+`"`) {
			t.Errorf("%s: CNI error %+v, want code 7 naming %q", tc.body, te, tc.field)
		}
	}
}

func TestParseConfigAcceptsRuntimeKeys(t *testing.T) {
	// What libcni and runtimes add around the user's fields must not count as unknown.
	_, err := parseConfig([]byte(`{"cniVersion":"1.1.0","name":"n","type":"usernet","backend":"pasta",
		"capabilities":{"portMappings":true},"runtimeConfig":{"portMappings":[{"HostPort":8080,"ContainerPort":80,"Protocol":"tcp","HostIP":""}]},
		"cni.dev/valid-attachments":[],"cni.dev/attachments":[],"args":{}}`))
	if err != nil {
		t.Fatal(err)
	}
}

func TestBuildResult(t *testing.T) {
	c, err := parseConfig([]byte(`{"cniVersion":"1.0.0","name":"n","type":"usernet","ipv6":true}`))
	if err != nil {
		t.Fatal(err)
	}
	_, v4, _ := net.ParseCIDR("10.0.2.100/24")
	v4.IP = net.ParseIP("10.0.2.100").To4()
	v6 := net.IPNet{IP: net.ParseIP("fd00::100"), Mask: net.CIDRMask(64, 128)}
	link := &linkState{Name: "eth0", MAC: "02:00:00:00:00:01", MTU: 65520, Up: true,
		Addrs: []net.IPNet{*v4, v6}, Gateways: []net.IP{net.ParseIP("10.0.2.2").To4(), net.ParseIP("fd00::2")}}
	res, err := buildResult(c, &skel.CmdArgs{Netns: "/proc/1/ns/net", IfName: "eth0"}, link)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Interfaces) != 1 || res.Interfaces[0].Sandbox != "/proc/1/ns/net" || res.Interfaces[0].Mac != link.MAC || res.Interfaces[0].Mtu != 65520 {
		t.Fatalf("interfaces: %+v", res.Interfaces[0])
	}
	if len(res.IPs) != 2 || !res.IPs[0].Gateway.Equal(net.ParseIP("10.0.2.2")) || !res.IPs[1].Gateway.Equal(net.ParseIP("fd00::2")) || *res.IPs[1].Interface != 0 {
		t.Fatalf("ips: %v", res.IPs)
	}
	if len(res.Routes) != 2 || res.Routes[0].Dst.String() != "0.0.0.0/0" || res.Routes[1].Dst.String() != "::/0" {
		t.Fatalf("routes: %v", res.Routes)
	}
	if strings.Join(res.DNS.Nameservers, ",") != "10.0.2.3,fd00::3" {
		t.Fatalf("dns: %v", res.DNS.Nameservers)
	}
	if err := compare(res, &skel.CmdArgs{Netns: "/proc/1/ns/net", IfName: "eth0"}, link); err != nil {
		t.Fatalf("CHECK against its own result: %v", err)
	}
	link.Addrs = link.Addrs[1:]
	if err := compare(res, &skel.CmdArgs{Netns: "/proc/1/ns/net", IfName: "eth0"}, link); err == nil || !strings.Contains(err.Error(), "lacks address 10.0.2.100/24") {
		t.Fatalf("CHECK with an address gone: %v", err)
	}
}
