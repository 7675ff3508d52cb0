package backfill_test

import (
	"context"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
)

// dualWrite updates a row of old (authoritative in dualwrite) and then
// writes the same version to new with the dual writer's own version guard.
func dualWrite(ctx context.Context, e *env, id int64) error {
	var amount float64
	var version int64
	if err := e.pool.QueryRow(ctx, `UPDATE old_orders SET amount = amount + 1, version = version + 1 WHERE id = $1
RETURNING amount::float8, version`, id).Scan(&amount, &version); err != nil {
		return err
	}
	_, err := e.pool.Exec(ctx, `INSERT INTO new_orders AS t (id, amount, note, version)
SELECT id, amount, note, version FROM old_orders WHERE id = $1 AND version = $2
ON CONFLICT (id) DO UPDATE SET amount = EXCLUDED.amount, note = EXCLUDED.note, version = EXCLUDED.version
WHERE t.version < EXCLUDED.version`, id, version)
	return err
}

func TestNoLostUpdateUnderDualWrites(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount, note) SELECT g, 0, 'n' FROM generate_series(1, 3000) g`)
	// Writers stop between dual writes, never inside one (an interrupted
	// dual write is the repair log's business, not this test's).
	var stopped atomic.Bool
	ctx := tctx(t)
	var wg sync.WaitGroup
	var writes, inserts atomic.Int64
	for w := range 6 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for !stopped.Load() {
				// A hot set of keys, hammered while the backfill copies them.
				if err := dualWrite(ctx, e, 1+rng.Int64N(300)*10); err != nil {
					t.Errorf("dual write: %v", err)
					return
				}
				writes.Add(1)
				if w == 0 {
					// Rows created after the upper bound are the dual writes' own.
					id := 100000 + inserts.Add(1)
					if _, err := e.pool.Exec(ctx, `WITH o AS (INSERT INTO old_orders (id, amount, note) VALUES ($1, 1, 'late') RETURNING *)
INSERT INTO new_orders SELECT * FROM o`, id); err != nil {
						t.Errorf("insert: %v", err)
						return
					}
				}
			}
		})
	}
	j := ordersJob("live")
	j.Config.Workers = 2
	j.Config.RowsPerSecond = 3000 // about a second of overlap with the writers
	res, err := e.bf.Run(tctx(t), j)
	stopped.Store(true)
	wg.Wait()
	require.NoError(t, err)
	st, err := e.bf.Status(tctx(t), "live")
	require.NoError(t, err)
	assert.Equal(t, count(t, e.pool, `SELECT count(*) FROM old_orders WHERE id <= $1::bigint`, st.UpperBound[0]), res.Rows,
		"the upper bound was fixed at start: later rows are not the backfill's")
	assert.Greater(t, count(t, e.pool, `SELECT count(*) FROM old_orders WHERE id > $1::bigint`, st.UpperBound[0]), int64(10))
	assert.Greater(t, writes.Load(), int64(100), "writers really ran during the backfill")
	if !assert.Zero(t, e.diff(t), "no backfilled row overwrote a newer dual write") {
		rows, _ := e.pool.Query(tctx(t), `SELECT 'old', * FROM (SELECT * FROM old_orders EXCEPT SELECT * FROM new_orders) a UNION ALL SELECT 'new', * FROM (SELECT * FROM new_orders EXCEPT SELECT * FROM old_orders) b`)
		for rows.Next() {
			v, _ := rows.Values()
			t.Log(v...)
		}
		rows.Close()
	}
	v, err := e.bf.Verify(tctx(t), j, backfill.VerifyOptions{ChunkRows: 500})
	require.NoError(t, err)
	assert.True(t, v.OK, "%v", v.Problems)
	assert.Zero(t, v.Differing)
}

func TestPauseResumeAcrossProcesses(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id) SELECT generate_series(1, 2000)`)
	j := ordersJob("paused")
	j.Config.Workers = 2
	j.Config.RowsPerSecond = 4000
	held := make(chan string, 1)
	j.Config.Progress = func(p backfill.Progress) {
		// The rate limit holds workers too; only the pause is awaited.
		if strings.HasPrefix(p.Held, "paused") {
			select {
			case held <- p.Held:
			default:
			}
		}
	}
	// A second Backfiller plays the operator's process (the CLI).
	op, err := backfill.New(e.pool, backfill.WithSchema(e.schema))
	require.NoError(t, err)
	require.ErrorIs(t, op.Pause(tctx(t), "nope", "x"), backfill.ErrUnknownJob)

	done := make(chan error, 1)
	go func() { _, err := e.bf.Run(tctx(t), j); done <- err }()
	require.Eventually(t, func() bool {
		s, err := op.Status(tctx(t), "paused")
		return err == nil && s.RowsDone > 0
	}, 10*time.Second, 5*time.Millisecond)
	require.NoError(t, op.Pause(tctx(t), "paused", "peak traffic"))
	select {
	case why := <-held:
		assert.Equal(t, "paused: peak traffic", why)
	case <-time.After(5 * time.Second):
		t.Fatal("workers did not report the pause")
	}
	time.Sleep(100 * time.Millisecond) // a chunk in flight when paused commits
	s1, err := op.Status(tctx(t), "paused")
	require.NoError(t, err)
	time.Sleep(300 * time.Millisecond)
	s2, err := op.Status(tctx(t), "paused")
	require.NoError(t, err)
	assert.True(t, s2.Paused)
	assert.Equal(t, s1.RowsDone, s2.RowsDone, "no chunk while paused")
	assert.Less(t, s2.RowsDone, int64(2000))
	assert.Empty(t, s2.Leases, "paused workers release their ranges")

	require.NoError(t, op.Resume(tctx(t), "paused"))
	require.NoError(t, <-done)
	s3, err := op.Status(tctx(t), "paused")
	require.NoError(t, err)
	assert.True(t, s3.Done)
	assert.Equal(t, int64(2000), s3.RowsDone)
	assert.Zero(t, e.diff(t))
}

func TestTwoProcessesShareRanges(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id) SELECT generate_series(1, 3000)`)
	other, err := backfill.New(e.pool, backfill.WithSchema(e.schema), backfill.WithFlagStore(e.store), backfill.WithWorkerID("other"))
	require.NoError(t, err)
	j := ordersJob("shared")
	j.Config.Ranges = 8
	j.Config.RowsPerSecond = 4000
	var wg sync.WaitGroup
	results := make([]backfill.Result, 2)
	for i, b := range []*backfill.Backfiller{e.bf, other} {
		wg.Go(func() {
			r, err := b.Run(tctx(t), j)
			assert.NoError(t, err)
			results[i] = r
		})
	}
	wg.Wait()
	assert.Equal(t, int64(3000), results[0].Rows+results[1].Rows, "each row copied by exactly one process")
	assert.Positive(t, results[0].Rows)
	assert.Positive(t, results[1].Rows)
	assert.Zero(t, e.diff(t))
}
