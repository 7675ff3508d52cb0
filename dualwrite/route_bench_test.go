package dualwrite_test

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/internal/benchroute"
)

// BenchmarkRouteOverhead measures, in every stage, what Write costs the
// calling goroutine beyond the stage evaluation and the user's own write
// functions, with the default (async) secondary and an observer set.
//
// Write is timed against the same stage evaluation plus bare calls of the
// user functions the stage writes (the authoritative one, and the secondary
// one where the stage has a secondary), interleaved in the same process (the
// median of 21 rounds), and its allocations are counted (see
// internal/benchroute). While Write is measured, the secondary worker is
// held, so what is timed and counted is the caller's path alone and not the
// background writes competing with it for the machine's two cores; the
// secondary writes then run, the benchmark fails if any write became a
// repair (a shed write would measure the repair path, not the route), and
// what they allocate on the worker is logged apart. Also logged: the
// wall-clock overhead with the workers running alongside, which on a small
// loaded machine includes their share of the cores.
func BenchmarkRouteOverhead(b *testing.B) {
	benchroute.EveryStage(b, "dualwrite", "secondary write", "write", measureRoute, routeWallNanos)
}

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

// routeBaseline is the i-th write's stage evaluation and bare write calls.
func routeBaseline(st flags.Stage) func(context.Context, int) {
	src, ins := fixedStage(st), benchInputs()
	both := st.Secondary() != flags.NoSide
	return func(ctx context.Context, i int) {
		in := ins[i%len(ins)]
		_, _ = src(ctx, "bench", in.key)
		_, _ = benchWrite(ctx, in)
		if both {
			_, _ = benchWrite(ctx, in)
		}
	}
}

// writeCalls makes the i-th write through w.
func writeCalls(w *dualwrite.Writer[memIn, int]) benchroute.Subject {
	ins := benchInputs()
	return benchroute.Subject{
		Call:  func(ctx context.Context, i int) { _, _ = w.Write(ctx, ins[i%len(ins)]) },
		Close: w.Close,
	}
}

func measureRoute(b *testing.B, st flags.Stage) benchroute.Cost {
	var repairs atomic.Int64
	build := func(hold func(), queue int) benchroute.Subject {
		held := func(ctx context.Context, in memIn) (int, error) { hold(); return benchWrite(ctx, in) }
		fns := [3]dualwrite.Func[memIn, int]{flags.Old: benchWrite, flags.New: benchWrite}
		if st.Secondary() != flags.NoSide {
			fns[st.Secondary()] = held
		}
		log := dualwrite.RepairLogFunc(func(context.Context, dualwrite.Repair) error { repairs.Add(1); return nil })
		w, err := dualwrite.New("bench", fixedStage(st), fns[flags.Old], fns[flags.New], benchKey, dualwrite.WithRepairLog(log),
			dualwrite.WithObserver(flags.ObserverFunc(func(flags.Observation) {})), dualwrite.WithAsync(1, queue))
		require.NoError(b, err)
		return writeCalls(w)
	}
	return benchroute.Measure(b, build, routeBaseline(st), func(int) {
		require.Zero(b, repairs.Load(), "%s: writes were shed or failed; the route was not what was measured", st)
	})
}

// routeWallNanos is the overhead per Write with the secondary workers
// running alongside the caller; here handing a write to an idle worker
// wakes it, which the caller pays for.
func routeWallNanos(b *testing.B, st flags.Stage) float64 {
	build := func(queue int) benchroute.Subject {
		log := dualwrite.RepairLogFunc(func(context.Context, dualwrite.Repair) error { return nil })
		w, err := dualwrite.New("bench", fixedStage(st), benchWrite, benchWrite, benchKey, dualwrite.WithRepairLog(log),
			dualwrite.WithObserver(flags.ObserverFunc(func(flags.Observation) {})), dualwrite.WithAsync(8, queue))
		require.NoError(b, err)
		return writeCalls(w)
	}
	return benchroute.Wall(b, build, routeBaseline(st))
}
