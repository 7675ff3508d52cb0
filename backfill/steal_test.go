package backfill_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dimmertest"
)

// logApplies records every row the sink applies to new: a row copied twice
// (a chunk redone, a range copied by two workers) logs its key twice.
func logApplies(t testing.TB, e *env) {
	exec(t, e.pool, `CREATE TABLE apply_log (id bigint NOT NULL);
CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO apply_log VALUES (NEW.id); RETURN NULL; END $$;
CREATE TRIGGER log_apply AFTER INSERT OR UPDATE ON new_orders FOR EACH ROW EXECUTE FUNCTION log_apply();`)
}

func assertExactlyOnce(t testing.TB, e *env, rows int64) {
	t.Helper()
	assert.Zero(t, e.diff(t), "new equals old")
	assert.Equal(t, rows, count(t, e.pool, `SELECT count(*) FROM apply_log`), "every row applied once")
	assert.Zero(t, count(t, e.pool, `SELECT count(*) FROM (SELECT id FROM apply_log GROUP BY id HAVING count(*) > 1) d`), "no row applied twice")
	assert.Equal(t, rows, count(t, e.pool, `SELECT sum(rows_done)::int8 FROM backfill_ranges`), "rows_done adds up")
}

// One range, two workers: the second finds nothing to claim and takes the
// upper half of the first's range, again and again as they finish.
func TestIdleWorkerSplitsBusyRange(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount) SELECT g, g FROM generate_series(-1500, 1499) g`)
	logApplies(t, e)
	j := ordersJob("steal")
	j.Config.Workers, j.Config.Ranges = 2, 1
	j.Config.InitialChunk, j.Config.MinChunk, j.Config.MaxChunk = 25, 25, 25
	j.Config.RowsPerSecond = 6000
	var mu sync.Mutex
	perWorker := map[string]int64{}
	j.Config.Progress = func(p backfill.Progress) {
		mu.Lock()
		defer mu.Unlock()
		for _, w := range p.Workers {
			perWorker[w.ID] = w.Rows
		}
	}
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, int64(3000), res.Rows)
	mu.Lock()
	assert.Len(t, perWorker, 2)
	for id, n := range perWorker {
		assert.Greater(t, n, int64(300), "worker %s copied a fair share", id)
	}
	mu.Unlock()
	s, err := e.bf.Status(tctx(t), "steal")
	require.NoError(t, err)
	assert.True(t, s.Done)
	assert.Greater(t, s.Ranges, 1, "the range was split")
	assertExactlyOnce(t, e, 3000)
}

// Ranges of very different cost: the rows of the first range are slow to
// transform. The worker done with the cheap range splits the slow one
// instead of sitting idle, and a second process joining late gets work too.
func TestSplitsSlowRangeAcrossProcesses(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount) SELECT g, g FROM generate_series(1, 2000) g`)
	logApplies(t, e)
	j := ordersJob("skewed")
	j.Spec.TransformVersion = "slow-low-keys"
	j.Transform = func(ctx context.Context, r backfill.Row) (backfill.Row, error) {
		if r["id"].(int64) <= 1000 {
			time.Sleep(3 * time.Millisecond)
		}
		return r, nil
	}
	j.Config.Workers, j.Config.Ranges = 2, 2
	j.Config.InitialChunk, j.Config.MinChunk, j.Config.MaxChunk = 20, 20, 20
	other, err := backfill.New(e.pool, backfill.WithSchema(e.schema), backfill.WithFlagStore(e.store), backfill.WithWorkerID("late"))
	require.NoError(t, err)
	var wg sync.WaitGroup
	results := make([]backfill.Result, 2)
	started := make(chan struct{})
	first := j
	first.Config.Progress = func(p backfill.Progress) {
		if p.RangesDone > 0 {
			select {
			case <-started:
			default:
				close(started)
			}
		}
	}
	wg.Go(func() {
		r, err := e.bf.Run(tctx(t), first)
		assert.NoError(t, err)
		results[0] = r
	})
	second := j
	second.Config.Workers = 1
	wg.Go(func() {
		select {
		case <-started: // the cheap range is done: only the slow one is left
		case <-time.After(30 * time.Second):
		}
		r, err := other.Run(tctx(t), second)
		assert.NoError(t, err)
		results[1] = r
	})
	wg.Wait()
	assert.Equal(t, int64(2000), results[0].Rows+results[1].Rows)
	assert.Positive(t, results[1].Rows, "the late process split a busy range")
	assert.Positive(t, count(t, e.pool, `SELECT count(*) FROM backfill_ranges WHERE id >= 2 AND rows_done > 0`), "split ranges were copied")
	assert.Greater(t, count(t, e.pool, `SELECT count(*) FROM backfill_ranges WHERE id >= 2 AND lo[1]::bigint < 1000`), int64(0),
		"the slow range was split")
	assertExactlyOnce(t, e, 2000)
}

