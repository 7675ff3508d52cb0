package shadowread_test

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/internal/benchroute"
	"github.com/dimmer-dev/dimmer/shadowread"
)

// BenchmarkRouteOverhead measures, in every stage, what Read costs the
// calling goroutine beyond the stage evaluation and the user's own read
// functions, with the default hand-off and comparator and an observer set.
//
// Read is timed against the same stage evaluation plus bare calls of the
// read functions the stage runs (the served one, and the shadow one where
// the stage compares), interleaved in the same process (the median of 21
// rounds), and its allocations are counted (see internal/benchroute). While
// Read is measured, the shadow worker is held, so what is timed and counted
// is the caller's path alone and not the background comparisons competing
// with it for the machine's two cores; the comparisons then run, the
// benchmark fails unless every read of a comparing stage was compared (a
// shed comparison would measure less than the route), and what they
// allocate on the worker is logged apart. Also logged: the wall-clock
// overhead with the workers running alongside, which on a small loaded
// machine includes their share of the cores.
func BenchmarkRouteOverhead(b *testing.B) {
	benchroute.EveryStage(b, "shadowread", "shadow read and comparison", "read", measureRoute, routeWallNanos)
}

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

// routeBaseline is the i-th read's stage evaluation and bare read calls.
func routeBaseline(st flags.Stage) func(context.Context, int) {
	src, keys := fixedStage(st), benchKeys()
	compares := st.Compared() != flags.NoSide
	return func(ctx context.Context, i int) {
		key := keys[i%len(keys)]
		_, _ = src(ctx, "bench", key)
		_, _ = benchRead(ctx, key)
		if compares {
			_, _ = benchRead(ctx, key)
		}
	}
}

// readCalls makes the i-th read through r.
func readCalls(r *shadowread.Reader[string, int]) benchroute.Subject {
	keys := benchKeys()
	return benchroute.Subject{
		Call:  func(ctx context.Context, i int) { _, _ = r.Read(ctx, keys[i%len(keys)]) },
		Close: r.Close,
	}
}

func measureRoute(b *testing.B, st flags.Stage) benchroute.Cost {
	compares := st.Compared() != flags.NoSide
	var compared atomic.Int64
	build := func(hold func(), queue int) benchroute.Subject {
		held := func(ctx context.Context, id string) (int, error) { hold(); return benchRead(ctx, id) }
		fns := [3]shadowread.Func[string, int]{flags.Old: benchRead, flags.New: benchRead}
		if compares {
			fns[st.Compared()] = held
		}
		r, err := shadowread.New("bench", fixedStage(st), fns[flags.Old], fns[flags.New], func(id string) string { return id },
			shadowread.WithObserver(countCompared(&compared)), shadowread.WithPool(1, queue))
		require.NoError(b, err)
		return readCalls(r)
	}
	return benchroute.Measure(b, build, routeBaseline(st), func(calls int) {
		if compares {
			require.EqualValues(b, calls, compared.Load(), "%s: comparisons were shed; the route was not what was measured", st)
		}
	})
}

// routeWallNanos is the overhead per Read with the shadow workers running
// alongside the caller (a pool large enough not to shed).
func routeWallNanos(b *testing.B, st flags.Stage) float64 {
	build := func(queue int) benchroute.Subject {
		r, err := shadowread.New("bench", fixedStage(st), benchRead, benchRead, func(id string) string { return id },
			shadowread.WithObserver(flags.ObserverFunc(func(flags.Observation) {})), shadowread.WithPool(16, queue))
		require.NoError(b, err)
		return readCalls(r)
	}
	return benchroute.Wall(b, build, routeBaseline(st))
}
