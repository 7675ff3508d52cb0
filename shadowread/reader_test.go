package shadowread_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/shadowread"
	"github.com/dimmer-dev/dimmer/shadowread/shadowtest"
)

func newReader(t testing.TB, s *stores, src shadowread.StageSource, opts ...shadowread.Option) *shadowread.Reader[string, user] {
	t.Helper()
	r, err := shadowread.New("users_to_redis", src, s.readOld, s.readNew, idKey, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, r.Shutdown(context.Background())) })
	return r
}

func comparisons(t *testing.T, reader *sdkmetric.ManualReader) map[string]int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(context.Background(), &rm))
	out := map[string]int64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != "dimmer.shadowread.comparisons" {
				continue
			}
			for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
				v, _ := dp.Attributes.Value(attribute.Key("result"))
				out[v.AsString()] += dp.Value
			}
		}
	}
	return out
}

func TestNewValidates(t *testing.T) {
	t.Parallel()
	rd := func(context.Context, int) (string, error) { return "", nil }
	k := func(int) string { return "" }
	src := stageOf(flags.Off)
	_, err := shadowread.New("", src, rd, rd, k)
	assert.ErrorContains(t, err, "migration")
	_, err = shadowread.New[int, string]("m", nil, rd, rd, k)
	assert.ErrorContains(t, err, "source")
	_, err = shadowread.New("m", src, nil, rd, k)
	assert.ErrorContains(t, err, "old read")
	_, err = shadowread.New("m", src, rd, rd, k, shadowread.WithPool(0, 1))
	assert.ErrorContains(t, err, "WithPool")
	_, err = shadowread.New("m", src, rd, rd, k, shadowread.WithComparator(shadowread.DeepCompare[int]()))
	assert.ErrorIs(t, err, shadowread.ErrComparatorType)
	assert.ErrorContains(t, err, "want shadowread.Comparator[string]")
}

// TestServesAndComparesByStage checks, stage by stage, the side served and
// the side compared against in the stage model, written out here independently.
func TestServesAndComparesByStage(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	s.put(t, "u", "old-name", "new-name")
	src := stageOf(flags.Off)
	obs := make(observations, 64)
	r := newReader(t, s, src, shadowread.WithWait(), shadowread.WithRecheck(0), shadowread.WithObserver(obs),
		shadowread.WithReports(shadowread.ReportSinkFunc(func(context.Context, shadowread.Report) {}), 0, nil))
	want := map[flags.Stage]struct {
		served   string
		compared flags.Side
	}{
		flags.Off: {"old-name", flags.NoSide}, flags.DualWrite: {"old-name", flags.NoSide},
		flags.Shadow: {"old-name", flags.New}, flags.Live: {"new-name", flags.Old},
		flags.RampDown: {"new-name", flags.NoSide}, flags.Complete: {"new-name", flags.NoSide},
	}
	for _, st := range flags.Stages() {
		src.set(st)
		got, err := r.Read(ctx(t), "u")
		require.NoError(t, err)
		assert.Equal(t, want[st].served, got.Name, st)
		first := obs.next(t)
		assert.Equal(t, flags.Read, first.Op)
		if want[st].compared == flags.NoSide {
			assert.Empty(t, obs, "%s compares nothing", st)
			continue
		}
		shadow := obs.next(t)
		assert.Equal(t, want[st].compared, shadow.Side, st)
		assert.True(t, shadow.Compared && shadow.Mismatch && shadow.Lasting, "%s: the names differ", st)
	}
}

