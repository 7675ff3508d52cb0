package dualwrite_test

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
)

func TestNewValidates(t *testing.T) {
	t.Parallel()
	w := func(context.Context, int) (int, error) { return 0, nil }
	k := func(int) string { return "" }
	log := dualwrite.RepairLogFunc(func(context.Context, dualwrite.Repair) error { return nil })
	src := stageOf(flags.Off)
	cases := map[string]func() error{
		"migration": func() error { _, err := dualwrite.New("", src, w, w, k, dualwrite.WithRepairLog(log)); return err },
		"source": func() error {
			_, err := dualwrite.New[int, int]("m", nil, w, w, k, dualwrite.WithRepairLog(log))
			return err
		},
		"old write":  func() error { _, err := dualwrite.New("m", src, nil, w, k, dualwrite.WithRepairLog(log)); return err },
		"new write":  func() error { _, err := dualwrite.New("m", src, w, nil, k, dualwrite.WithRepairLog(log)); return err },
		"key":        func() error { _, err := dualwrite.New("m", src, w, w, nil, dualwrite.WithRepairLog(log)); return err },
		"repair log": func() error { _, err := dualwrite.New("m", src, w, w, k); return err },
		"WithAsync": func() error {
			_, err := dualwrite.New("m", src, w, w, k, dualwrite.WithRepairLog(log), dualwrite.WithAsync(0, 1))
			return err
		},
		"WithSecondaryTimeout": func() error {
			_, err := dualwrite.New("m", src, w, w, k, dualwrite.WithRepairLog(log), dualwrite.WithSecondaryTimeout(0))
			return err
		},
		"WithBreakerTrip": func() error {
			_, err := dualwrite.New("m", src, w, w, k, dualwrite.WithRepairLog(log), dualwrite.WithBreakerTrip(0, time.Second))
			return err
		},
	}
	for field, f := range cases {
		err := f()
		require.Error(t, err, field)
		assert.Contains(t, err.Error(), field)
	}
}

// TestRoutesByStage writes through every stage and checks each store against
// the stage model's routing table, written out here independently.
func TestRoutesByStage(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	src := stageOf(flags.Off)
	log := newRepairs()
	w := newWriter(t, s, src, log, dualwrite.WithSync())
	want := map[flags.Stage][2]bool{ // old, new written
		flags.Off: {true, false}, flags.DualWrite: {true, true}, flags.Shadow: {true, true},
		flags.Live: {true, true}, flags.RampDown: {true, true}, flags.Complete: {false, true},
	}
	for _, st := range flags.Stages() {
		src.set(st)
		id := "a-" + st.String()
		n, err := w.Write(ctx(t), account{ID: id, Name: "n", Version: 1})
		require.NoError(t, err, st)
		assert.EqualValues(t, 1, n, "%s: the authoritative side's result is returned", st)
		_, inOld := s.readOld(t, id)
		_, inNew := s.readNew(t, id)
		assert.Equal(t, want[st], [2]bool{inOld, inNew}, "%s: (old, new) written", st)
	}
	assert.Empty(t, log.all())
}

func TestAuthoritativeErrorIsTheCallersErrorInEveryStage(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	src := stageOf(flags.Off)
	log := newRepairs()
	w := newWriter(t, s, src, log, dualwrite.WithSync())
	for _, st := range flags.Stages() {
		src.set(st)
		id := "bad-" + st.String()
		a := account{ID: id, Name: "ok", Version: 1}
		if st.Authoritative() == flags.Old {
			a.Name = "reject" // violates the CHECK constraint
		} else {
			s.poison(t, id) // WRONGTYPE on HSET
		}
		_, err := w.Write(ctx(t), a)
		require.Error(t, err, st)
		if st.Authoritative() == flags.Old {
			var pgErr *pgconn.PgError
			require.ErrorAs(t, err, &pgErr, st)
			assert.Equal(t, "23514", pgErr.Code, "check_violation")
			_, inNew := s.readNew(t, id)
			assert.False(t, inNew, "%s: the secondary is not written after the authoritative side failed", st)
		} else {
			assert.Contains(t, err.Error(), "WRONGTYPE", st)
			_, inOld := s.readOld(t, id)
			assert.False(t, inOld, "%s: the secondary is not written after the authoritative side failed", st)
		}
	}
	assert.Empty(t, log.all(), "no repair for an operation that failed for the caller")
}

