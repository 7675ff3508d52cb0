package expandcontract_test

import (
	"bytes"
	"context"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/internal/benchgoal"
)

// syncBuffer is a log sink safe for the runner's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// lockQueueResult is what the service saw while another session held a lock
// on its table and a phase of a plan wanted a conflicting one.
type lockQueueResult struct {
	statements int
	p99, worst time.Duration
	// attempts is how many tries each phase's step took.
	attempts map[string]int
	logs     string
}

// runLockQueueScenario runs a load of reads and writes on a table while, for
// expand and then for contract, another session holds an ACCESS SHARE lock
// on it for hold and the phase's ALTER TABLE (ACCESS EXCLUSIVE) keeps trying.
// The registry runs with its default lock timeout, budget and backoff.
func runLockQueueScenario(tb testing.TB, hold time.Duration) lockQueueResult {
	tb.Helper()
	e := newEnv(tb)
	ctx := flagstest.Context(tb)
	e.exec(tb, `CREATE TABLE parcels (id bigserial PRIMARY KEY, label text)`)
	e.exec(tb, `INSERT INTO parcels (label) SELECT 'p' || g FROM generate_series(1, 1000) g`)
	var logs syncBuffer
	reg, err := expandcontract.NewRegistry(e.pool, expandcontract.WithSchema(e.schema),
		expandcontract.WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))))
	require.NoError(tb, err)
	require.NoError(tb, reg.Install(ctx))
	plan := expandcontract.Plan{Name: "parcels-weight",
		Expand:   []expandcontract.Step{{Name: "add-weight", SQL: `ALTER TABLE parcels ADD COLUMN IF NOT EXISTS weight int`}},
		Contract: []expandcontract.Step{{Name: "drop-label", SQL: `ALTER TABLE parcels DROP COLUMN IF EXISTS label`}}}
	require.NoError(tb, reg.Register(ctx, "bench", plan))

	// The load has a pool of its own, so its latency is the table's locks
	// and not a wait for a connection.
	cfg := e.pool.Config().Copy()
	cfg.MaxConns = 8
	load, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(tb, err)
	defer load.Close()
	var mu sync.Mutex
	var lat []time.Duration
	// Statements count from when the pool is warm: the first ones also
	// open its connections.
	var recording atomic.Bool
	measure := func(ctx context.Context, f func() error) error {
		start := time.Now()
		err := f()
		if recording.Load() {
			mu.Lock()
			lat = append(lat, time.Since(start))
			mu.Unlock()
		}
		return err
	}
	tr := runTraffic(4, func(ctx context.Context, w, i int) error {
		if i%2 == 0 {
			return measure(ctx, func() error {
				_, err := load.Exec(ctx, `INSERT INTO parcels DEFAULT VALUES`)
				return err
			})
		}
		return measure(ctx, func() error {
			var n int64
			return load.QueryRow(ctx, `SELECT count(*) FROM parcels WHERE id <= $1`, i).Scan(&n)
		})
	})
	tr.waitFor(tb, 200)
	recording.Store(true)

	res := lockQueueResult{attempts: map[string]int{}}
	for _, phase := range []string{expandcontract.PhaseExpand, expandcontract.PhaseContract} {
		if phase == expandcontract.PhaseContract {
			_, err := reg.Migrate(ctx, plan.Name, expandcontract.Request{Actor: "bench"})
			require.NoError(tb, err)
		}
		holder, err := e.pool.Begin(ctx)
		require.NoError(tb, err)
		_, err = holder.Exec(ctx, `SET LOCAL application_name = 'report-job'; SELECT count(*) FROM parcels`)
		require.NoError(tb, err)
		done := make(chan error, 1)
		go func() {
			var err error
			if phase == expandcontract.PhaseExpand {
				_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "bench"})
			} else {
				// No fleet in this scenario: the guards are not what it measures.
				_, err = reg.Contract(ctx, plan.Name, expandcontract.Request{Actor: "bench", Force: true, Reason: "lock queue scenario"})
			}
			done <- err
		}()
		// The lock is held for the scenario's time, as a long report would.
		time.Sleep(hold)
		require.NoError(tb, holder.Commit(ctx))
		require.NoError(tb, <-done, phase)
		st, err := reg.Status(ctx, plan.Name)
		require.NoError(tb, err)
		for _, s := range st.Steps {
			if s.Phase == phase {
				res.attempts[phase] = s.Attempts
			}
		}
	}
	tr.waitFor(tb, 20)
	_, errs := tr.stop()
	require.Empty(tb, errs, "load statements failed")
	res.logs = logs.String()
	mu.Lock()
	defer mu.Unlock()
	slices.Sort(lat)
	res.statements = len(lat)
	res.p99 = lat[len(lat)*99/100]
	res.worst = lat[len(lat)-1]
	return res
}

