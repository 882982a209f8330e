package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/portkit/portkit/internal/testenv"
)

// cniRuntime drives the plugins through libcni, the library container
// runtimes use, either in the test process (root) or in a copy of the test
// binary running as the unprivileged user that owns the netns, as a
// rootless runtime would.
type cniRuntime struct {
	user      *testenv.User // nil: in this process, as root
	pluginDir string
	cacheDir  string
	exe       string   // the test binary, where the user can run it
	env       []string // extra environment for plugins (e.g. PATH)
}

// cniRequest is one libcni call, sent to the runner child as JSON.
type cniRequest struct {
	Op             string               `json:"op"` // add check del gc status
	Conflist       json.RawMessage      `json:"conflist"`
	ContainerID    string               `json:"containerID,omitempty"`
	Netns          string               `json:"netns,omitempty"`
	IfName         string               `json:"ifname,omitempty"`
	CapabilityArgs map[string]any       `json:"capabilityArgs,omitempty"`
	Valid          []types.GCAttachment `json:"valid,omitempty"`
	PluginDir      string               `json:"pluginDir"`
	CacheDir       string               `json:"cacheDir"`
	PrevResult     json.RawMessage      `json:"prevResult,omitempty"` // unused by libcni: CHECK reads its cache
}

// cniResponse carries the result or the error, keeping the CNI error code.
type cniResponse struct {
	Result json.RawMessage `json:"result,omitempty"`
	Code   *uint           `json:"code,omitempty"`
	Msg    string          `json:"msg,omitempty"`
}

// cniError is a failed libcni call as the test sees it.
type cniError struct {
	Code uint // 0 when the failure was not a CNI error object
	Msg  string
}

func (e *cniError) Error() string { return fmt.Sprintf("CNI error %d: %s", e.Code, e.Msg) }

const envCNIChild = "PORTKIT_CNI_RUNNER_CHILD"

// newCNIRuntime prepares a runtime with the plugins built into one dir.
// With user set, libcni runs as that user.
func newCNIRuntime(t *testing.T, user *testenv.User) *cniRuntime {
	t.Helper()
	testenv.RequireRoot(t)
	usernet := testenv.Binary(t, "usernet")
	testenv.Binary(t, "portdriver")
	rt := &cniRuntime{user: user, pluginDir: filepath.Dir(usernet)}
	if user == nil {
		rt.cacheDir = t.TempDir()
		return rt
	}
	dir := user.Dir(t)
	rt.cacheDir = filepath.Join(dir, "cache")
	// The test binary sits in go test's private work dir; the user needs a copy.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	rt.exe = filepath.Join(dir, "cni-runner.test")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(rt.exe, data, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(rt.exe, user.UID, user.GID); err != nil {
		t.Fatal(err)
	}
	return rt
}

func (rt *cniRuntime) call(t *testing.T, req cniRequest) (json.RawMessage, error) {
	t.Helper()
	req.PluginDir, req.CacheDir = rt.pluginDir, rt.cacheDir
	var resp cniResponse
	if rt.user == nil {
		restore := setEnv(rt.env)
		resp = runCNI(req)
		restore()
	} else {
		in, _ := json.Marshal(req)
		cmd := rt.user.Cmd(rt.exe, "-test.run=^TestEntryCNIRunnerChild$", "-test.timeout=200s")
		cmd.Env = append(append(cmd.Env, envCNIChild+"=1"), rt.env...)
		cmd.Stdin = bytes.NewReader(in)
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.ExtraFiles = []*os.File{w}
		var stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stderr, &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		w.Close()
		out, _ := io.ReadAll(r)
		r.Close()
		werr := cmd.Wait()
		if err := json.Unmarshal(out, &resp); err != nil {
			t.Fatalf("cni runner as %s (%v): no answer: %v\n%s", rt.user.Name, werr, err, stderr.String())
		}
	}
	if resp.Code != nil || resp.Msg != "" {
		e := &cniError{Msg: resp.Msg}
		if resp.Code != nil {
			e.Code = *resp.Code
		}
		return nil, e
	}
	return resp.Result, nil
}