func TestSecondaryFailureBecomesRepairNeverCallerError(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"sync", "async"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			s := newStores(t)
			src := stageOf(flags.DualWrite)
			log := newRepairs()
			opt := dualwrite.WithSync()
			if mode == "async" {
				opt = dualwrite.WithAsync(2, 16)
			}
			w := newWriter(t, s, src, log, opt)

			s.poison(t, "r1")
			_, err := w.Write(ctx(t), account{ID: "r1", Name: "x", Version: 1})
			require.NoError(t, err, "a failed secondary write never fails the caller")
			rep := log.next(t)
			assert.Equal(t, "accounts_to_redis", rep.Migration)
			assert.Equal(t, "r1", rep.Key)
			assert.Equal(t, flags.New, rep.Side)
			assert.Equal(t, flags.DualWrite, rep.Stage)
			assert.Equal(t, dualwrite.ReasonError, rep.Reason)
			assert.Contains(t, rep.Err, "WRONGTYPE")

			// In live the old side is the secondary.
			src.set(flags.Live)
			_, err = w.Write(ctx(t), account{ID: "r2", Name: "reject", Version: 1})
			require.NoError(t, err)
			rep = log.next(t)
			assert.Equal(t, flags.Old, rep.Side)
			assert.Equal(t, flags.Live, rep.Stage)
			assert.Contains(t, rep.Err, "23514")
			got, ok := s.readNew(t, "r2")
			require.True(t, ok)
			assert.Equal(t, "reject", got.Name)
		})
	}
}

func TestKilledConnectionOnSecondaryBecomesRepair(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	log := newRepairs()
	started := make(chan uint32, 1)
	slowOld := func(ctx context.Context, a account) (int64, error) {
		conn, err := s.pg.Acquire(ctx)
		if err != nil {
			return 0, err
		}
		defer conn.Release()
		started <- conn.Conn().PgConn().PID()
		_, err = conn.Exec(ctx, `SELECT pg_sleep(30)`)
		return 0, err
	}
	w, err := dualwrite.New("kill", stageOf(flags.Live), slowOld, s.writeNew, accountKey,
		dualwrite.WithRepairLog(log), dualwrite.WithAsync(1, 4))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, w.Shutdown(context.Background())) })

	_, err = w.Write(ctx(t), account{ID: "k1", Name: "x", Version: 1})
	require.NoError(t, err)
	pid := <-started
	var killed bool
	require.NoError(t, s.pg.QueryRow(ctx(t), `SELECT pg_terminate_backend($1)`, pid).Scan(&killed))
	require.True(t, killed)
	rep := log.next(t)
	assert.Equal(t, flags.Old, rep.Side)
	assert.Equal(t, dualwrite.ReasonError, rep.Reason)
	assert.NotEmpty(t, rep.Err)
}

func TestSecondaryTimeoutBecomesRepair(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	log := newRepairs()
	slowOld := func(ctx context.Context, a account) (int64, error) {
		_, err := s.pg.Exec(ctx, `SELECT pg_sleep(5)`)
		return 0, err
	}
	w, err := dualwrite.New("timeout", stageOf(flags.RampDown), slowOld, s.writeNew, accountKey,
		dualwrite.WithRepairLog(log), dualwrite.WithSecondaryTimeout(100*time.Millisecond))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, w.Shutdown(context.Background())) })
	start := time.Now()
	_, err = w.Write(ctx(t), account{ID: "t1", Name: "x", Version: 1})
	require.NoError(t, err)
	rep := log.next(t)
	assert.Less(t, time.Since(start), 3*time.Second, "the statement was cancelled at the timeout")
	assert.Equal(t, dualwrite.ReasonTimeout, rep.Reason)
	_, ok := s.readNew(t, "t1")
	assert.True(t, ok)
}

