package pgflags_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/internal/benchgoal"
)

func benchStore(b *testing.B) (*pgflags.Store, *pgflags.Provider, func() *pgflags.Provider) {
	pool, schema := dimmertest.Schema(b)
	s, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(b, err)
	require.NoError(b, s.Install(flagstest.Context(b)))
	newProvider := func() *pgflags.Provider {
		p, err := pgflags.NewProvider(pool, pgflags.WithSchema(schema), pgflags.WithResyncInterval(time.Minute))
		require.NoError(b, err)
		return p
	}
	return s, newProvider(), newProvider
}

// BenchmarkEval compares stage evaluation through an OpenFeature client backed
// by the pgflags provider with the same evaluation backed by OpenFeature's
// in-memory provider, interleaved in rounds; the goal is the median ratio.
func BenchmarkEval(b *testing.B) {
	s, p, _ := benchStore(b)
	flagstest.Set(b, s, "orders", flags.Shadow, nil)
	_, candidate := flagstest.Client(b, p)
	_, baseline := flagstest.Client(b, flagstest.MemProvider("orders", flags.Shadow))
	r := flagstest.CompareEval(b, candidate, baseline, "orders", flags.Shadow, 9, 200_000)
	b.ReportMetric(r.CandidateNs, "pgflags-ns/eval")
	b.ReportMetric(r.BaselineNs, "memprovider-ns/eval")
	benchgoal.Report(b, "flags_eval_pgflags_vs_memprovider", r.Ratio, "x", benchgoal.AtMost, 1.2)
}

// BenchmarkPropagation flips a flag 100 times and times, from just before
// Store.Swap is called, until each of 8 provider instances (each in its own
// OpenFeature API) has delivered the change event after which it evaluates
// the new stage; the goal is the p99 over all 800 (flip, instance) pairs.
func BenchmarkPropagation(b *testing.B) {
	s, first, newProvider := benchStore(b)
	flagstest.Set(b, s, "orders", flags.DualWrite, nil)
	ps := []flagstest.Provider{first}
	for len(ps) < 8 {
		ps = append(ps, newProvider())
	}
	lat := flagstest.MeasurePropagation(b, s, ps, "orders", 100)
	p50, p99 := flagstest.Percentile(lat, 50), flagstest.Percentile(lat, 99)
	b.ReportMetric(float64(p50.Microseconds())/1000, "p50-ms")
	benchgoal.Report(b, "flags_propagation_pgflags_p99", float64(p99.Microseconds())/1000, "ms", benchgoal.AtMost, 50)
}