// setEnv applies KEY=VALUE pairs to this process (libcni hands its own
// environment to plugins) and returns a function that undoes it.
func setEnv(kvs []string) func() {
	var undo []func()
	for _, kv := range kvs {
		k, v, _ := strings.Cut(kv, "=")
		old, had := os.LookupEnv(k)
		os.Setenv(k, v)
		undo = append(undo, func() {
			if had {
				os.Setenv(k, old)
			} else {
				os.Unsetenv(k)
			}
		})
	}
	return func() {
		for _, u := range undo {
			u()
		}
	}
}

// runCNI performs req with libcni in this process.
func runCNI(req cniRequest) cniResponse {
	fail := func(err error) cniResponse {
		var te *types.Error
		if errors.As(err, &te) {
			code := te.Code
			return cniResponse{Code: &code, Msg: te.Msg + te.Details}
		}
		return cniResponse{Msg: err.Error()}
	}
	list, err := libcni.ConfListFromBytes(req.Conflist)
	if err != nil {
		return fail(err)
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{req.PluginDir}, req.CacheDir, nil)
	rt := &libcni.RuntimeConf{ContainerID: req.ContainerID, NetNS: req.Netns, IfName: req.IfName, CapabilityArgs: req.CapabilityArgs}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	switch req.Op {
	case "add":
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return fail(err)
		}
		var buf bytes.Buffer
		if err := res.PrintTo(&buf); err != nil {
			return fail(err)
		}
		return cniResponse{Result: buf.Bytes()}
	case "check":
		err = cni.CheckNetworkList(ctx, list, rt)
	case "del":
		err = cni.DelNetworkList(ctx, list, rt)
	case "gc":
		err = cni.GCNetworkList(ctx, list, &libcni.GCArgs{ValidAttachments: req.Valid})
	case "status":
		err = cni.GetStatusNetworkList(ctx, list)
	default:
		err = fmt.Errorf("unknown op %q", req.Op)
	}
	if err != nil {
		return fail(err)
	}
	return cniResponse{}
}

// TestEntryCNIRunnerChild is not a test: it is the entry point of the runner
// child that newCNIRuntime re-executes as the user. It answers on fd 3.
func TestEntryCNIRunnerChild(t *testing.T) {
	if os.Getenv(envCNIChild) == "" {
		t.Skip("entry point of the libcni runner child, run by the CNI tests as the test user")
	}
	var req cniRequest
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		t.Fatal(err)
	}
	resp := runCNI(req)
	out := os.NewFile(3, "answer")
	if err := json.NewEncoder(out).Encode(resp); err != nil {
		t.Fatal(err)
	}
	out.Close()
}

// add runs ADD and, as a runtime would, makes sure a DEL follows (DEL is
// idempotent, so tests that DEL themselves lose nothing).
func (rt *cniRuntime) add(t *testing.T, list []byte, a attachmentArgs) (json.RawMessage, error) {
	t.Helper()
	t.Cleanup(func() { _ = rt.del(t, list, a) })
	return rt.call(t, cniRequest{Op: "add", Conflist: list, ContainerID: a.containerID, Netns: a.netns, IfName: a.ifName, CapabilityArgs: a.caps})
}

func (rt *cniRuntime) check(t *testing.T, list []byte, a attachmentArgs) error {
	t.Helper()
	_, err := rt.call(t, cniRequest{Op: "check", Conflist: list, ContainerID: a.containerID, Netns: a.netns, IfName: a.ifName, CapabilityArgs: a.caps})
	return err
}

func (rt *cniRuntime) del(t *testing.T, list []byte, a attachmentArgs) error {
	t.Helper()
	_, err := rt.call(t, cniRequest{Op: "del", Conflist: list, ContainerID: a.containerID, Netns: a.netns, IfName: a.ifName, CapabilityArgs: a.caps})
	return err
}

func (rt *cniRuntime) gc(t *testing.T, list []byte, valid []types.GCAttachment) error {
	t.Helper()
	_, err := rt.call(t, cniRequest{Op: "gc", Conflist: list, Valid: valid})
	return err
}

func (rt *cniRuntime) status(t *testing.T, list []byte) error {
	t.Helper()
	_, err := rt.call(t, cniRequest{Op: "status", Conflist: list})
	return err
}

// attachmentArgs are the runtime's side of one attachment.
type attachmentArgs struct {
	containerID, netns, ifName string
	caps                       map[string]any
}
