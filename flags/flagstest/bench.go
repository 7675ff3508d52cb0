package flagstest

import (
	"context"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/open-feature/go-sdk/openfeature"
	"github.com/open-feature/go-sdk/openfeature/memprovider"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
)

// MemProvider returns OpenFeature's in-memory provider serving stage for flag:
// the baseline a dimmer provider's evaluation cost is compared with.
func MemProvider(flag string, stage flags.Stage) *memprovider.InMemoryProvider {
	return memprovider.NewInMemoryProvider(map[string]memprovider.InMemoryFlag{
		flag: {
			Key:            flag,
			State:          memprovider.Enabled,
			DefaultVariant: stage.String(),
			Variants:       map[string]any{stage.String(): stage.String()},
		},
	})
}

// EvalResult is the outcome of [CompareEval].
type EvalResult struct {
	// CandidateNs and BaselineNs are the median ns per evaluation.
	CandidateNs, BaselineNs float64
	// Ratio is the median over rounds of candidate time / baseline time.
	Ratio float64
}

// CompareEval times stage evaluations of flag through candidate and baseline
// the way [flags.Source] does them (StringValueDetails with the entity key as
// targeting key), in rounds of perRound evaluations each, alternating which
// client goes first, so both see the same machine load. Each evaluation must
// return want.
func CompareEval(tb testing.TB, candidate, baseline *openfeature.Client, flag string, want flags.Stage, rounds, perRound int) EvalResult {
	tb.Helper()
	ctx := context.Background()
	evalCtxs := make([]openfeature.EvaluationContext, 1024)
	for i := range evalCtxs {
		evalCtxs[i] = openfeature.NewEvaluationContext("entity-"+strconv.Itoa(i), nil)
	}
	run := func(c *openfeature.Client) time.Duration {
		start := time.Now()
		for i := range perRound {
			d, err := c.StringValueDetails(ctx, flag, "off", evalCtxs[i&1023])
			if err != nil || d.Value != want.String() {
				require.FailNow(tb, "evaluation failed", "value %q, err %v", d.Value, err)
			}
		}
		return time.Since(start)
	}
	run(candidate) // warm up both
	run(baseline)
	var ratios, cand, base []float64
	for r := range rounds {
		var c, b time.Duration
		if r%2 == 0 {
			c, b = run(candidate), run(baseline)
		} else {
			b, c = run(baseline), run(candidate)
		}
		ratios = append(ratios, float64(c)/float64(b))
		cand = append(cand, float64(c)/float64(perRound))
		base = append(base, float64(b)/float64(perRound))
	}
	return EvalResult{CandidateNs: median(cand), BaselineNs: median(base), Ratio: median(ratios)}
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// Percentile returns the p-th percentile (0 < p <= 100) of ds, nearest rank.
func Percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s))*p/100+0.999999) - 1
	return s[max(0, min(i, len(s)-1))]
}

// MeasurePropagation flips flag flips times in store and returns, for every
// (flip, instance) pair, the time from just before Swap is called until that
// instance's provider delivers the CONFIGURATION_CHANGED event after which it
// evaluates the new revision. Every provider is registered with its own
// isolated OpenFeature API.
func MeasurePropagation(tb testing.TB, store flags.Store, providers []Provider, flag string, flips int) []time.Duration {
	tb.Helper()
	type seen struct {
		rev int64
		at  time.Time
	}
	chans := make([]chan seen, len(providers))
	for i, p := range providers {
		api, _ := Client(tb, p)
		ch := make(chan seen, 1024)
		chans[i] = ch
		cb := func(d openfeature.EventDetails) {
			if !slices.Contains(d.FlagChanges, flag) {
				return
			}
			select {
			case ch <- seen{rev: p.Revisions()[flag], at: time.Now()}:
			default:
			}
		}
		api.AddHandler(openfeature.ProviderConfigChange, &cb)
	}
	ctx := Context(tb)
	st, err := store.Load(ctx, flag)
	require.NoError(tb, err)
	var out []time.Duration
	stages := []flags.Stage{flags.Shadow, flags.Live}
	// Flip 0 is a warm-up (a subscription may still be starting): not counted.
	for i := range flips + 1 {
		next := st
		next.Stage = stages[i%2]
		start := time.Now()
		st, err = store.Swap(ctx, st.Revision, next, Entry(flag, st.Stage, next.Stage, "bench"))
		require.NoError(tb, err)
		for j, ch := range chans {
			deadline := time.After(10 * time.Second)
			for done := false; !done; {
				select {
				case s := <-ch:
					if s.rev >= st.Revision {
						if i > 0 {
							out = append(out, s.at.Sub(start))
						}
						done = true
					}
				case <-deadline:
					require.FailNow(tb, "flip not observed", "instance %d, revision %d", j, st.Revision)
				}
			}
		}
	}
	return out
}
