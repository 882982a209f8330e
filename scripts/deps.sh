#!/bin/bash
# deps.sh: make sure the Debian packages portkit's tests, demo and bench use
# are installed. As root it installs what is missing (apt-get update first if
# needed); otherwise it prints the exact apt-get line and fails.
# SKIP_DEPS=1 skips the check (tests that need a missing tool then skip).
set -euo pipefail

if [ "${SKIP_DEPS:-}" = 1 ]; then
	echo "deps: SKIP_DEPS=1, not checking Debian packages"
	exit 0
fi

# package -> a file it installs, to tell whether it is there without dpkg
# (works on a developer machine whose tools came from elsewhere too).
declare -A probe=(
	[slirp4netns]=slirp4netns
	[passt]=pasta
	[socat]=socat
	[uidmap]=newuidmap
	[iproute2]=ip
	[runc]=runc
	[crun]=crun
	[rootlesskit]=rootlessctl
	[iperf3]=iperf3
	[wrk]=wrk
	[busybox-static]=/bin/busybox
	[containernetworking-plugins]=/usr/lib/cni/bridge
	[util-linux]=nsenter
	[gcc]=gcc # go test -race needs cgo
	[libc6-dev]=/usr/include/stdio.h
	[git]=git
	[ca-certificates]=/etc/ssl/certs/ca-certificates.crt
)

missing=()
for pkg in $(printf '%s\n' "${!probe[@]}" | sort); do
	p=${probe[$pkg]}
	if [[ $p == /* ]]; then
		[ -e "$p" ] && continue
	else
		PATH=$PATH:/usr/sbin:/sbin command -v "$p" >/dev/null 2>&1 && continue
	fi
	missing+=("$pkg")
done

if [ ${#missing[@]} -eq 0 ]; then
	echo "deps: all Debian packages present"
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "deps: missing packages: ${missing[*]}" >&2
	echo "deps: install them with:" >&2
	echo "    sudo apt-get install -y ${missing[*]}" >&2
	echo "deps: or run with SKIP_DEPS=1 (tests that need them will skip)" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "deps: installing ${missing[*]}"
# A fresh machine has empty package lists; update once, and retry after an
# update if the lists were stale.
if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
	apt-get update -q
fi
if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
	apt-get update -q
	apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
