package libport

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// rootlessctlDiffers lists every spec in parseCases and parseErrorCases on
// which ParseSpec and rootlessctl 1.1's parser (portutil.ParsePortSpec) part
// ways, and why. Anything not listed must parse to the same Spec in both, or
// fail in both.
var rootlessctlDiffers = map[string]string{
	// portkit's additions to the grammar.
	"8080:80/tcp":                       "no parent IP at all, as in docker run -p",
	"8080:10.0.2.100:80/tcp":            "no parent IP at all, as in docker run -p",
	"8080::80/tcp":                      "no parent IP at all, as in docker run -p",
	"127.0.0.1:8000-8002:9000-9002/tcp": "port range",
	"[::1]:8000-8001:[::1]:80-81/tcp6":  "port range",
	"5000-5000:6000-6000/udp":           "port range",
	// Parsed by rootlessctl and refused only by RootlessKit's server (or
	// the kernel); portkit refuses them up front.
	"127.0.0.1:8080:80/sctp":       "sctp is not forwarded by any portkit driver",
	"127.0.0.1:0:80/tcp":           "port 0",
	"127.0.0.1:8080:0/tcp":         "port 0",
	"127.0.0.1:65536:80/tcp":       "port above 65535",
	"127.0.0.1:8080:65536/udp":     "port above 65535",
	"[::1]:8080:80/tcp4":           "IPv6 address on an IPv4-only protocol",
	"127.0.0.1:8080:[::1]:80/udp4": "IPv6 address on an IPv4-only protocol",
	"127.0.0.1:8080:80/tcp6":       "IPv4 address on an IPv6-only protocol",
	"[::1]:8080:10.0.0.1:80/udp6":  "IPv4 address on an IPv6-only protocol",
	"127.0.0.1:+8080:80/tcp":       "text/scanner in rootlessctl glues the sign to the number",
	"127.0.0.1:8080:-80/tcp":       "negative port",
	"1.2.3.4:1:5.6.7.8:2:3/tcp":    "text/scanner in rootlessctl glues the extra field onto the child port (posts 32)",
	"127.0.0.1: 8080:80/tcp":       "text/scanner in rootlessctl skips the blank",
}

// TestParseSpecLikeRootlessctl runs Debian's unmodified rootlessctl
// add-ports on every spec of our grammar tables against a server that
// records the JSON it posts, and compares the spec it sent with ours.
func TestParseSpecLikeRootlessctl(t *testing.T) {
	rootlessctl, err := exec.LookPath("rootlessctl")
	if err != nil {
		t.Skip("rootlessctl is not installed (package rootlesskit; make test installs it as root)")
	}
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var posted []byte
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		posted = body
		mu.Unlock()
		w.WriteHeader(http.StatusBadRequest)
		io.WriteString(w, `{"message":"recorded"}`)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })

	var inputs []string
	for _, tc := range parseCases {
		inputs = append(inputs, tc.in)
	}
	for _, tc := range parseErrorCases {
		inputs = append(inputs, tc.in)
	}
	for _, in := range inputs {
		if in == "" {
			continue // urfave/cli drops an empty argument: nothing to compare
		}
		mu.Lock()
		posted = nil
		mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		out, _ := exec.CommandContext(ctx, rootlessctl, "--socket", sock, "add-ports", in).CombinedOutput()
		cancel()
		mu.Lock()
		body := posted
		mu.Unlock()
		var theirs *Spec
		switch {
		case strings.HasSuffix(strings.TrimSpace(string(out)), "error: recorded"):
			theirs = new(Spec)
			if err := json.Unmarshal(body, theirs); err != nil {
				t.Fatalf("rootlessctl add-ports %q posted %q: %v", in, body, err)
			}
		case body != nil:
			t.Fatalf("rootlessctl add-ports %q posted %q but said %q", in, body, out)
		}
		ours, oursErr := ParseSpec(in)
		same := (theirs == nil && oursErr != nil) ||
			(theirs != nil && oursErr == nil && reflect.DeepEqual(ours, []Spec{*theirs}))
		reason, listed := rootlessctlDiffers[in]
		switch {
		case !same && !listed:
			t.Errorf("spec %q: rootlessctl parsed %+v (said %q), ParseSpec gave %+v, %v",
				in, theirs, strings.TrimSpace(string(out)), ours, oursErr)
		case same && listed:
			t.Errorf("spec %q: listed as differing from rootlessctl (%s) but parses the same", in, reason)
		}
	}
}
