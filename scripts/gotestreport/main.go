// Command gotestreport reads `go test -json` events on stdin and prints what a
// person wants from a long CI run: go test's own "ok"/"FAIL" line per package,
// the full output of every failing test, every skipped test with its reason
// (CI installs everything, so a skip there is a bug), and a closing summary.
// The complete plain-text output goes to -log. It exits 1 if anything failed.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"
)

// event is one line of `go test -json` (cmd/test2json), plus the build events.
type event struct {
	Action     string
	Package    string
	Test       string
	Elapsed    float64
	Output     string
	ImportPath string // build-output / build-fail events
}

type key struct{ pkg, test string }

type report struct {
	out        io.Writer
	output     map[key][]string // buffered output per test ("" = package level)
	buildOut   map[string][]string
	skipped    []string
	failed     []string
	pkgOK      int
	pkgFail    []string
	pkgNoTests int
	passed     int
	exitFailed bool // go test exited non-zero
}

// exitSentinel is the package name gotest.sh reports a non-zero go test exit under.
const exitSentinel = "(go test exited non-zero)"

func main() {
	logPath := flag.String("log", "", "also write the plain test output to this file")
	flag.Parse()

	var log io.Writer = io.Discard
	if *logPath != "" {
		f, err := os.Create(*logPath)
		if err != nil {
			fmt.Fprintf(os.Stderr, "gotestreport: create log %s: %v\n", *logPath, err)
			os.Exit(2)
		}
		defer f.Close()
		log = f
	}

	r := &report{out: os.Stdout, output: map[key][]string{}, buildOut: map[string][]string{}}
	start := time.Now()
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			// Not an event: go vet or build chatter on stderr. Show it.
			fmt.Fprintln(r.out, string(line))
			fmt.Fprintln(log, string(line))
			continue
		}
		if e.Output != "" {
			io.WriteString(log, e.Output)
		}
		r.handle(e)
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintf(os.Stderr, "gotestreport: reading go test output: %v\n", err)
		os.Exit(2)
	}
	if r.summary(time.Since(start), *logPath) {
		os.Exit(1)
	}
}

func (r *report) handle(e event) {
	switch e.Action {
	case "build-output":
		r.buildOut[e.ImportPath] = append(r.buildOut[e.ImportPath], e.Output)
		return
	case "build-fail":
		// The package's own "fail" event follows and counts it.
		fmt.Fprint(r.out, strings.Join(r.buildOut[e.ImportPath], ""))
		return
	}
	if e.Package == exitSentinel {
		r.exitFailed = true
		return
	}
	k := key{e.Package, e.Test}
	switch e.Action {
	case "output":
		r.output[k] = append(r.output[k], e.Output)
	case "pass":
		if e.Test != "" {
			r.passed++
		} else {
			r.pkgOK++
			fmt.Fprintf(r.out, "ok   %-50s %6.1fs\n", e.Package, e.Elapsed)
		}
		delete(r.output, k)
	case "skip":
		if e.Test != "" {
			r.skipped = append(r.skipped, fmt.Sprintf("%s %s: %s", e.Package, e.Test, skipReason(r.output[k])))
		} else {
			r.pkgNoTests++
		}
		delete(r.output, k)
	case "fail":
		if e.Test != "" {
			r.failed = append(r.failed, e.Package+" "+e.Test)
			fmt.Fprintf(r.out, "--- FAIL: %s %s (%.2fs)\n", e.Package, e.Test, e.Elapsed)
			for _, l := range r.output[k] {
				fmt.Fprint(r.out, "    "+l)
			}
		} else {
			// Package-level output holds panics and "test timed out" traces.
			for _, l := range r.output[k] {
				if !strings.HasPrefix(l, "=== ") && !strings.HasPrefix(l, "FAIL\t") {
					fmt.Fprint(r.out, l)
				}
			}
			r.pkgFail = append(r.pkgFail, e.Package)
			fmt.Fprintf(r.out, "FAIL %-50s %6.1fs\n", e.Package, e.Elapsed)
		}
		delete(r.output, k)
	}
}

// skipReason is the message t.Skip printed: the output lines after "--- SKIP".
func skipReason(lines []string) string {
	var msg []string
	for _, l := range lines {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- SKIP") {
			continue
		}
		// "file_test.go:12: reason" → "reason (file_test.go:12)"
		if file, rest, ok := strings.Cut(t, ": "); ok && strings.Contains(file, ".go:") {
			t = rest + " (" + file + ")"
		}
		msg = append(msg, t)
	}
	if len(msg) == 0 {
		return "(no reason given)"
	}
	return strings.Join(msg, "; ")
}

// summary prints the closing block and reports whether anything failed.
func (r *report) summary(took time.Duration, logPath string) bool {
	w := r.out
	fmt.Fprintln(w, "")
	fmt.Fprintln(w, "==== go test summary ====")
	if len(r.skipped) > 0 {
		sort.Strings(r.skipped)
		fmt.Fprintf(w, "skipped tests (%d):\n", len(r.skipped))
		for _, s := range r.skipped {
			fmt.Fprintln(w, "  SKIP "+s)
		}
	}
	if len(r.failed) > 0 {
		fmt.Fprintf(w, "failed tests (%d):\n", len(r.failed))
		for _, s := range r.failed {
			fmt.Fprintln(w, "  FAIL "+s)
		}
	}
	if len(r.pkgFail) > 0 {
		fmt.Fprintf(w, "failed packages (%d):\n", len(r.pkgFail))
		for _, s := range r.pkgFail {
			fmt.Fprintln(w, "  FAIL "+s)
		}
	}
	if r.exitFailed && len(r.failed) == 0 && len(r.pkgFail) == 0 {
		fmt.Fprintln(w, "go test exited non-zero without a failing test or package: see the output above")
	}
	verdict := "PASS"
	if len(r.failed) > 0 || len(r.pkgFail) > 0 || r.exitFailed {
		verdict = "FAIL"
	}
	fmt.Fprintf(w, "%s: packages %d ok, %d failed, %d without tests; tests %d passed, %d failed, %d skipped; %s\n",
		verdict, r.pkgOK, len(r.pkgFail), r.pkgNoTests, r.passed, len(r.failed), len(r.skipped), took.Round(time.Second))
	if logPath != "" {
		fmt.Fprintf(w, "full output: %s\n", logPath)
		// The plain count, also kept beside the log for .ci/run's last line.
		plain := fmt.Sprintf("%d passed, %d failed, %d skipped", r.passed, len(r.failed), len(r.skipped))
		_ = os.WriteFile(strings.TrimSuffix(logPath, ".log")+".summary", []byte(plain+"\n"), 0o644)
	}
	fmt.Fprintf(w, "tests: %d passed, %d failed, %d skipped\n", r.passed, len(r.failed), len(r.skipped))
	return verdict == "FAIL"
}
