#!/bin/bash
# gotest.sh: run every package's tests once, with a bounded timeout, and print
# them through scripts/gotestreport (ok/FAIL per package, failing output, skips
# with reasons, a summary). RACE_PKGS (default ./libport/...) run with -race
# when a C compiler is there for cgo; the rest run without it, which keeps a
# CI run on 2 cores well inside its time budget.
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
TEST_TIMEOUT=${TEST_TIMEOUT:-20m}
RACE_PKGS=${RACE_PKGS:-./libport/...}
TEST_LOG=${TEST_LOG:-bin/go-test.log}
read -r -a extra <<<"${GOTESTFLAGS:-}"
# Not run here: TestEntry* are the entry points of test binaries that a test
# re-executes as the unprivileged user (they run there, with -test.run), and
# TestMeasure* are opt-in measurements (PORTKIT_MEASURE=1; `make bench` is
# the side-by-side one). Running them here would only report skips.
extra+=(-skip '^(TestEntry|TestMeasure)')

mkdir -p "$(dirname "$TEST_LOG")"
all=$($GO list ./...)
race=""
if [ -n "$RACE_PKGS" ]; then
	if command -v "$($GO env CC)" >/dev/null 2>&1; then
		race=$($GO list $RACE_PKGS 2>/dev/null || true)
	else
		echo "gotest: no C compiler ($($GO env CC)) for cgo, so no -race run (apt-get install gcc)"
	fi
fi
rest=$(comm -23 <(sort <<<"$all") <(sort <<<"$race") | grep . || true)

$GO build -o bin/gotestreport ./scripts/gotestreport
{
	# A non-zero exit without a failing event (e.g. a vet error) still fails the report.
	if [ -n "$race" ]; then
		$GO test -json -race -count=1 -timeout "$TEST_TIMEOUT" "${extra[@]}" $race ||
			echo '{"Action":"fail","Package":"(go test exited non-zero)"}'
	fi
	if [ -n "$rest" ]; then
		$GO test -json -count=1 -timeout "$TEST_TIMEOUT" "${extra[@]}" $rest ||
			echo '{"Action":"fail","Package":"(go test exited non-zero)"}'
	fi
} 2>&1 | bin/gotestreport -log "$TEST_LOG"
