// Package benchroute is the harness the route benchmarks of dualwrite and
// shadowread share: what a routed call (Writer.Write, Reader.Read) costs
// the calling goroutine beyond the stage evaluation and the user's own
// functions.
//
// The call is timed against a baseline (the same stage evaluation plus bare
// calls of the user functions the stage runs), interleaved with it in the
// same process over [Rounds] rounds; the overhead is the median of the
// rounds'. Both sides are called through a function value taking the
// call's index, so each pays the same indirect call. While the route is
// measured its background side (the secondary write, the shadow read) is
// held, so what is timed and counted is the caller's path alone and not the
// background work competing with it for the machine's two cores; that work
// then runs, and what it allocates is reported apart.
package benchroute

import (
	"context"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/internal/benchgoal"
)

// Rounds is how many interleaved rounds of the call and its baseline are
// timed; the overhead is the median of the rounds', so a burst of load from
// a neighbour on the shared machine moves one round, not the result.
const Rounds = 21

const (
	calls     = 105_000 // timed, over all rounds
	allocRuns = 20_000  // counted for allocations
	warm      = 100     // before anything: lazily built state is not the route
)

// Calls is how many calls a [Subject] built by [Measure] receives, warm-up,
// timed and counted ones together: its background queue must hold them all
// without shedding while the background side is held.
const Calls = warm + calls + allocRuns

// Subject is the route under measurement, built by the benchmark.
type Subject struct {
	// Call makes the route's i-th call (the benchmark picks its input
	// from i).
	Call func(ctx context.Context, i int)
	// Close waits for the route's background work.
	Close func() error
}

// Cost is what [Measure] found, per call.
type Cost struct {
	// NS is the caller's overhead in nanoseconds (median of the rounds).
	NS float64
	// Allocs are made on the caller's path.
	Allocs float64
	// Background allocations are made on the route's workers.
	Background float64
}

// Measure times and counts the route that build returns. build is given
// hold, which the route's background function must call before its work
// (it blocks until the route's calls are measured), and the queue the
// route's background side must take without shedding ([Calls]). baseline
// makes the i-th call's baseline. After the background work ran and Close
// returned, check is called with the number of calls made, to fail the
// benchmark if any background call was shed or failed: it would have
// measured another path than the route.
func Measure(tb testing.TB, build func(hold func(), queue int) Subject, baseline func(ctx context.Context, i int), check func(calls int)) Cost {
	tb.Helper()
	gate := make(chan struct{})
	s := build(func() { <-gate }, Calls)
	ctx := context.Background()
	for i := range warm {
		s.Call(ctx, i)
	}
	ns := interleave(ctx, s.Call, baseline)
	var before, after, drained runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := range allocRuns {
		s.Call(ctx, i)
	}
	runtime.ReadMemStats(&after)
	close(gate)
	require.NoError(tb, s.Close())
	runtime.ReadMemStats(&drained)
	check(Calls)
	return Cost{
		NS:         ns,
		Allocs:     float64(after.Mallocs-before.Mallocs) / allocRuns,
		Background: float64(drained.Mallocs-after.Mallocs) / Calls,
	}
}

// Wall is the overhead per call of the route that build returns with its
// background workers running alongside the caller (a queue of queue calls
// is enough not to shed); handing work to an idle worker wakes it, which
// the caller pays for, and on a small loaded machine the workers take their
// share of the cores.
func Wall(tb testing.TB, build func(queue int) Subject, baseline func(ctx context.Context, i int)) float64 {
	tb.Helper()
	s := build(calls)
	ns := interleave(context.Background(), s.Call, baseline)
	require.NoError(tb, s.Close())
	return ns
}

// interleave times Rounds rounds of call against baseline and returns the
// median of the rounds' overhead per call.
func interleave(ctx context.Context, call, baseline func(context.Context, int)) float64 {
	const perRound = calls / Rounds
	overheads := make([]float64, 0, Rounds)
	for round := range Rounds {
		start := time.Now()
		for i := range perRound {
			call(ctx, round+i)
		}
		through := time.Since(start)
		start = time.Now()
		for i := range perRound {
			baseline(ctx, round+i)
		}
		overheads = append(overheads, float64(through-time.Since(start))/perRound)
	}
	return median(overheads)
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

// EveryStage measures the route in every stage and reports its goals as
// <prefix>_route_overhead_<stage>_ns and _allocs (at most 2µs and 3
// allocations per call). measure is first run once untimed, in live: it grows
// the heap to hold the calls queued behind the held background side (fresh
// pages, GC pacing), a cost of this measurement and not of the route, which
// measured first would land on one stage. Logged beside each stage: the
// background allocations per call and wall's overhead with the workers
// running alongside; work and call name what the background side does and
// what a call is, for the log.
func EveryStage(b *testing.B, prefix, work, call string, measure func(*testing.B, flags.Stage) Cost, wall func(*testing.B, flags.Stage) float64) {
	b.Helper()
	_ = measure(b, flags.Live)
	for _, st := range flags.Stages() {
		m := measure(b, st)
		benchgoal.Report(b, prefix+"_route_overhead_"+st.String()+"_ns", m.NS, "ns", benchgoal.AtMost, 2000)
		benchgoal.Report(b, prefix+"_route_overhead_"+st.String()+"_allocs", m.Allocs, "allocs", benchgoal.AtMost, 3)
		b.Logf("%s: %.1f allocs per %s on its worker; %.0f ns per %s with the workers running alongside",
			st, m.Background, work, wall(b, st), call)
	}
}
