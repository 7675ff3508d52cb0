package dualwrite_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/internal/benchgoal"
)

type memIn struct {
	key string
	v   int
}

// BenchmarkOverhead measures dimmer's own cost per write in off and complete:
// the stage source is a constant function and the user functions are
// in-memory, so what is timed is routing, breaker-free authoritative call,
// panic guard, metrics (no-op provider) and the observation.
func BenchmarkOverhead(b *testing.B) {
	write := func(_ context.Context, in memIn) (int, error) { return in.v, nil }
	key := func(in memIn) string { return in.key }
	log := dualwrite.RepairLogFunc(func(context.Context, dualwrite.Repair) error { return nil })
	obs := flags.ObserverFunc(func(flags.Observation) {})
	const n = 200_000
	for _, st := range []flags.Stage{flags.Off, flags.Complete} {
		src := dualwrite.StageFunc(func(context.Context, string, string) (flags.Stage, error) { return st, nil })
		w, err := dualwrite.New("bench", src, write, write, key, dualwrite.WithRepairLog(log), dualwrite.WithObserver(obs))
		require.NoError(b, err)
		ctx := context.Background()
		in := memIn{key: "k", v: 1}
		direct := time.Duration(0)
		var total time.Duration
		for range 5 { // interleave with the bare user function call
			start := time.Now()
			for range n / 5 {
				_, _ = w.Write(ctx, in)
			}
			total += time.Since(start)
			start = time.Now()
			for range n / 5 {
				_, _ = write(ctx, in)
			}
			direct += time.Since(start)
		}
		ns := float64(total-direct) / n
		benchgoal.Report(b, "dualwrite_overhead_"+st.String()+"_ns", ns, "ns", benchgoal.AtMost, 2000)
		if st == flags.Off {
			allocs := testing.AllocsPerRun(10_000, func() { _, _ = w.Write(ctx, in) })
			benchgoal.Report(b, "dualwrite_overhead_allocs", allocs, "allocs", benchgoal.AtMost, 3)
		}
		require.NoError(b, w.Close())
	}
}

// BenchmarkAsyncVsSingleWrite compares the caller's latency of an async dual
// write (Postgres authoritative, Redis secondary on the pool) with a plain
// single-row Postgres write, interleaved op by op; medians.
func BenchmarkAsyncVsSingleWrite(b *testing.B) {
	pool, _ := dimmertest.Schema(b)
	rdb, prefix := dimmertest.Redis(b)
	ctx := context.Background()
	_, err := pool.Exec(ctx, `CREATE TABLE accounts (id text PRIMARY KEY, name text NOT NULL, version bigint NOT NULL)`)
	require.NoError(b, err)
	const q = `INSERT INTO accounts (id, name, version) VALUES ($1, $2, $3)
		ON CONFLICT (id) DO UPDATE SET name = excluded.name, version = excluded.version`
	single := func(ctx context.Context, a account) (int64, error) {
		tag, err := pool.Exec(ctx, q, a.ID, a.Name, a.Version)
		return tag.RowsAffected(), err
	}
	toRedis := func(ctx context.Context, a account) (int64, error) {
		return 1, rdb.HSet(ctx, prefix+a.ID, "name", a.Name, "version", a.Version).Err()
	}
	log := dualwrite.RepairLogFunc(func(context.Context, dualwrite.Repair) error { return nil })
	src := dualwrite.StageFunc(func(context.Context, string, string) (flags.Stage, error) { return flags.DualWrite, nil })
	w, err := dualwrite.New("bench", src, single, toRedis, accountKey, dualwrite.WithRepairLog(log))
	require.NoError(b, err)
	defer w.Close()
	const n = 1500
	base, cand := make([]time.Duration, 0, n), make([]time.Duration, 0, n)
	for i := range n + 100 {
		a := account{ID: "a" + string(rune('a'+i%26)), Name: "n", Version: int64(i)}
		b2 := a
		b2.ID = "b" + a.ID
		runBase := func() time.Duration {
			start := time.Now()
			_, err := single(ctx, a)
			require.NoError(b, err)
			return time.Since(start)
		}
		runCand := func() time.Duration {
			start := time.Now()
			_, err := w.Write(ctx, b2)
			require.NoError(b, err)
			return time.Since(start)
		}
		// Alternate which goes first, so neither always follows the other's
		// background secondary write.
		var d1, d2 time.Duration
		if i%2 == 0 {
			d1, d2 = runBase(), runCand()
		} else {
			d2, d1 = runCand(), runBase()
		}
		if i >= 100 { // warm-up
			base, cand = append(base, d1), append(cand, d2)
		}
	}
	benchgoal.Report(b, "dualwrite_async_vs_single_write", float64(median(cand))/float64(median(base)), "x", benchgoal.AtMost, 1.1)
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}