// A worker with nothing to claim or split waits for the poll interval, or
// until a range of its process ends: the job ends with its last range, not
// a poll later.
func TestIdleWorkerWokenWhenLastRangeEnds(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id) SELECT generate_series(1, 100)`)
	j := ordersJob("tail")
	j.Config.Workers, j.Config.Ranges = 2, 1 // one worker idles: 100 rows are not worth a split
	j.Config.InitialChunk, j.Config.MinChunk, j.Config.MaxChunk = 50, 50, 50
	j.Config.PollInterval = time.Minute
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, int64(100), res.Rows)
	assert.Less(t, res.Elapsed, 30*time.Second, "the idle worker was woken, not left to poll")
}

// slowSink writes through a PGSink of another database, slowly, and counts
// the writes of each key.
type slowSink struct {
	*backfill.PGSink
	mu     sync.Mutex
	writes map[int64]int
}

func (s *slowSink) Write(ctx context.Context, rows []backfill.Row) error {
	time.Sleep(15 * time.Millisecond) // splits land while the sink writes
	s.mu.Lock()
	for _, r := range rows {
		s.writes[r["id"].(int64)]++
	}
	s.mu.Unlock()
	return s.PGSink.Write(ctx, rows)
}

// Where the sink commits on its own the range lock is let go while it
// writes: a split meanwhile must neither skip rows nor count them twice.
func TestSplitWhileSinkWritesElsewhere(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount) SELECT g, g FROM generate_series(1, 600) g`)
	other := dimmertest.Pool(t, dimmertest.Database(t))
	exec(t, other, `CREATE TABLE orders (id bigint PRIMARY KEY, amount numeric, note text, version bigint NOT NULL)`)
	pg, err := backfill.NewPGSink(other, backfill.Table{Name: "orders"})
	require.NoError(t, err)
	sink := &slowSink{PGSink: pg, writes: map[int64]int{}}
	j := ordersJob("elsewhere")
	j.Sink = sink
	j.Spec.Target = backfill.Table{Name: "orders"}
	j.Config.Workers, j.Config.Ranges = 3, 1
	j.Config.InitialChunk, j.Config.MinChunk, j.Config.MaxChunk = 20, 20, 20
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, int64(600), res.Rows, "each row counted once")
	assert.Equal(t, int64(600), count(t, e.pool, `SELECT sum(rows_done)::int8 FROM backfill_ranges`))
	assert.Greater(t, count(t, e.pool, `SELECT count(*) FROM backfill_ranges`), int64(1), "the range was split")
	assert.Len(t, sink.writes, 600, "no row skipped")
	assert.Equal(t, int64(600), count(t, other, `SELECT count(*) FROM orders`))
	assert.Equal(t, int64(600*601/2), count(t, other, `SELECT sum(amount)::int8 FROM orders`))
}

// A range of three chunks, two workers: the idle one splits it although each
// half holds less than two chunks, placing the split after the holder's chunk
// in flight (which the split waits for), so both copy part of it.
func TestIdleWorkerSplitsRangeOfFewChunks(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount) SELECT g, g FROM generate_series(1, 120) g`)
	logApplies(t, e)
	j := ordersJob("few")
	j.Spec.TransformVersion = "slow"
	j.Transform = func(ctx context.Context, r backfill.Row) (backfill.Row, error) {
		time.Sleep(2 * time.Millisecond) // a chunk of 40 takes about 80ms
		return r, nil
	}
	j.Config.Workers, j.Config.Ranges = 2, 1
	j.Config.InitialChunk, j.Config.MinChunk, j.Config.MaxChunk = 40, 10, 40
	var mu sync.Mutex
	perWorker := map[string]int64{}
	j.Config.Progress = func(p backfill.Progress) {
		mu.Lock()
		defer mu.Unlock()
		for _, w := range p.Workers {
			perWorker[w.ID] = w.Rows
		}
	}
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, int64(120), res.Rows)
	mu.Lock()
	assert.Len(t, perWorker, 2, "both workers copied rows")
	mu.Unlock()
	assert.Greater(t, count(t, e.pool, `SELECT count(*) FROM backfill_ranges`), int64(1), "the range was split")
	assertExactlyOnce(t, e, 120)
}

// Workers of one process claiming at once never take a range from one
// another: each range is claimed once (its fencing token is never bumped
// past the first claim).
func TestWorkersOfOneProcessClaimEachRangeOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id) SELECT generate_series(1, 2000)`)
	logApplies(t, e)
	j := ordersJob("once")
	j.Config.Workers, j.Config.Ranges = 4, 40
	j.Config.InitialChunk, j.Config.MinChunk, j.Config.MaxChunk = 50, 50, 50
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, int64(2000), res.Rows)
	assert.Equal(t, int64(1), count(t, e.pool, `SELECT max(token) FROM backfill_ranges`), "no range was claimed twice")
	assertExactlyOnce(t, e, 2000)
}
