package main

import (
	"strings"
	"testing"
)

func TestUnderRootlessPodman(t *testing.T) {
	for _, tc := range []struct {
		env  map[string]string
		want bool
	}{
		{env: map[string]string{}, want: false},
		{env: map[string]string{"_CONTAINERS_ROOTLESS_UID": "1000"}, want: true},
		// nerdctl under RootlessKit (or portkit run): the listener is reachable
		// through the launcher's port driver, so portdriver publishes.
		{env: map[string]string{"_CONTAINERS_ROOTLESS_UID": "1000", "ROOTLESSKIT_STATE_DIR": "/run/user/1000/x"}, want: false},
	} {
		if got := underRootlessPodman(func(k string) string { return tc.env[k] }); got != tc.want {
			t.Errorf("env %v: underRootlessPodman = %v, want %v", tc.env, got, tc.want)
		}
	}
	var b strings.Builder
	explainPodman(&b, 2)
	if !strings.Contains(b.String(), "leaving 2 port mapping(s) to Podman") || !strings.Contains(b.String(), "usernet alone") {
		t.Errorf("explanation %q does not say what happens and what to do", b.String())
	}
}
