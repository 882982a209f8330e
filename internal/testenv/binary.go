package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// packages maps each binary portkit ships to its package.
var packages = map[string]string{
	"portkit":          "./cmd/portkit",
	"usernet":          "./plugins/usernet",
	"portdriver":       "./plugins/portdriver",
	"portkit-oci-hook": "./hooks/portkit-oci-hook",
	"echod":            "./internal/testenv/echod", // static: runs in a busybox rootfs
}

var bins struct {
	sync.Mutex
	dir   string
	built map[string]string
}

// Binary builds one of portkit's binaries (once per test process) into a
// directory every user can read, so code under test can run as the test user.
func Binary(t testing.TB, name string) string {
	t.Helper()
	bins.Lock()
	defer bins.Unlock()
	if p, ok := bins.built[name]; ok {
		return p
	}
	pkg, ok := packages[name]
	if !ok {
		t.Fatalf("testenv: unknown binary %q", name)
	}
	if bins.dir == "" {
		dir, err := os.MkdirTemp("", "portkit-bin-")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		bins.dir, bins.built = dir, map[string]string{}
	}
	out := filepath.Join(bins.dir, name)
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Dir = ModuleRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
	bins.built[name] = out
	return out
}

// ModuleRoot is the directory holding portkit's go.mod.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("testenv: go.mod not found above the working directory")
		}
		dir = parent
	}
}

// Main runs the tests of a package and removes what testenv built.
// Use it as: func TestMain(m *testing.M) { testenv.Main(m) }.
func Main(m *testing.M) {
	code := m.Run()
	if bins.dir != "" {
		os.RemoveAll(bins.dir)
	}
	os.Exit(code)
}
