package shadowread_test

import (
	"context"
	"runtime"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/internal/benchgoal"
	"github.com/dimmer-dev/dimmer/shadowread"
)

// BenchmarkRouteOverhead measures, in every stage, what Read costs the
// calling goroutine beyond the stage evaluation and the user's own read
// functions, with the default hand-off and comparator and an observer set.
//
// Read is timed against the same stage evaluation plus bare calls of the
// read functions the stage runs (the served one, and the shadow one where
// the stage compares), interleaved in the same process (the median of 21
// rounds), and its allocations
// are counted. While Read is measured, the shadow worker is held, so what is
// timed and counted is the caller's path alone and not the background
// comparisons competing with it for the machine's two cores; the comparisons
// then run, the benchmark fails unless every read of a comparing stage was
// compared (a shed comparison would measure less than the route), and what
// they allocate on the worker is logged apart. Also logged: the wall-clock
// overhead with the workers running alongside, which on a small loaded
// machine includes their share of the cores.
func BenchmarkRouteOverhead(b *testing.B) {
	// Untimed first pass: it grows the heap to hold the tasks queued behind
	// the held worker (fresh pages, GC pacing), a cost of this measurement
	// and not of the route; measured first, it would land on one stage.
	_ = measureRoute(b, flags.Live)
	for _, st := range flags.Stages() {
		m := measureRoute(b, st)
		benchgoal.Report(b, "shadowread_route_overhead_"+st.String()+"_ns", m.ns, "ns", benchgoal.AtMost, 2000)
		benchgoal.Report(b, "shadowread_route_overhead_"+st.String()+"_allocs", m.allocs, "allocs", benchgoal.AtMost, 3)
		b.Logf("%s: %.1f allocs per shadow read and comparison on its worker; %.0f ns per read with the workers running alongside",
			st, m.background, routeWallNanos(b, st))
	}
}

type routeCost struct{ ns, allocs, background float64 }

func benchKeys() []string {
	keys := make([]string, 64)
	for i := range keys {
		keys[i] = "k" + strconv.Itoa(i)
	}
	return keys
}

func fixedStage(st flags.Stage) shadowread.StageFunc {
	return func(context.Context, string, string) (flags.Stage, error) { return st, nil }
}

// countCompared counts the shadow observations that were compared.
func countCompared(n *atomic.Int64) flags.Observer {
	return flags.ObserverFunc(func(o flags.Observation) {
		if o.Compared {
			n.Add(1)
		}
	})
}

func benchRead(_ context.Context, id string) (int, error) { return len(id), nil }

func measureRoute(b *testing.B, st flags.Stage) routeCost {
	const n, allocRuns, warm = 105_000, 20_000, 100
	gate := make(chan struct{})
	held := func(ctx context.Context, id string) (int, error) { <-gate; return benchRead(ctx, id) }
	fns := [3]shadowread.Func[string, int]{flags.Old: benchRead, flags.New: benchRead}
	compares := st.Compared() != flags.NoSide
	if compares {
		fns[st.Compared()] = held
	}
	var compared atomic.Int64
	src := fixedStage(st)
	r, err := shadowread.New("bench", src, fns[flags.Old], fns[flags.New], func(id string) string { return id },
		shadowread.WithObserver(countCompared(&compared)), shadowread.WithPool(1, n+allocRuns+warm))
	require.NoError(b, err)
	ctx := context.Background()
	keys := benchKeys()
	for i := range warm { // lazily built state is not the route
		_, _ = r.Read(ctx, keys[i%len(keys)])
	}
	perRound := make([]float64, 0, rounds)
	for round := range rounds {
		start := time.Now()
		for i := range n / rounds {
			_, _ = r.Read(ctx, keys[(round+i)%len(keys)])
		}
		through := time.Since(start)
		start = time.Now()
		for i := range n / rounds {
			key := keys[(round+i)%len(keys)]
			_, _ = src(ctx, "bench", key)
			_, _ = benchRead(ctx, key)
			if compares {
				_, _ = benchRead(ctx, key)
			}
		}
		perRound = append(perRound, float64(through-time.Since(start))/(n/rounds))
	}
	var before, after, drained runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := range allocRuns {
		_, _ = r.Read(ctx, keys[i%len(keys)])
	}
	runtime.ReadMemStats(&after)
	close(gate)
	require.NoError(b, r.Close())
	runtime.ReadMemStats(&drained)
	total := n + allocRuns + warm
	if compares {
		require.EqualValues(b, total, compared.Load(), "%s: comparisons were shed; the route was not what was measured", st)
	}
	return routeCost{
		ns:         medianOf(perRound),
		allocs:     float64(after.Mallocs-before.Mallocs) / allocRuns,
		background: float64(drained.Mallocs-after.Mallocs) / float64(total),
	}
}

// routeWallNanos is the overhead per Read with the shadow workers running
// alongside the caller (a pool large enough not to shed).
func routeWallNanos(b *testing.B, st flags.Stage) float64 {
	const n = 105_000
	src := fixedStage(st)
	r, err := shadowread.New("bench", src, benchRead, benchRead, func(id string) string { return id },
		shadowread.WithObserver(flags.ObserverFunc(func(flags.Observation) {})), shadowread.WithPool(16, n))
	require.NoError(b, err)
	ctx := context.Background()
	keys := benchKeys()
	compares := st.Compared() != flags.NoSide
	perRound := make([]float64, 0, rounds)
	for round := range rounds {
		start := time.Now()
		for i := range n / rounds {
			_, _ = r.Read(ctx, keys[(round+i)%len(keys)])
		}
		through := time.Since(start)
		start = time.Now()
		for i := range n / rounds {
			key := keys[(round+i)%len(keys)]
			_, _ = src(ctx, "bench", key)
			_, _ = benchRead(ctx, key)
			if compares {
				_, _ = benchRead(ctx, key)
			}
		}
		perRound = append(perRound, float64(through-time.Since(start))/(n/rounds))
	}
	require.NoError(b, r.Close())
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
