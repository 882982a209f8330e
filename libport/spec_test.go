package libport

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func tcp(parentIP string, parentPort int, childIP string, childPort int) Spec {
	return Spec{Proto: "tcp", ParentIP: parentIP, ParentPort: parentPort, ChildIP: childIP, ChildPort: childPort}
}

// parseCases are specs ParseSpec accepts; TestParseSpecLikeRootlessctl
// replays them through rootlessctl too.
var parseCases = []struct {
	in   string
	want []Spec
}{
	// RootlessKit's own examples (portutil_test.go, rootlessctl --help).
	{"127.0.0.1:8080:80/tcp", []Spec{tcp("127.0.0.1", 8080, "", 80)}},
	{"127.0.0.1:8080:10.0.2.100:80/tcp", []Spec{tcp("127.0.0.1", 8080, "10.0.2.100", 80)}},
	{"[::1]:8080:80/tcp", []Spec{tcp("::1", 8080, "", 80)}},
	{"[::1]:8080:[::2]:80/udp", []Spec{{Proto: "udp", ParentIP: "::1", ParentPort: 8080, ChildIP: "::2", ChildPort: 80}}},
	// Every protocol.
	{"0.0.0.0:1:2/tcp4", []Spec{{Proto: "tcp4", ParentIP: "0.0.0.0", ParentPort: 1, ChildPort: 2}}},
	{"[::]:65535:65535/tcp6", []Spec{{Proto: "tcp6", ParentIP: "::", ParentPort: 65535, ChildPort: 65535}}},
	{"127.0.0.1:53:53/udp4", []Spec{{Proto: "udp4", ParentIP: "127.0.0.1", ParentPort: 53, ChildPort: 53}}},
	{"[fd00::1]:53:[fd00::2]:53/udp6", []Spec{{Proto: "udp6", ParentIP: "fd00::1", ParentPort: 53, ChildIP: "fd00::2", ChildPort: 53}}},
	// Forms RootlessKit's parser accepts that look odd: an empty parent
	// IP before the first colon, an empty child IP, bracketed IPv4.
	{":8080:80/tcp", []Spec{tcp("", 8080, "", 80)}},
	{":8080:10.0.2.100:80/tcp", []Spec{tcp("", 8080, "10.0.2.100", 80)}},
	{"127.0.0.1:8080::80/tcp", []Spec{tcp("127.0.0.1", 8080, "", 80)}},
	{"[127.0.0.1]:8080:80/tcp", []Spec{tcp("127.0.0.1", 8080, "", 80)}},
	{"[]:8080:80/tcp", []Spec{tcp("", 8080, "", 80)}},
	{"127.0.0.1:08080:080/tcp", []Spec{tcp("127.0.0.1", 8080, "", 80)}},
	{"[::ffff:10.0.0.1]:80:80/tcp4", []Spec{{Proto: "tcp4", ParentIP: "::ffff:10.0.0.1", ParentPort: 80, ChildPort: 80}}},
	// portkit's additions: the parent IP may be left out entirely (as in
	// `docker run -p`), and port ranges expand to one spec per port.
	{"8080:80/tcp", []Spec{tcp("", 8080, "", 80)}},
	{"8080:10.0.2.100:80/tcp", []Spec{tcp("", 8080, "10.0.2.100", 80)}},
	{"8080::80/tcp", []Spec{tcp("", 8080, "", 80)}},
	{"127.0.0.1:8000-8002:9000-9002/tcp", []Spec{
		tcp("127.0.0.1", 8000, "", 9000), tcp("127.0.0.1", 8001, "", 9001), tcp("127.0.0.1", 8002, "", 9002)}},
	{"[::1]:8000-8001:[::1]:80-81/tcp6", []Spec{
		{Proto: "tcp6", ParentIP: "::1", ParentPort: 8000, ChildIP: "::1", ChildPort: 80},
		{Proto: "tcp6", ParentIP: "::1", ParentPort: 8001, ChildIP: "::1", ChildPort: 81}}},
	{"5000-5000:6000-6000/udp", []Spec{{Proto: "udp", ParentPort: 5000, ChildPort: 6000}}},
}

