#!/bin/bash
# portkit demo: a web server inside `portkit run` (new user + network
# namespaces, slirp4netns uplink, builtin port driver), reached from the host
# through a published port, and what the server saw as the client address.
#
# Runs as the current user; as root also as the unprivileged user
# portkit-test (created, with /etc/subuid and /etc/subgid ranges, as the
# tests create it), because rootless is the point.
#
#   scripts/demo.sh            (make demo builds first, then runs this)
#   DEMO_PORT=18080 scripts/demo.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PORT="${DEMO_PORT:-8080}"
DEMO_USER=portkit-test
PACKAGES="slirp4netns busybox-static uidmap"

say() { printf '\n== %s\n' "$*"; }

need_packages() {
	local missing=()
	command -v slirp4netns >/dev/null || missing+=(slirp4netns)
	command -v busybox >/dev/null || missing+=(busybox-static)
	command -v newuidmap >/dev/null || missing+=(uidmap)
	[ ${#missing[@]} -eq 0 ] && return 0
	if [ "$(id -u)" -eq 0 ]; then
		say "installing ${missing[*]}"
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
	else
		echo "demo: missing ${missing[*]}; install them with:" >&2
		echo "  sudo apt-get install -y --no-install-recommends $PACKAGES" >&2
		exit 1
	fi
}

# The demo runs busybox httpd with a CGI script that prints the client
# address the server saw (busybox wget -T segfaults in Debian 12: use timeout); files live in a directory every user can read.
WORK="$(mktemp -d /tmp/portkit-demo.XXXXXX)"
PIDS=()
cleanup() {
	for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

setup_files() {
	chmod 755 "$WORK"
	mkdir -p "$WORK/bin" "$WORK/www/cgi-bin"
	if [ ! -x bin/portkit ]; then
		say "building bin/portkit"
		go build -o bin/portkit ./cmd/portkit
	fi
	install -m 0755 bin/portkit "$WORK/bin/portkit"
	echo "hello from inside portkit run" >"$WORK/www/index.html"
	cat >"$WORK/www/cgi-bin/client" <<-'EOF'
		#!/bin/sh
		echo "Content-Type: text/plain"
		echo
		echo "server in the child saw the client as $REMOTE_ADDR:$REMOTE_PORT"
	EOF
	chmod -R a+rX "$WORK/www"
	chmod 755 "$WORK/www/cgi-bin/client"
}

port_free() {
	! busybox nc -z 127.0.0.1 "$1" 2>/dev/null
}

# as_prefix USER: sets AS to the command prefix that runs a command as USER
# (nothing for the current user); setpriv and env exec, so $! is portkit's PID.
as_prefix() {
	AS=()
	if [ -n "$1" ]; then
		AS=(setpriv --reuid="$1" --regid="$1" --init-groups
			env HOME="$(getent passwd "$1" | cut -d: -f6)" USER="$1" LOGNAME="$1")
	fi
}

demo_as() {
	local user="$1" label="${1:-$(id -un)}" port="$PORT"
	while ! port_free "$port"; do port=$((port + 1)); done
	local state="$WORK/state-$label"
	if [ -n "$user" ]; then
		install -d -m 0700 -o "$user" -g "$user" "$WORK/run-$label"
		state="$WORK/run-$label/state"
	fi

	say "as $label (uid $(id -u "$label")): portkit run --net=slirp4netns --port-driver=builtin -p 127.0.0.1:$port:80/tcp -- busybox httpd"
	as_prefix "$user"
	"${AS[@]}" "$WORK/bin/portkit" run --state-dir="$state" --net=slirp4netns --port-driver=builtin \
		-p "127.0.0.1:$port:80/tcp" -- busybox httpd -f -p 80 -h "$WORK/www" &
	local pid=$!
	PIDS+=("$pid")

	local page=""
	for _ in $(seq 100); do
		page="$(timeout 5 busybox wget -q -O- "http://127.0.0.1:$port/" 2>/dev/null || true)"
		[ -n "$page" ] && break
		kill -0 "$pid" 2>/dev/null || { echo "demo: portkit run exited early" >&2; exit 1; }
		sleep 0.1
	done
	[ -n "$page" ] || { echo "demo: no answer on 127.0.0.1:$port" >&2; exit 1; }
	echo "host$ wget -qO- http://127.0.0.1:$port/"
	echo "$page"
	echo "host$ wget -qO- http://127.0.0.1:$port/cgi-bin/client"
	timeout 5 busybox wget -q -O- "http://127.0.0.1:$port/cgi-bin/client"
	echo "state dir while running: $state ($(ls "$state" | tr '\n' ' '))"

	kill -TERM "$pid"
	wait "$pid" || true
	PIDS=("${PIDS[@]/$pid/}")
	if [ -e "$state" ]; then
		echo "demo: state dir $state left behind" >&2
		exit 1
	fi
	if ! port_free "$port"; then
		echo "demo: 127.0.0.1:$port still open after portkit run ended" >&2
		exit 1
	fi
	echo "stopped: port $port closed, state dir removed"
}

need_packages
setup_files
if [ "$(id -u)" -eq 0 ]; then
	# The demo user, as internal/testenv makes it: subordinate IDs for
	# newuidmap, and a tun device that user namespaces may open.
	id "$DEMO_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$DEMO_USER"
	grep -q "^$DEMO_USER:" /etc/subuid 2>/dev/null || echo "$DEMO_USER:231072:65536" >>/etc/subuid
	grep -q "^$DEMO_USER:" /etc/subgid 2>/dev/null || echo "$DEMO_USER:231072:65536" >>/etc/subgid
	chmod 0666 /dev/net/tun
	demo_as ""
	demo_as "$DEMO_USER"
else
	demo_as ""
fi
say "demo done"
