package dualwrite_test

import (
	"context"
	"runtime"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/internal/benchgoal"
)

// BenchmarkRouteOverhead measures, in every stage, what Write costs the
// calling goroutine beyond the stage evaluation and the user's own write
// functions, with the default (async) secondary and an observer set.
//
// Write is timed against the same stage evaluation plus bare calls of the
// user functions the stage writes (the authoritative one, and the secondary
// one where the stage has a secondary), interleaved in the same process (the median of 21 rounds),
// and its allocations are counted. While Write is measured, the secondary
// worker is held, so what is timed and counted is the caller's path alone
// and not the background writes competing with it for the machine's two
// cores; the secondary writes then run, the benchmark fails if any write
// became a repair (a shed write would measure the repair path, not the
// route), and what they allocate on the worker is logged apart. Also
// logged: the wall-clock overhead with the workers running alongside, which
// on a small loaded machine includes their share of the cores.
func BenchmarkRouteOverhead(b *testing.B) {
	// Untimed first pass: it grows the heap to hold the tasks queued behind
	// the held worker (fresh pages, GC pacing), a cost of this measurement
	// and not of the route; measured first, it would land on one stage.
	_ = measureRoute(b, flags.Live)
	for _, st := range flags.Stages() {
		m := measureRoute(b, st)
		benchgoal.Report(b, "dualwrite_route_overhead_"+st.String()+"_ns", m.ns, "ns", benchgoal.AtMost, 2000)
		benchgoal.Report(b, "dualwrite_route_overhead_"+st.String()+"_allocs", m.allocs, "allocs", benchgoal.AtMost, 3)
		b.Logf("%s: %.1f allocs per secondary write on its worker; %.0f ns per write with the workers running alongside",
			st, m.background, routeWallNanos(b, st))
	}
}

type routeCost struct{ ns, allocs, background float64 }

func benchInputs() []memIn {
	in := make([]memIn, 64)
	for i := range in {
		in[i] = memIn{key: "k" + strconv.Itoa(i), v: i}
	}
	return in
}

func fixedStage(st flags.Stage) dualwrite.StageFunc {
	return func(context.Context, string, string) (flags.Stage, error) { return st, nil }
}

func benchWrite(_ context.Context, in memIn) (int, error) { return in.v, nil }

func benchKey(in memIn) string { return in.key }

func measureRoute(b *testing.B, st flags.Stage) routeCost {
	const n, allocRuns, warm = 105_000, 20_000, 100
	gate := make(chan struct{})
	held := func(ctx context.Context, in memIn) (int, error) { <-gate; return benchWrite(ctx, in) }
	fns := [3]dualwrite.Func[memIn, int]{flags.Old: benchWrite, flags.New: benchWrite}
	both := st.Secondary() != flags.NoSide
	if both {
		fns[st.Secondary()] = held
	}
	var repairs atomic.Int64
	log := dualwrite.RepairLogFunc(func(context.Context, dualwrite.Repair) error { repairs.Add(1); return nil })
	src := fixedStage(st)
	w, err := dualwrite.New("bench", src, fns[flags.Old], fns[flags.New], benchKey, dualwrite.WithRepairLog(log),
		dualwrite.WithObserver(flags.ObserverFunc(func(flags.Observation) {})), dualwrite.WithAsync(1, n+allocRuns+warm))
	require.NoError(b, err)
	ctx := context.Background()
	ins := benchInputs()
	for i := range warm { // lazily built state is not the route
		_, _ = w.Write(ctx, ins[i%len(ins)])
	}
	perRound := make([]float64, 0, rounds)
	for round := range rounds {
		start := time.Now()
		for i := range n / rounds {
			_, _ = w.Write(ctx, ins[(round+i)%len(ins)])
		}
		through := time.Since(start)
		start = time.Now()
		for i := range n / rounds {
			in := ins[(round+i)%len(ins)]
			_, _ = src(ctx, "bench", in.key)
			_, _ = benchWrite(ctx, in)
			if both {
				_, _ = benchWrite(ctx, in)
			}
		}
		perRound = append(perRound, float64(through-time.Since(start))/(n/rounds))
	}
	var before, after, drained runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := range allocRuns {
		_, _ = w.Write(ctx, ins[i%len(ins)])
	}
	runtime.ReadMemStats(&after)
	close(gate)
	require.NoError(b, w.Close())
	runtime.ReadMemStats(&drained)
	require.Zero(b, repairs.Load(), "%s: writes were shed or failed; the route was not what was measured", st)
	return routeCost{
		ns:         medianOf(perRound),
		allocs:     float64(after.Mallocs-before.Mallocs) / allocRuns,
		background: float64(drained.Mallocs-after.Mallocs) / float64(n+allocRuns+warm),
	}
}

// routeWallNanos is the overhead per Write with the secondary workers
// running alongside the caller; here handing a write to an idle worker
// wakes it, which the caller pays for.
func routeWallNanos(b *testing.B, st flags.Stage) float64 {
	const n = 105_000
	src := fixedStage(st)
	log := dualwrite.RepairLogFunc(func(context.Context, dualwrite.Repair) error { return nil })
	w, err := dualwrite.New("bench", src, benchWrite, benchWrite, benchKey, dualwrite.WithRepairLog(log),
		dualwrite.WithObserver(flags.ObserverFunc(func(flags.Observation) {})), dualwrite.WithAsync(8, n))
	require.NoError(b, err)
	ctx := context.Background()
	ins := benchInputs()
	both := st.Secondary() != flags.NoSide
	perRound := make([]float64, 0, rounds)
	for round := range rounds {
		start := time.Now()
		for i := range n / rounds {
			_, _ = w.Write(ctx, ins[(round+i)%len(ins)])
		}
		through := time.Since(start)
		start = time.Now()
		for i := range n / rounds {
			in := ins[(round+i)%len(ins)]
			_, _ = src(ctx, "bench", in.key)
			_, _ = benchWrite(ctx, in)
			if both {
				_, _ = benchWrite(ctx, in)
			}
		}
		perRound = append(perRound, float64(through-time.Since(start))/(n/rounds))
	}
	require.NoError(b, w.Close())
	return medianOf(perRound)
}

// rounds is how many interleaved rounds of the call and its baseline are
// timed; the overhead is the median of the rounds', so a burst of load from
// a neighbour on the shared machine moves one round, not the result.
const rounds = 21

func medianOf(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