func TestParseSpec(t *testing.T) {
	for _, tc := range parseCases {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSpec(tc.in)
			if err != nil {
				t.Fatalf("ParseSpec(%q): %v", tc.in, err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("ParseSpec(%q) = %+v, want %+v", tc.in, got, tc.want)
			}
		})
	}
}

// parseErrorCases are specs ParseSpec refuses, with a part of the error
// that says what is wrong.
var parseErrorCases = []struct {
	in   string
	want string
}{
	{"", "missing protocol"},
	{"127.0.0.1:8080:80", "missing protocol"},
	{"127.0.0.1:8080:80/sctp", `unknown protocol "sctp"`},
	{"127.0.0.1:8080:80/TCP", `unknown protocol "TCP"`},
	{"127.0.0.1:8080:80/", `unknown protocol ""`},
	{"127.0.0.1:8080:80/tcp/tcp", `unknown protocol "tcp/tcp"`},
	{"8080/tcp", "want [parentIP:]parentPort:[childIP:]childPort/proto"},
	{"1.2.3.4:1:5.6.7.8:2:3/tcp", "want [parentIP:]parentPort:[childIP:]childPort/proto"},
	{"::1:8080:80/tcp", "want [parentIP:]parentPort:[childIP:]childPort/proto"},
	{"localhost:8080:80/tcp", `parent IP "localhost" is not an IP address`},
	{"127.0.0.1:8080:localhost:80/tcp", `child IP "localhost" is not an IP address`},
	{"300.0.0.1:8080:80/tcp", `parent IP "300.0.0.1" is not an IP address`},
	{"[fe80::1%eth0]:8080:80/tcp", `parent IP "fe80::1%eth0" is not an IP address`},
	{"8080:80:90/tcp", `parent IP "8080" is not an IP address`},
	{"[::1:8080:80/tcp", "unclosed '['"},
	{"[::1]8080:80/tcp", "want ':' after ']'"},
	{"127.0.0.1:0:80/tcp", "parent port 0 is out of range 1-65535"},
	{"127.0.0.1:8080:0/tcp", "child port 0 is out of range 1-65535"},
	{"127.0.0.1:65536:80/tcp", "parent port 65536 is out of range 1-65535"},
	{"127.0.0.1:8080:65536/udp", "child port 65536 is out of range 1-65535"},
	{"127.0.0.1:99999999999999999999:80/tcp", "parent port 99999999999999999999 is out of range"},
	{"127.0.0.1::80/tcp", `parent port "" is not a number`},
	{"127.0.0.1:http:80/tcp", `parent port "http" is not a number`},
	{"127.0.0.1:+8080:80/tcp", `parent port "+8080" is not a number`},
	{"127.0.0.1:8080:-80/tcp", `child port "" is not a number`},
	{"127.0.0.1: 8080:80/tcp", `parent port " 8080" is not a number`},
	{"[::1]:8080:80/tcp4", "parent IP ::1 is IPv6 but the protocol is IPv4-only"},
	{"127.0.0.1:8080:[::1]:80/udp4", "child IP ::1 is IPv6 but the protocol is IPv4-only"},
	{"127.0.0.1:8080:80/tcp6", "parent IP 127.0.0.1 is IPv4 but the protocol is IPv6-only"},
	{"[::1]:8080:10.0.0.1:80/udp6", "child IP 10.0.0.1 is IPv4 but the protocol is IPv6-only"},
	{"8009-8000:9009-9000/tcp", "parent port range 8009-8000 runs backwards"},
	{"8000-8009:9009-9000/tcp", "child port range 9009-9000 runs backwards"},
	{"8000-8009:9000-9004/tcp", "parent range 8000-8009 has 10 ports but child range 9000-9004 has 5"},
	{"8000-8009:80/tcp", "parent range 8000-8009 has 10 ports but child range 80 has 1"},
	{"8000-:80/tcp", `parent port "" is not a number`},
	{"0-5:0-5/tcp", "parent port 0 is out of range"},
	{"65535-65536:1-2/tcp", "parent port 65536 is out of range"},
}