func TestOpenBreakerSkipsSecondaryAndRecordsRepair(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	log := newRepairs()
	var newCalls atomic.Int64
	newWrite := func(ctx context.Context, a account) (int64, error) {
		newCalls.Add(1)
		return s.writeNew(ctx, a)
	}
	w, err := dualwrite.New("breaker", stageOf(flags.Shadow), s.writeOld, newWrite, accountKey,
		dualwrite.WithRepairLog(log), dualwrite.WithSync(), dualwrite.WithBreakerTrip(3, time.Minute))
	require.NoError(t, err)
	for i := range 3 {
		id := fmt.Sprintf("b%d", i)
		s.poison(t, id)
		_, err := w.Write(ctx(t), account{ID: id, Name: "x", Version: 1})
		require.NoError(t, err)
		assert.Equal(t, dualwrite.ReasonError, log.next(t).Reason)
	}
	assert.Equal(t, "open", w.BreakerState(flags.New).String())
	assert.Equal(t, "closed", w.BreakerState(flags.Old).String(), "each side has its own breaker")

	_, err = w.Write(ctx(t), account{ID: "b-healthy", Name: "x", Version: 1})
	require.NoError(t, err)
	rep := log.next(t)
	assert.Equal(t, dualwrite.ReasonBreakerOpen, rep.Reason)
	assert.Equal(t, "b-healthy", rep.Key)
	assert.EqualValues(t, 3, newCalls.Load(), "an open breaker does not call the secondary")
	_, inOld := s.readOld(t, "b-healthy")
	assert.True(t, inOld, "the authoritative write is unaffected")
}

func TestAsyncShedBecomesRepair(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	log := newRepairs()
	release := make(chan struct{})
	started := make(chan struct{}, 5)
	blocking := func(ctx context.Context, a account) (int64, error) {
		started <- struct{}{}
		<-release
		return s.writeNew(ctx, a)
	}
	w, err := dualwrite.New("shed", stageOf(flags.DualWrite), s.writeOld, blocking, accountKey,
		dualwrite.WithRepairLog(log), dualwrite.WithAsync(1, 1))
	require.NoError(t, err)
	// One write occupies the worker, one waits in the queue, the rest shed.
	// The worker must hold the first write before the others arrive: until
	// it picks it up, that write still fills the queue's only slot.
	write := func(i int) {
		_, err := w.Write(ctx(t), account{ID: fmt.Sprintf("s%d", i), Name: "x", Version: 1})
		require.NoError(t, err)
	}
	write(0)
	select {
	case <-started:
	case <-ctx(t).Done():
		t.Fatal("the worker never took the first write")
	}
	for i := 1; i < 5; i++ {
		write(i)
	}
	var shed []string
	for range 3 {
		rep := log.next(t)
		assert.Equal(t, dualwrite.ReasonShed, rep.Reason)
		shed = append(shed, rep.Key)
	}
	close(release)
	require.NoError(t, w.Shutdown(ctx(t)))
	inNew := 0
	for i := range 5 {
		if _, ok := s.readNew(t, fmt.Sprintf("s%d", i)); ok {
			inNew++
		}
	}
	assert.Equal(t, 2, inNew, "the running and the queued writes completed on shutdown")
	assert.Len(t, log.all(), 3, "every write not done is a repair: shed %v", shed)

	_, err = w.Write(ctx(t), account{ID: "late", Name: "x", Version: 1})
	require.NoError(t, err)
	assert.Equal(t, dualwrite.ReasonClosed, log.next(t).Reason, "a write after shutdown still leaves a repair")
}

func TestCallerCancellationDoesNotCancelAsyncSecondary(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	log := newRepairs()
	done := make(chan error, 1)
	slowNew := func(ctx context.Context, a account) (int64, error) {
		time.Sleep(50 * time.Millisecond) // the caller is long gone by now
		n, err := s.writeNew(ctx, a)
		done <- err
		return n, err
	}
	w, err := dualwrite.New("cancel", stageOf(flags.DualWrite), s.writeOld, slowNew, accountKey,
		dualwrite.WithRepairLog(log), dualwrite.WithAsync(1, 4))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, w.Shutdown(context.Background())) })
	cctx, cancel := context.WithCancel(ctx(t))
	_, err = w.Write(cctx, account{ID: "c1", Name: "x", Version: 1})
	require.NoError(t, err)
	cancel()
	require.NoError(t, <-done)
	_, ok := s.readNew(t, "c1")
	assert.True(t, ok)
	assert.Empty(t, log.all())
}