// TestLockQueueDoesNotStallTheLoad: while a report holds ACCESS SHARE on a
// busy table, expand's and contract's ALTER TABLE wait at most one short
// lock_timeout at the head of the lock queue at a time, retry within the
// budget, name the holder in the progress output, and finish once it is
// gone. No statement of the load waits anywhere near the 2 s a single long
// attempt would have held it.
func TestLockQueueDoesNotStallTheLoad(t *testing.T) {
	t.Parallel()
	res := runLockQueueScenario(t, 1500*time.Millisecond)
	t.Logf("%d statements, p99 %v, worst %v, attempts %v", res.statements, res.p99, res.worst, res.attempts)
	for _, phase := range []string{expandcontract.PhaseExpand, expandcontract.PhaseContract} {
		assert.Greater(t, res.attempts[phase], 1, "%s retried while the lock was held", phase)
	}
	// 2x the default lock timeout is the goal (the benchmark reports it);
	// a loaded test machine adds scheduling noise, never a second.
	assert.Less(t, res.worst, time.Second, "a load statement queued behind the DDL")
	assert.Contains(t, res.logs, "blocked_by=")
	assert.Contains(t, res.logs, `application \"report-job\"`)
	assert.Contains(t, res.logs, "AccessShareLock on parcels")
}

// TestLockWaitBudgetSpent: a holder that never lets go makes the step fail
// once the budget is spent, naming the holder, with nothing applied.
func TestLockWaitBudgetSpent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE crates (id int PRIMARY KEY)`)
	reg, err := expandcontract.NewRegistry(e.pool, expandcontract.WithSchema(e.schema), expandcontract.WithLockWaitBudget(time.Second))
	require.NoError(t, err)
	require.NoError(t, reg.Install(ctx))
	plan := expandcontract.Plan{Name: "crates-size",
		Expand:   []expandcontract.Step{{Name: "add-size", SQL: `ALTER TABLE crates ADD COLUMN size int`}},
		Contract: []expandcontract.Step{{Name: "noop", SQL: `SELECT 1`}}}
	require.NoError(t, reg.Register(ctx, "test", plan))
	holder, err := e.pool.Begin(ctx)
	require.NoError(t, err)
	defer holder.Rollback(context.Background())
	var pid int32
	require.NoError(t, holder.QueryRow(ctx, `SELECT pg_backend_pid() FROM (SELECT count(*) FROM crates) c`).Scan(&pid))

	start := time.Now()
	_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "test"})
	require.ErrorIs(t, err, expandcontract.ErrLockTimeout)
	assert.Less(t, time.Since(start), 5*time.Second)
	assert.ErrorContains(t, err, "lock-wait budget 1s spent")
	assert.ErrorContains(t, err, "blocked by pid "+itoa(int64(pid)))
	var se *expandcontract.StepError
	require.ErrorAs(t, err, &se)
	assert.Greater(t, se.Attempts, 1)
	st, err := reg.Status(ctx, plan.Name)
	require.NoError(t, err)
	assert.Contains(t, stepOf(t, st, expandcontract.PhaseExpand, "add-size").LastError, "AccessShareLock on crates")
	assert.NotContains(t, e.columns(t, "crates"), "size")
}

// BenchmarkLockQueue is the 20 s version of TestLockQueueDoesNotStallTheLoad:
// the load's p99 and its longest statement while a conflicting lock is held
// for 20 s during expand and again during contract. Goal: no statement
// waits more than twice the per-attempt lock timeout.
func BenchmarkLockQueue(b *testing.B) {
	for range b.N {
		res := runLockQueueScenario(b, 20*time.Second)
		b.Logf("%d statements, attempts %v", res.statements, res.attempts)
		goal := float64(2 * expandcontract.DefaultLockTimeout.Milliseconds())
		benchgoal.Report(b, "expandcontract_lock_held_20s_load_p99", float64(res.p99.Microseconds())/1000, "ms", benchgoal.AtMost, goal)
		benchgoal.Report(b, "expandcontract_lock_held_20s_longest_stall", float64(res.worst.Microseconds())/1000, "ms", benchgoal.AtMost, goal)
	}
}