func TestParseSpecErrors(t *testing.T) {
	for _, tc := range parseErrorCases {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSpec(tc.in)
			if err == nil {
				t.Fatalf("ParseSpec(%q) = %+v, want an error saying %q", tc.in, got, tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ParseSpec(%q) error %q does not say %q", tc.in, err, tc.want)
			}
			// The user must see which of several specs was wrong.
			if quoted := `port spec "` + tc.in + `"`; !strings.Contains(err.Error(), quoted) {
				t.Fatalf("ParseSpec(%q) error %q does not quote the input", tc.in, err)
			}
		})
	}
}

func TestSpecStringRoundTrip(t *testing.T) {
	for _, in := range []string{
		"127.0.0.1:8080:80/tcp",
		"127.0.0.1:8080:10.0.2.100:80/tcp",
		"[::1]:8080:[::2]:80/udp6",
		"[::]:1:65535/tcp",
		"8080:80/udp",
		"8080:10.0.2.100:80/udp4",
		"[::ffff:10.0.0.1]:80:80/tcp4",
	} {
		specs, err := ParseSpec(in)
		if err != nil {
			t.Fatalf("ParseSpec(%q): %v", in, err)
		}
		if got := specs[0].String(); got != in {
			t.Errorf("ParseSpec(%q)[0].String() = %q, want the input back", in, got)
		}
		again, err := ParseSpec(specs[0].String())
		if err != nil || !reflect.DeepEqual(again, specs) {
			t.Errorf("ParseSpec(String()) of %q = %+v, %v; want %+v", in, again, err, specs)
		}
	}
}

// TestSpecJSON pins the wire form: RootlessKit's field names and order, zero
// values left out, as rootlessctl --json prints them.
func TestSpecJSON(t *testing.T) {
	for _, tc := range []struct {
		spec Spec
		want string
	}{
		{Spec{Proto: "tcp", ParentIP: "127.0.0.1", ParentPort: 8080, ChildPort: 80},
			`{"proto":"tcp","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}`},
		{Spec{Proto: "tcp6", ParentIP: "::1", ParentPort: 18082, ChildIP: "::1", ChildPort: 80},
			`{"proto":"tcp6","parentIP":"::1","parentPort":18082,"childPort":80,"childIP":"::1"}`},
		{Spec{Proto: "udp", ParentPort: 53, ChildPort: 53},
			`{"proto":"udp","parentPort":53,"childPort":53}`},
	} {
		b, err := json.Marshal(Status{ID: 7, Spec: tc.spec})
		if err != nil {
			t.Fatal(err)
		}
		if want := `{"id":7,"spec":` + tc.want + `}`; string(b) != want {
			t.Errorf("json of %v = %s, want %s", tc.spec, b, want)
		}
	}
}

func TestValidate(t *testing.T) {
	ok := Spec{Proto: "tcp", ParentPort: 80, ChildPort: 80}
	if err := ok.Validate(); err != nil {
		t.Fatalf("Validate(%v): %v", ok, err)
	}
	for _, tc := range []struct {
		spec Spec
		want string
	}{
		{Spec{ParentPort: 80, ChildPort: 80}, `unknown protocol ""`},
		{Spec{Proto: "sctp", ParentPort: 80, ChildPort: 80}, `unknown protocol "sctp"`},
		{Spec{Proto: "tcp", ParentPort: -1, ChildPort: 80}, "parent port -1 is out of range"},
		{Spec{Proto: "tcp", ParentPort: 80, ChildPort: 1 << 20}, "child port 1048576 is out of range"},
		{Spec{Proto: "tcp", ParentIP: "bad", ParentPort: 80, ChildPort: 80}, `parent IP "bad" is not an IP address`},
		{Spec{Proto: "udp4", ParentPort: 80, ChildIP: "::1", ChildPort: 80}, "child IP ::1 is IPv6"},
	} {
		err := tc.spec.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Validate(%+v) = %v, want an error saying %q", tc.spec, err, tc.want)
		}
	}
}

