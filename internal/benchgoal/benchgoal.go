// Package benchgoal records the measured value of a benchmark goal so that
// `make bench` can end with one verdict line per goal:
//
//	BENCH <name> <measured> <unit> goal <op> <target> PASS|FAIL
//
// Goal benchmarks time themselves (they run a fixed workload, and where the
// goal is a ratio they run the baseline in the same process, interleaved with
// the candidate, so a noisy shared machine hurts both sides alike). They call
// [Report] once with the result; the value is also reported to the testing
// framework as a custom metric.
package benchgoal

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
)

// Op compares a measured value with a goal's target.
type Op string

const (
	AtMost  Op = "<="
	AtLeast Op = ">="
)

// Met reports whether measured satisfies the goal.
func (o Op) Met(measured, target float64) bool {
	switch o {
	case AtMost:
		return measured <= target
	case AtLeast:
		return measured >= target
	}
	return false
}

var mu sync.Mutex

// Report records a goal's measurement. Lines go to the file named by
// DIMMER_BENCH_GOALS (set by `make bench`); a later report of the same name
// replaces an earlier one when the report is built.
func Report(b testing.TB, name string, measured float64, unit string, op Op, target float64) {
	b.Helper()
	if strings.ContainsAny(name+unit, " \t\n") {
		b.Fatalf("benchgoal: name %q and unit %q must not contain spaces", name, unit)
	}
	if bb, ok := b.(*testing.B); ok {
		bb.ReportMetric(measured, unit)
	}
	verdict := "FAIL"
	if op.Met(measured, target) {
		verdict = "PASS"
	}
	line := fmt.Sprintf("BENCH %s %s %s goal %s %s %s", name, Format(measured), unit, op, Format(target), verdict)
	b.Log(line)
	path := os.Getenv("DIMMER_BENCH_GOALS")
	if path == "" {
		return
	}
	mu.Lock()
	defer mu.Unlock()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		b.Fatalf("benchgoal: %v", err)
	}
	defer f.Close()
	if _, err := fmt.Fprintln(f, line); err != nil {
		b.Fatalf("benchgoal: %v", err)
	}
}

// Format prints a value with three significant decimals at most.
func Format(v float64) string {
	s := fmt.Sprintf("%.3f", v)
	s = strings.TrimRight(s, "0")
	return strings.TrimSuffix(s, ".")
}