func TestSlowFailingPanickingShadowNeverReachesTheCaller(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	s.put(t, "u", "same", "same")
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	var mode atomic.Int32
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	shadow := func(ctx context.Context, id string) (user, error) {
		switch mode.Load() {
		case 1:
			entered <- struct{}{}
			<-release
		case 2:
			return user{}, errors.New("redis down")
		case 3:
			panic("shadow exploded")
		}
		return s.readNew(ctx, id)
	}
	r, err := shadowread.New("users_to_redis", stageOf(flags.Shadow), s.readOld, shadow, idKey,
		shadowread.WithMeterProvider(mp), shadowread.WithPool(2, 8))
	require.NoError(t, err)

	mode.Store(1)
	start := time.Now()
	got, err := r.Read(ctx(t), "u")
	require.NoError(t, err)
	assert.Equal(t, "same", got.Name)
	assert.Less(t, time.Since(start), 200*time.Millisecond, "a blocked shadow does not hold the caller")
	// The shadow runs on a worker some time after Read returns: let it see
	// its mode before the next one is set.
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the shadow read never ran")
	}
	close(release)
	require.Eventually(t, func() bool { return comparisons(t, reader)["match"] == 1 }, 5*time.Second, 5*time.Millisecond)

	mode.Store(2)
	_, err = r.Read(ctx(t), "u")
	require.NoError(t, err, "a shadow error is not the caller's")
	require.NoError(t, r.Shutdown(ctx(t)))

	r2, err := shadowread.New("users_to_redis", stageOf(flags.Shadow), s.readOld, shadow, idKey,
		shadowread.WithMeterProvider(mp))
	require.NoError(t, err)
	mode.Store(3)
	_, err = r2.Read(ctx(t), "u")
	require.NoError(t, err, "a shadow panic is recovered on the worker")
	require.NoError(t, r2.Shutdown(ctx(t)))

	c := comparisons(t, reader)
	assert.EqualValues(t, 1, c["match"])
	assert.EqualValues(t, 1, c["shadow_error"])
	assert.EqualValues(t, 1, c["panic"])
}

func TestCallerCancellationDoesNotCancelShadow(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	s.put(t, "u", "a", "a")
	obs := make(observations, 8)
	slow := func(ctx context.Context, id string) (user, error) {
		time.Sleep(50 * time.Millisecond)
		return s.readNew(ctx, id)
	}
	r, err := shadowread.New("users_to_redis", stageOf(flags.Shadow), s.readOld, slow, idKey, shadowread.WithObserver(obs))
	require.NoError(t, err)
	t.Cleanup(func() { _ = r.Close() })
	cctx, cancel := context.WithCancel(ctx(t))
	_, err = r.Read(cctx, "u")
	require.NoError(t, err)
	cancel()
	o := obs.nextShadow(t, flags.Old)
	assert.False(t, o.Err, "the shadow read finished after the caller cancelled")
	assert.True(t, o.Compared)
	assert.False(t, o.Mismatch)
}

func TestShadowTimeoutIsAShadowError(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	s.put(t, "u", "a", "a")
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	slowOld := func(ctx context.Context, id string) (user, error) {
		var u user
		err := s.pg.QueryRow(ctx, `SELECT id, name, version FROM users, pg_sleep(5) WHERE id = $1`, id).Scan(&u.ID, &u.Name, &u.Version)
		return u, err
	}
	// Live: old is the shadow.
	r := newReaderFns(t, s, stageOf(flags.Live), slowOld, s.readNew, shadowread.WithMeterProvider(mp),
		shadowread.WithShadowTimeout(100*time.Millisecond))
	_, err := r.Read(ctx(t), "u")
	require.NoError(t, err)
	require.NoError(t, r.Shutdown(ctx(t)))
	assert.EqualValues(t, 1, comparisons(t, reader)["shadow_error"])
}

func newReaderFns(t testing.TB, s *stores, src shadowread.StageSource, old, new shadowread.Func[string, user], opts ...shadowread.Option) *shadowread.Reader[string, user] {
	t.Helper()
	r, err := shadowread.New("users_to_redis", src, old, new, idKey, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = r.Close() })
	return r
}

// TestTransientVersusLastingMismatch: the new side lags (a dual write in
// flight) and catches up between the read and the re-read: transient. A
// row that stays different is lasting.
func TestTransientVersusLastingMismatch(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	s.put(t, "lagging", "v2", "v1")
	s.put(t, "broken", "right", "wrong")
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	var once sync.Once
	catchingUp := func(ctx context.Context, id string) (user, error) {
		u, err := s.readNew(ctx, id)
		if id == "lagging" {
			once.Do(func() { err = errors.Join(err, s.rdb.HSet(ctx, s.key(id), "name", "v2").Err()) })
		}
		return u, err
	}
	var mu sync.Mutex
	var reports []shadowread.Report
	sink := shadowread.ReportSinkFunc(func(_ context.Context, r shadowread.Report) {
		mu.Lock()
		reports = append(reports, r)
		mu.Unlock()
	})
	clean := func(r shadowread.Report) shadowread.Report {
		for i := range r.Diff {
			r.Diff[i].Served, r.Diff[i].Shadow = "<redacted>", "<redacted>"
		}
		return r
	}
	obs := make(observations, 16)
	r := newReaderFns(t, s, stageOf(flags.Shadow), s.readOld, catchingUp, shadowread.WithMeterProvider(mp),
		shadowread.WithRecheck(30*time.Millisecond), shadowread.WithObserver(obs), shadowread.WithReports(sink, 0, clean))
	_, err := r.Read(ctx(t), "lagging")
	require.NoError(t, err)
	o := obs.nextShadow(t, flags.Old)
	assert.True(t, o.Mismatch)
	assert.False(t, o.Lasting, "the re-read matched: transient")

	_, err = r.Read(ctx(t), "broken")
	require.NoError(t, err)
	o = obs.nextShadow(t, flags.Old)
	assert.True(t, o.Mismatch)
	assert.True(t, o.Lasting)
	require.NoError(t, r.Shutdown(ctx(t)))

	c := comparisons(t, reader)
	assert.EqualValues(t, 1, c["transient"])
	assert.EqualValues(t, 1, c["mismatch"])
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, reports, 2)
	last := reports[1]
	assert.Equal(t, "broken", last.Key)
	assert.True(t, last.Lasting)
	assert.Equal(t, []string{"Name"}, last.Diff.Paths())
	assert.Equal(t, "<redacted>", last.Diff[0].Served, "reports pass through the cleaner")
}