func TestConflicts(t *testing.T) {
	spec := func(text string) Spec {
		t.Helper()
		s, err := ParseSpec(text)
		if err != nil {
			t.Fatal(err)
		}
		return s[0]
	}
	for _, tc := range []struct {
		a, b     string
		conflict bool
	}{
		{"127.0.0.1:8080:80/tcp", "127.0.0.1:8080:81/tcp", true}, // child side does not matter
		{"127.0.0.1:8080:80/tcp", "127.0.0.2:8080:80/tcp", false},
		{"127.0.0.1:8080:80/tcp", "127.0.0.1:8081:80/tcp", false},
		{"127.0.0.1:8080:80/tcp", "127.0.0.1:8080:80/udp", false},
		{"8080:80/tcp", "8080:80/udp", false},
		// 0.0.0.0 overlaps every IPv4 address, in every tcp flavour.
		{"0.0.0.0:8080:80/tcp4", "127.0.0.1:8080:80/tcp4", true},
		{"0.0.0.0:8080:80/tcp4", "10.1.2.3:8080:80/tcp", true},
		{"0.0.0.0:8080:80/udp4", "127.0.0.1:8080:80/udp", true},
		{"0.0.0.0:8080:80/tcp4", "[::1]:8080:80/tcp6", false},
		{"0.0.0.0:8080:80/tcp4", "[::]:8080:80/tcp6", false},
		// Plain tcp/udp on 0.0.0.0, :: or no address is dual-stack: both families.
		{"0.0.0.0:8080:80/tcp", "[::1]:8080:80/tcp6", true},
		{"0.0.0.0:8080:80/tcp", "127.0.0.1:8080:80/tcp4", true},
		{"[::]:8080:80/tcp", "127.0.0.1:8080:80/tcp4", true},
		{"[::]:8080:80/udp", "[fd00::1]:8080:80/udp6", true},
		{"8080:80/tcp", "[::1]:8080:80/tcp", true},
		{"8080:80/tcp", "0.0.0.0:8080:80/tcp4", true},
		{"[::]:8080:80/tcp", "0.0.0.0:8080:80/tcp", true},
		// tcp6 on :: is IPv6-only, tcp4 is IPv4-only.
		{"[::]:8080:80/tcp6", "127.0.0.1:8080:80/tcp4", false},
		{"[::]:8080:80/tcp6", "0.0.0.0:8080:80/tcp4", false},
		{"[::]:8080:80/tcp6", "[::1]:8080:80/tcp", true},
		// A specific address occupies only its own family.
		{"127.0.0.1:8080:80/tcp", "[::1]:8080:80/tcp", false},
		{"127.0.0.1:8080:80/tcp", "[::]:8080:80/tcp6", false},
		{"[::1]:8080:80/tcp", "[::2]:8080:80/tcp", false},
		{"[::1]:8080:80/tcp", "[::1]:8080:80/tcp6", true},
		// The same address written two ways.
		{"127.0.0.1:8080:80/tcp", "[::ffff:127.0.0.1]:8080:80/tcp", true},
	} {
		a, b := spec(tc.a), spec(tc.b)
		if got := Conflicts(a, b); got != tc.conflict {
			t.Errorf("Conflicts(%s, %s) = %v, want %v", tc.a, tc.b, got, tc.conflict)
		}
		if got := Conflicts(b, a); got != tc.conflict {
			t.Errorf("Conflicts(%s, %s) = %v, want %v (not symmetric)", tc.b, tc.a, got, tc.conflict)
		}
	}
}

// TestTransportAndFamily covers the helpers drivers pick listeners with.
func TestTransportAndFamily(t *testing.T) {
	for _, tc := range []struct {
		proto, transport string
		family           int
	}{
		{"tcp", "tcp", 0}, {"tcp4", "tcp", 4}, {"tcp6", "tcp", 6},
		{"udp", "udp", 0}, {"udp4", "udp", 4}, {"udp6", "udp", 6},
	} {
		s := Spec{Proto: tc.proto}
		if s.Transport() != tc.transport || s.Family() != tc.family {
			t.Errorf("%s: Transport %q Family %d, want %q %d", tc.proto, s.Transport(), s.Family(), tc.transport, tc.family)
		}
	}
}
