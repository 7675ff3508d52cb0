package backfill_test

import (
	"math"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
)

// rateSample is this process's rows copied when a chunk ended.
type rateSample struct {
	at   time.Time
	rows int64
}

// rateRecorder collects a sample after every chunk.
type rateRecorder struct {
	mu      sync.Mutex
	samples []rateSample
}

func (r *rateRecorder) progress(p backfill.Progress) {
	var rows int64
	for _, w := range p.Workers {
		rows += w.Rows
	}
	r.mu.Lock()
	r.samples = append(r.samples, rateSample{time.Now(), rows})
	r.mu.Unlock()
}

// worstDeviation is the largest relative difference from rate of the rows
// copied in any window of length w between the first chunk's end and the
// last's (windows end at each chunk's end).
func (r *rateRecorder) worstDeviation(rate float64, w time.Duration) (worst float64, windows int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.samples) == 0 {
		return 0, 0
	}
	for i, s := range r.samples {
		from := s.at.Add(-w)
		if from.Before(r.samples[0].at) {
			continue
		}
		// Rows at the window's start: the last sample at or before it.
		base := r.samples[0].rows
		for _, p := range r.samples[:i] {
			if p.at.After(from) {
				break
			}
			base = p.rows
		}
		got := float64(s.rows-base) / w.Seconds()
		worst = max(worst, abs(got-rate)/rate)
		windows++
	}
	return worst, windows
}

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}

// TestRateLimitHolds: two workers asked for 5,000 rows/s copy 5,000 rows/s
// (±10 %) over every 5 s window, range ends and chunk sizing included.
func TestRateLimitHolds(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount) SELECT g, g FROM generate_series(1, 35000) g`)
	const rate = 5000
	j := ordersJob("rate")
	j.Config = backfill.Config{Workers: 2, Ranges: 40, RowsPerSecond: rate, PollInterval: 50 * time.Millisecond}
	rec := &rateRecorder{}
	j.Config.Progress = rec.progress
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	require.Equal(t, int64(35000), res.Rows)
	worst, windows := rec.worstDeviation(rate, 5*time.Second)
	require.Positive(t, windows, "the run lasted more than 5 s")
	t.Logf("worst of %d windows: %.1f%% off %d rows/s", windows, worst*100, rate)
	require.LessOrEqual(t, worst, 0.10, "worst 5 s window deviates %.1f%% from %d rows/s (run %.0f rows/s overall)",
		worst*100, rate, float64(res.Rows)/res.Elapsed.Seconds())
}

// A rate the pacer cannot keep is refused by name: NaN read as no limit,
// +Inf shrank chunks to one row, and a rate far below a row a second made
// the pacer's wait overflow into no limit at all.
func TestRowsPerSecondValidated(t *testing.T) {
	for _, rate := range []float64{math.NaN(), math.Inf(1), -5, 1e-300, 0.5} {
		err := backfill.Config{RowsPerSecond: rate}.Validate()
		require.ErrorIs(t, err, backfill.ErrInvalidJob, "%v", rate)
		assert.ErrorContains(t, err, "Config.RowsPerSecond")
	}
	for _, rate := range []float64{0, 1, 50_000} {
		assert.NoError(t, backfill.Config{RowsPerSecond: rate}.Validate(), "%v", rate)
	}
}

// Each duration a Config refuses is named, and a lease that would lapse
// under a worker between two renewals (one a chunk) is refused.
func TestConfigDurationsNamed(t *testing.T) {
	for field, cfg := range map[string]backfill.Config{
		"Config.TargetChunkTime": {TargetChunkTime: -time.Second},
		"Config.LockTime":        {LockTime: -time.Second},
		"Config.PollInterval":    {PollInterval: -time.Second},
		"Config.LeaseTTL":        {LeaseTTL: -time.Second},
	} {
		err := cfg.Validate()
		require.ErrorIs(t, err, backfill.ErrInvalidJob, field)
		var fe *backfill.FieldError
		require.ErrorAs(t, err, &fe)
		assert.Equal(t, field, fe.Field)
	}
	for _, cfg := range []backfill.Config{
		{LeaseTTL: 500 * time.Millisecond},
		{LeaseTTL: 3 * time.Second, TargetChunkTime: 2 * time.Second},
	} {
		var fe *backfill.FieldError
		require.ErrorAs(t, cfg.Validate(), &fe, "%+v", cfg)
		assert.Equal(t, "Config.LeaseTTL", fe.Field)
	}
	for _, cfg := range []backfill.Config{
		{}, {LeaseTTL: time.Second}, {LeaseTTL: 4 * time.Second, TargetChunkTime: 2 * time.Second},
	} {
		assert.NoError(t, cfg.Validate(), "%+v", cfg)
	}
}
