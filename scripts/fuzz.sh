#!/bin/bash
# fuzz.sh: run every Fuzz target of the module for FUZZTIME (default 10s).
# Targets are found with `go test -list`, so a new one is picked up without
# editing anything; grep narrows the packages first so only those with fuzz
# targets are compiled twice.
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
FUZZTIME=${FUZZTIME:-10s}

mapfile -t pkgs < <(
	$GO list -f '{{.ImportPath}} {{.Dir}}' ./... | while read -r pkg dir; do
		if grep -qsE '^func Fuzz[A-Za-z0-9_]*\(' "$dir"/*_test.go; then echo "$pkg"; fi
	done
)
if [ ${#pkgs[@]} -eq 0 ]; then
	echo "fuzz: no fuzz targets yet"
	exit 0
fi

failed=()
count=0
for pkg in "${pkgs[@]}"; do
	mapfile -t targets < <($GO test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true)
	for target in "${targets[@]}"; do
		count=$((count + 1))
		echo "fuzz: $pkg $target for $FUZZTIME"
		# Each run is bounded: -fuzztime plus a hard timeout for a hung target.
		if ! timeout 300 $GO test -run='^$' -fuzz="^${target}\$" -fuzztime="$FUZZTIME" "$pkg" 2>&1 | tail -n 20; then
			failed+=("$pkg $target")
		fi
	done
done

if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz: FAIL: ${failed[*]} (a failing input was saved under the package's testdata/fuzz/)"
	exit 1
fi
echo "fuzz: ok, $count targets"
