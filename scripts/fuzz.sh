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
		dir=$($GO list -f '{{.Dir}}' "$pkg")/testdata/fuzz/$target
		before=$(ls "$dir" 2>/dev/null | wc -l)
		# Each run is bounded: -fuzztime plus a hard timeout for a hung target.
		if ! timeout 300 $GO test -run='^$' -fuzz="^${target}\$" -fuzztime="$FUZZTIME" "$pkg" 2>&1 | tail -n 20; then
			if [ "$(ls "$dir" 2>/dev/null | wc -l)" -gt "$before" ]; then
				failed+=("$pkg $target")
			else
				# Go's fuzz coordinator sometimes ends with "context deadline
				# exceeded" when -fuzztime runs out on a busy machine; without a
				# saved input there is nothing to reproduce.
				echo "fuzz: warning: $pkg $target failed without saving a failing input (coordinator timeout on a busy machine?)"
			fi
		fi
	done
done

if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz: FAIL: ${failed[*]} (a failing input was saved under the package's testdata/fuzz/)"
	exit 1
fi
echo "fuzz: ok, $count targets"
