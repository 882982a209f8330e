#!/bin/bash
# engines-deps.sh: the container engines the engine tests (integration/engines_*_test.go)
# drive: containerd and Podman from Debian (as root; otherwise the exact
# apt-get line is printed), and nerdctl, crictl and cnitool built from the Go module
# proxy into a cache outside the repository:
#
#   $TOOLS_DIR/nerdctl-v1.7.7/nerdctl
#   $TOOLS_DIR/nerdctl-v1.7.7/containerd-rootless.sh   (nerdctl's extras, unmodified)
#   $TOOLS_DIR/crictl-v1.34.0/crictl
#   $TOOLS_DIR/cnitool-v1.3.0/cnitool                   (CNI's own runtime; the README's CNI session)
#
# TOOLS_DIR defaults to $HOME/.cache/portkit-tools (the Makefile's). The tests
# look there (PORTKIT_TOOLS_DIR overrides) and on PATH.
# `go install pkg@version` fails here (the proxy refuses version listing), so
# each tool is `go mod download`ed at its exact version and built in place.
# SKIP_DEPS=1 skips the Debian part (tests that need a missing tool skip).
set -euo pipefail

GO=${GO:-go}
TOOLS_DIR=${TOOLS_DIR:-$HOME/.cache/portkit-tools}
NERDCTL_VERSION=${NERDCTL_VERSION:-v1.7.7}
CRICTL_VERSION=${CRICTL_VERSION:-v1.34.0}
CNITOOL_VERSION=${CNITOOL_VERSION:-v1.3.0}

# ---- Debian packages ---------------------------------------------------------
# package -> a file it installs.
declare -A probe=(
	[containerd]=/usr/bin/containerd
	[podman]=/usr/bin/podman
	[containernetworking-plugins]=/usr/lib/cni/bridge
	[runc]=/usr/sbin/runc
	[uidmap]=/usr/bin/newuidmap
	[busybox-static]=/bin/busybox
	[util-linux]=/usr/bin/nsenter
	[iptables]=/usr/sbin/iptables # nerdctl's default network (bridge ipMasq, portmap, firewall) in the rootless child
)
if [ "${SKIP_DEPS:-}" != 1 ]; then
	missing=()
	for pkg in $(printf '%s\n' "${!probe[@]}" | sort); do
		[ -e "${probe[$pkg]}" ] || missing+=("$pkg")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		if [ "$(id -u)" -ne 0 ]; then
			echo "engines-deps: missing packages: ${missing[*]}" >&2
			echo "engines-deps: install them with:" >&2
			echo "    sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
			exit 1
		fi
		export DEBIAN_FRONTEND=noninteractive
		echo "engines-deps: installing ${missing[*]}"
		if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
			apt-get update -q
		fi
		# --no-install-recommends: Podman's recommends pull in buildah, dnsname
		# and more that the tests do not use.
		if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
			apt-get update -q
			apt-get install -y -q --no-install-recommends "${missing[@]}"
		fi
	fi
	# The packages start nothing we rely on; a containerd service (where an
	# init system runs it) does not disturb the tests: they run their own
	# containerd with its own root, state and socket.
else
	echo "engines-deps: SKIP_DEPS=1, not checking Debian packages"
fi

# ---- Go tools ----------------------------------------------------------------
# module_dir MODULE@VERSION prints the module's directory in the module cache.
module_dir() {
	local dir
	dir=$($GO mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	if [ -z "$dir" ]; then
		echo "engines-deps: go mod download $1 failed (is the Go module proxy reachable? GOPROXY=$($GO env GOPROXY))" >&2
		return 1
	fi
	echo "$dir"
}

mkdir -p "$TOOLS_DIR"

nerdctl_dir=$TOOLS_DIR/nerdctl-$NERDCTL_VERSION
if [ ! -x "$nerdctl_dir/nerdctl" ] || [ ! -x "$nerdctl_dir/containerd-rootless.sh" ]; then
	src=$(module_dir "github.com/containerd/nerdctl@$NERDCTL_VERSION")
	echo "engines-deps: building nerdctl $NERDCTL_VERSION into $nerdctl_dir (a few minutes on 2 cores)"
	mkdir -p "$nerdctl_dir"
	(cd "$src" && CGO_ENABLED=0 $GO build -o "$nerdctl_dir/nerdctl.tmp" ./cmd/nerdctl)
	install -m 0755 "$src/extras/rootless/containerd-rootless.sh" "$nerdctl_dir/containerd-rootless.sh"
	mv "$nerdctl_dir/nerdctl.tmp" "$nerdctl_dir/nerdctl"
fi

crictl_dir=$TOOLS_DIR/crictl-$CRICTL_VERSION
if [ ! -x "$crictl_dir/crictl" ]; then
	src=$(module_dir "sigs.k8s.io/cri-tools@$CRICTL_VERSION")
	echo "engines-deps: building crictl $CRICTL_VERSION into $crictl_dir"
	mkdir -p "$crictl_dir"
	(cd "$src" && CGO_ENABLED=0 $GO build -mod=mod -o "$crictl_dir/crictl.tmp" ./cmd/crictl)
	mv "$crictl_dir/crictl.tmp" "$crictl_dir/crictl"
fi

cnitool_dir=$TOOLS_DIR/cnitool-$CNITOOL_VERSION
if [ ! -x "$cnitool_dir/cnitool" ]; then
	src=$(module_dir "github.com/containernetworking/cni@$CNITOOL_VERSION")
	echo "engines-deps: building cnitool $CNITOOL_VERSION into $cnitool_dir"
	mkdir -p "$cnitool_dir"
	(cd "$src" && CGO_ENABLED=0 $GO build -o "$cnitool_dir/cnitool.tmp" ./cnitool)
	mv "$cnitool_dir/cnitool.tmp" "$cnitool_dir/cnitool"
fi

# The engine tests run these tools as the unprivileged test user too.
chmod 0755 "$TOOLS_DIR" "$nerdctl_dir" "$crictl_dir" "$cnitool_dir"
echo "engines-deps: nerdctl $nerdctl_dir/nerdctl, crictl $crictl_dir/crictl, cnitool $cnitool_dir/cnitool, containerd $(command -v containerd), podman $(command -v podman)"
