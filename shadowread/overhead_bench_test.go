package shadowread_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/internal/benchgoal"
	"github.com/dimmer-dev/dimmer/shadowread"
)

// BenchmarkOverhead measures dimmer's own cost per read in off and complete
// (no comparison): the stage source is a constant function and the read
// functions are in-memory, so what is timed is routing, the sampling
// decision, the panic guard, metrics (no-op provider) and the observation.
// The bare read is timed in the same process, interleaved.
func BenchmarkOverhead(b *testing.B) {
	read := func(_ context.Context, id string) (int, error) { return len(id), nil }
	key := func(id string) string { return id }
	obs := flags.ObserverFunc(func(flags.Observation) {})
	const n = 200_000
	for _, st := range []flags.Stage{flags.Off, flags.Complete} {
		src := shadowread.StageFunc(func(context.Context, string, string) (flags.Stage, error) { return st, nil })
		r, err := shadowread.New("bench", src, read, read, key, shadowread.WithObserver(obs))
		require.NoError(b, err)
		ctx := context.Background()
		var total, direct time.Duration
		for range 5 {
			start := time.Now()
			for range n / 5 {
				_, _ = r.Read(ctx, "k")
			}
			total += time.Since(start)
			start = time.Now()
			for range n / 5 {
				_, _ = read(ctx, "k")
			}
			direct += time.Since(start)
		}
		benchgoal.Report(b, "shadowread_overhead_"+st.String()+"_ns", float64(total-direct)/n, "ns", benchgoal.AtMost, 2000)
		allocs := testing.AllocsPerRun(10_000, func() { _, _ = r.Read(ctx, "k") })
		benchgoal.Report(b, "shadowread_overhead_"+st.String()+"_allocs", allocs, "allocs", benchgoal.AtMost, 3)
		require.NoError(b, r.Close())
	}
}