// TestRecheckDoesNotHoldAWorker: the re-read of a mismatch waits on a timer,
// not on the pool. With one worker, five mismatching keys read one after
// another are all compared (none shed) and all decided about one delay after
// the first read; a worker held for each delay would take five delays. Each
// verdict carries the stage of its first read, though the stage moved on
// before the re-reads.
func TestRecheckDoesNotHoldAWorker(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	ids := []string{"m0", "m1", "m2", "m3", "m4"}
	for _, id := range ids {
		s.put(t, id, "right", "wrong")
	}
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	shadowDone := make(chan struct{}, len(ids)*2)
	newSide := func(ctx context.Context, id string) (user, error) {
		defer func() { shadowDone <- struct{}{} }()
		return s.readNew(ctx, id)
	}
	const delay = time.Second
	src := stageOf(flags.Shadow)
	obs := make(observations, 64)
	r := newReaderFns(t, s, src, s.readOld, newSide, shadowread.WithMeterProvider(mp),
		shadowread.WithPool(1, 1), shadowread.WithRecheck(delay), shadowread.WithObserver(obs))
	start := time.Now()
	for _, id := range ids {
		_, err := r.Read(ctx(t), id)
		require.NoError(t, err)
		select {
		case <-shadowDone: // the shadow read ran before the next Read
		case <-time.After(10 * time.Second):
			t.Fatal("shadow read did not run")
		}
	}
	src.set(flags.Live) // the stage moves on while the re-reads wait
	for range ids {
		o := obs.nextShadow(t, flags.Old)
		assert.True(t, o.Mismatch)
		assert.True(t, o.Lasting)
		assert.Equal(t, flags.Shadow, o.Stage, "the verdict keeps the first read's stage")
	}
	elapsed := time.Since(start)
	assert.Less(t, elapsed, 3*delay+delay/2, "the re-reads waited side by side, not one worker after another")
	require.NoError(t, r.Shutdown(ctx(t)))
	c := comparisons(t, reader)
	assert.Zero(t, c["shed"])
	assert.EqualValues(t, len(ids), c["mismatch"])
}

// TestShutdownCutsPendingRechecksShort: a mismatch whose re-read is still
// waiting when the reader shuts down is decided at once (lasting) and
// Shutdown waits for it.
func TestShutdownCutsPendingRechecksShort(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	s.put(t, "m", "right", "wrong")
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	obs := make(observations, 16)
	r := newReaderFns(t, s, stageOf(flags.Shadow), s.readOld, s.readNew, shadowread.WithMeterProvider(mp),
		shadowread.WithRecheck(time.Hour), shadowread.WithObserver(obs))
	_, err := r.Read(ctx(t), "m")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return r.PendingRechecks() == 1 }, 10*time.Second, time.Millisecond)
	start := time.Now()
	require.NoError(t, r.Shutdown(ctx(t)))
	assert.Less(t, time.Since(start), 10*time.Second)
	assert.Zero(t, r.PendingRechecks())
	o := obs.nextShadow(t, flags.Old)
	assert.True(t, o.Mismatch)
	assert.True(t, o.Lasting, "a re-read cut short cannot show the mismatch transient")
	assert.EqualValues(t, 1, comparisons(t, reader)["mismatch"])
}

