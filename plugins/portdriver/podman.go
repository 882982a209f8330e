package main

import (
	"fmt"
	"io"
)

// underRootlessPodman reports whether the plugin runs inside rootless
// Podman's user namespace (Podman marks its re-exec with
// _CONTAINERS_ROOTLESS_UID) and not under a RootlessKit-style launcher.
// There CNI plugins run in Podman's rootless-netns: a listener made there is
// reachable from nowhere, and Podman publishes -p itself (rootlessport).
func underRootlessPodman(getenv func(string) string) bool {
	return getenv("_CONTAINERS_ROOTLESS_UID") != "" && getenv("ROOTLESSKIT_STATE_DIR") == ""
}

// explainPodman tells the user, on the runtime's stderr, why portdriver
// publishes nothing under rootless Podman instead of fighting it for ports.
func explainPodman(w io.Writer, mappings int) {
	fmt.Fprintf(w, "portdriver: rootless Podman publishes ports itself (-p): leaving %d port mapping(s) to Podman; "+
		"a listener in Podman's rootless-netns would be unreachable. Use usernet alone as Podman's network.\n", mappings)
}