func TestPanicsAreRecovered(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	log := newRepairs()
	boom := func(ctx context.Context, a account) (int64, error) {
		if a.Name == "boom" {
			panic("new store exploded")
		}
		return s.writeNew(ctx, a)
	}
	src := stageOf(flags.DualWrite)
	w, err := dualwrite.New("panic", src, s.writeOld, boom, accountKey, dualwrite.WithRepairLog(log), dualwrite.WithAsync(1, 4))
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, w.Shutdown(context.Background())) })

	_, err = w.Write(ctx(t), account{ID: "p1", Name: "boom", Version: 1})
	require.NoError(t, err, "a panicking secondary on a worker never reaches the caller")
	rep := log.next(t)
	assert.Equal(t, dualwrite.ReasonPanic, rep.Reason)
	assert.Contains(t, rep.Err, "new store exploded")

	src.set(flags.Complete)
	_, err = w.Write(ctx(t), account{ID: "p2", Name: "boom", Version: 1})
	require.ErrorIs(t, err, dualwrite.ErrPanic, "an authoritative panic is the caller's error")
	var pe *dualwrite.PanicError
	require.ErrorAs(t, err, &pe)
	assert.Equal(t, flags.New, pe.Side)
	assert.Contains(t, string(pe.Stack), "writer_test.go")
}

func TestObservationsAndMetrics(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	log := newRepairs()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	var obs []flags.Observation
	obsCh := make(chan flags.Observation, 16)
	w := newWriter(t, s, stageOf(flags.Shadow), log, dualwrite.WithSync(), dualwrite.WithMeterProvider(mp),
		dualwrite.WithObserver(flags.ObserverFunc(func(o flags.Observation) { obsCh <- o })))
	_, err := w.Write(ctx(t), account{ID: "m1", Name: "x", Version: 1})
	require.NoError(t, err)
	s.poison(t, "m2")
	_, err = w.Write(ctx(t), account{ID: "m2", Name: "x", Version: 1})
	require.NoError(t, err)
	for range 4 {
		obs = append(obs, <-obsCh)
	}
	assert.Equal(t, flags.Old, obs[0].Side)
	assert.Equal(t, flags.New, obs[1].Side)
	assert.False(t, obs[1].Err)
	assert.True(t, obs[3].Err, "the failed new write is observed as an error")
	for _, o := range obs {
		assert.Equal(t, flags.Write, o.Op)
		assert.Equal(t, flags.Shadow, o.Stage)
		assert.Positive(t, o.Latency)
	}

	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(ctx(t), &rm))
	calls := sumByAttrs(t, rm, "dimmer.dualwrite.calls", "origin", "role", "outcome")
	assert.EqualValues(t, 2, calls["old/authoritative/ok"])
	assert.EqualValues(t, 1, calls["new/secondary/ok"])
	assert.EqualValues(t, 1, calls["new/secondary/error"])
	reps := sumByAttrs(t, rm, "dimmer.dualwrite.repairs", "outcome", "reason")
	assert.EqualValues(t, 1, reps["queued/error"])
	hist := findMetric(t, rm, "dimmer.dualwrite.latency")
	assert.Equal(t, "us", hist.Unit)
	h := hist.Data.(metricdata.Histogram[float64])
	var count uint64
	for _, dp := range h.DataPoints {
		count += dp.Count
		assert.Positive(t, dp.Sum)
	}
	assert.EqualValues(t, 4, count)
}

func findMetric(t *testing.T, rm metricdata.ResourceMetrics, name string) metricdata.Metrics {
	t.Helper()
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == name {
				return m
			}
		}
	}
	t.Fatalf("metric %s not recorded", name)
	return metricdata.Metrics{}
}

// sumByAttrs sums an int64 counter by the values of keys joined with "/".
func sumByAttrs(t *testing.T, rm metricdata.ResourceMetrics, name string, keys ...string) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	for _, dp := range findMetric(t, rm, name).Data.(metricdata.Sum[int64]).DataPoints {
		var parts []string
		for _, k := range keys {
			v, _ := dp.Attributes.Value(attribute.Key(k))
			parts = append(parts, v.AsString())
		}
		k := parts[0]
		for _, p := range parts[1:] {
			k += "/" + p
		}
		out[k] += dp.Value
	}
	return out
}

var _ = errors.Is