func TestFullQueueShedsAndCounts(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	s.put(t, "u", "a", "a")
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	release := make(chan struct{})
	blocked := func(ctx context.Context, id string) (user, error) { <-release; return s.readNew(ctx, id) }
	r := newReaderFns(t, s, stageOf(flags.Shadow), s.readOld, blocked, shadowread.WithMeterProvider(mp), shadowread.WithPool(1, 1))
	for range 5 {
		_, err := r.Read(ctx(t), "u")
		require.NoError(t, err)
	}
	close(release)
	require.NoError(t, r.Shutdown(ctx(t)))
	c := comparisons(t, reader)
	assert.EqualValues(t, 3, c["shed"])
	assert.EqualValues(t, 2, c["match"])
}

func TestErrorPolicy(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	_, err := s.pg.Exec(ctx(t), `INSERT INTO users VALUES ('only-old', 'x', 1)`)
	require.NoError(t, err)
	var got []shadowread.Report
	r := newReader(t, s, stageOf(flags.Live), shadowread.WithWait(), shadowread.WithRecheck(0),
		shadowread.WithMismatchHandler(func(r shadowread.Report) { got = append(got, r) }))
	_, err = r.Read(ctx(t), "only-old")
	require.ErrorIs(t, err, errNotFound, "live serves new, which lacks the row")
	require.Len(t, got, 1, "served failed, shadow found the row: a mismatch")
	assert.Equal(t, "<error>", got[0].Diff[0].Path)
	_, err = r.Read(ctx(t), "nowhere")
	require.ErrorIs(t, err, errNotFound)
	assert.Len(t, got, 1, "both sides failed: a match by default")

	assert.Equal(t, shadowread.Mismatch, shadowread.ErrorsEqual(errNotFound, errors.New("timeout")))
	assert.Equal(t, shadowread.Match, shadowread.ErrorsEqual(errNotFound, fmt.Errorf("redis: %w", errNotFound)))
}

func TestSamplingIsDeterministicByKey(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	a := newReader(t, s, stageOf(flags.Shadow))
	b := newReader(t, s, stageOf(flags.Shadow)) // another instance, same migration
	other, err := shadowread.New("other_migration", stageOf(flags.Shadow), s.readOld, s.readNew, idKey)
	require.NoError(t, err)
	t.Cleanup(func() { _ = other.Close() })
	n, at30, same := 20000, 0, 0
	for i := range n {
		k := fmt.Sprintf("key-%d", i)
		s30 := a.Sampled(k, 0.3)
		require.Equal(t, s30, b.Sampled(k, 0.3), "every instance samples the same keys")
		if s30 {
			at30++
			require.True(t, a.Sampled(k, 0.5), "raising the rate keeps every sampled key")
			if other.Sampled(k, 0.3) {
				same++
			}
		}
	}
	assert.InDelta(t, 0.3, float64(at30)/float64(n), 0.02)
	assert.InDelta(t, 0.3, float64(same)/float64(at30), 0.03, "migrations sample independently")

	var shadowCalls atomic.Int64
	counting := func(ctx context.Context, id string) (user, error) { shadowCalls.Add(1); return s.readNew(ctx, id) }
	rate := 0.0
	r := newReaderFns(t, s, stageOf(flags.Shadow), s.readOld, counting, shadowread.WithWait(),
		shadowread.WithSampleRate(func(context.Context, string) float64 { return rate }))
	s.put(t, "u", "a", "a")
	_, _ = r.Read(ctx(t), "u")
	assert.Zero(t, shadowCalls.Load(), "rate 0 compares nothing")
	rate = 1
	_, _ = r.Read(ctx(t), "u")
	assert.EqualValues(t, 1, shadowCalls.Load())
}

// recordingT is a testing.TB whose failures are recorded, to test the test
// mode itself.
type recordingT struct {
	testing.TB
	mu     sync.Mutex
	errors []string
}

func (r *recordingT) Helper() {}
func (r *recordingT) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errors = append(r.errors, fmt.Sprintf(format, args...))
}

func TestStrictModeFailsTheTestOnAnyMismatch(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	s.put(t, "ok", "a", "a")
	s.put(t, "bad", "a", "b")
	rt := &recordingT{TB: t}
	r := newReader(t, s, stageOf(flags.Shadow), shadowtest.Strict(rt)...)
	_, err := r.Read(ctx(t), "ok")
	require.NoError(t, err)
	assert.Empty(t, rt.errors)
	_, err = r.Read(ctx(t), "bad")
	require.NoError(t, err)
	require.Len(t, rt.errors, 1, "the failure is there when Read returns")
	assert.Contains(t, rt.errors[0], `key "bad"`)
	assert.Contains(t, rt.errors[0], "Name: a != b")
}
