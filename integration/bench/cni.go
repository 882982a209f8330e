package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/portkit/portkit/internal/testenv"
)

// benchConflist is usernet (slirp4netns) with portdriver (builtin) chained:
// the set-up the CNI ADD figure is about.
const benchConflist = `{
  "cniVersion": "1.0.0",
  "name": "portkit-bench",
  "plugins": [
    {"type": "usernet", "backend": "slirp4netns"},
    {"type": "portdriver", "driver": "builtin", "capabilities": {"portMappings": true}}
  ]
}`

// startCNI runs CNI ADD of benchConflist through libcni, the plugins running
// as the unprivileged user who owns the netns; DEL at teardown.
func startCNI(e *env, s *scope, ports []mapping) (*instance, error) {
	var ns *testenv.Netns
	if err, skipped := s.run(func() error { ns = testenv.ChildNetns(s, e.user); return nil }); err != nil {
		return nil, skipOr(err, skipped)
	}
	list, err := libcni.ConfListFromBytes([]byte(benchConflist))
	if err != nil {
		return nil, err
	}
	cacheDir := e.user.Dir(s)
	cni := libcni.NewCNIConfigWithCacheDir([]string{e.bins.dir}, cacheDir, &userExec{user: e.user})
	var pm []map[string]any
	for _, m := range ports {
		pm = append(pm, map[string]any{"hostPort": m.host, "containerPort": m.child, "protocol": m.proto, "hostIP": m.hostIP})
	}
	rt := &libcni.RuntimeConf{ContainerID: fmt.Sprintf("bench%d", os.Getpid()), NetNS: ns.Path, IfName: "eth0",
		CapabilityArgs: map[string]any{"portMappings": pm}}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t0 := time.Now()
	if _, err := cni.AddNetworkList(ctx, list, rt); err != nil {
		return nil, fmt.Errorf("CNI ADD usernet+portdriver: %w", err)
	}
	took := time.Since(t0)
	s.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fmt.Fprintf(os.Stderr, "portkit-cni: CNI DEL: %v\n", err)
		}
	})
	return &instance{childPID: ns.PID, bindAddr: "0.0.0.0", setupMs: float64(took.Microseconds()) / 1000}, nil
}

// userExec runs CNI plugins as u (libcni's RawExec runs them as the caller).
type userExec struct{ user *testenv.User }

func (x *userExec) ExecPlugin(ctx context.Context, path string, stdin []byte, environ []string) ([]byte, error) {
	proto := x.user.Cmd(path)
	cmd := exec.CommandContext(ctx, path)
	cmd.SysProcAttr = proto.SysProcAttr
	cmd.Env = append(x.user.Env(), environ...)
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		var cniErr types.Error
		if json.Unmarshal(stdout.Bytes(), &cniErr) == nil && cniErr.Msg != "" {
			return nil, &cniErr
		}
		return nil, fmt.Errorf("%s: %w: %s%s", path, err, stdout.String(), strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

func (x *userExec) FindInPath(plugin string, paths []string) (string, error) {
	return invoke.FindInPath(plugin, paths)
}

func (x *userExec) Decode(b []byte) (version.PluginInfo, error) {
	return (&version.PluginDecoder{}).Decode(b)
}
