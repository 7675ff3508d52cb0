package backfill_test

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
)

func TestVerifyRepairAndGuard(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount, note) SELECT g, g, CASE WHEN g % 5 = 0 THEN NULL ELSE 'n' || g END FROM generate_series(-500, 1499) g`)
	ctl, err := flags.NewController(e.store, flags.WithGuards(e.bf.Guard()))
	require.NoError(t, err)

	_, err = ctl.Advance(tctx(t), "orders", "test", "too early")
	var refused *flags.RefusedError
	require.ErrorAs(t, err, &refused)
	assert.Contains(t, err.Error(), "backfill-verified: no backfill was run or verified for orders")

	j := ordersJob("copy")
	_, err = e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	_, err = ctl.Advance(tctx(t), "orders", "test", "not verified")
	require.ErrorAs(t, err, &refused)
	assert.Contains(t, err.Error(), "job copy was never verified")

	// Damage new in the ways checksums get wrong elsewhere: a NULL that
	// became the string "null" (and the reverse), a lost row, an extra row
	// past the upper bound, a changed value.
	exec(t, e.pool, `UPDATE new_orders SET note = 'null' WHERE id = 10`)
	exec(t, e.pool, `UPDATE new_orders SET note = NULL WHERE id = 11`)
	exec(t, e.pool, `UPDATE new_orders SET note = '' WHERE id = 15`)
	exec(t, e.pool, `DELETE FROM new_orders WHERE id = -300`)
	exec(t, e.pool, `INSERT INTO new_orders (id, amount) VALUES (99999, 1)`)
	exec(t, e.pool, `UPDATE new_orders SET amount = amount + 0.01 WHERE id = 1200`)

	opts := backfill.VerifyOptions{ChunkRows: 300}
	v, err := e.bf.Verify(tctx(t), j, opts)
	require.NoError(t, err)
	assert.False(t, v.OK)
	assert.Equal(t, int64(4), v.Differing, "the ranges holding -300, 10..15, 1200 and the open last one (99999): %+v", v.Ranges)
	assert.Equal(t, int64(6), v.DifferingKeys)
	assert.Zero(t, v.InFlight, "nothing writes")
	if assert.Len(t, v.Ranges, 4) {
		assert.Equal(t, [][]string{{"-300"}}, v.Ranges[0].Keys)
		assert.ElementsMatch(t, [][]string{{"10"}, {"11"}, {"15"}}, v.Ranges[1].Keys)
		assert.Equal(t, [][]string{{"99999"}}, v.Ranges[3].Keys, "a row only the target has")
	}
	assert.Equal(t, int64(2000), v.RowsSource)
	assert.Equal(t, int64(2000), v.RowsTarget, "one lost, one extra")
	_, err = ctl.Advance(tctx(t), "orders", "test", "damaged")
	require.ErrorAs(t, err, &refused)
	assert.Contains(t, err.Error(), "job copy: last verification failed: 4 of 7 ranges differ")

	opts.Repair = true
	v, err = e.bf.Verify(tctx(t), j, opts)
	require.NoError(t, err)
	assert.True(t, v.OK, "%+v", v.Problems)
	assert.Equal(t, int64(4), v.Repaired)
	assert.Zero(t, e.diff(t), "repaired by recopy")
	st, err := ctl.Advance(tctx(t), "orders", "test", "verified")
	require.NoError(t, err)
	assert.Equal(t, flags.Shadow, st.Stage)

	// Back to off: new is stale, a new backfill and verification are due.
	_, err = ctl.Set(tctx(t), flags.Request{Migration: "orders", Stage: flags.Off, Actor: "test", Reason: "incident"})
	require.NoError(t, err)
	_, err = ctl.Advance(tctx(t), "orders", "test", "again")
	require.NoError(t, err)
	_, err = ctl.Advance(tctx(t), "orders", "test", "stale")
	require.ErrorAs(t, err, &refused)
	assert.Contains(t, err.Error(), "job copy ran at epoch 0, the migration is at epoch 1 (it went back to off): run it again")
	assert.Contains(t, err.Error(), "job copy was last verified at epoch 0, the migration is at epoch 1: verify again")
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.False(t, res.AlreadyDone, "a new epoch starts over")
	assert.Equal(t, int64(2000), res.Rows)
	_, err = e.bf.Verify(tctx(t), j, backfill.VerifyOptions{})
	require.NoError(t, err)
	_, err = ctl.Advance(tctx(t), "orders", "test", "verified again")
	require.NoError(t, err)
}

func TestBusinessChecks(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount, note) SELECT g, g * 1.37, 'n' FROM generate_series(1, 1000) g`)
	j := ordersJob("rounded")
	j.Spec.Exprs = map[string]string{"amount": "round(amount, 1)"} // the new side keeps one decimal
	_, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)

	revenue := backfill.BusinessCheck{Name: "revenue-per-bucket",
		SourceSQL: `SELECT (id % 4)::text, sum(amount) FROM old_orders GROUP BY 1`,
		TargetSQL: `SELECT (id % 4)::text, sum(amount) FROM new_orders GROUP BY 1`, RelTolerance: 0.001}
	orders := backfill.BusinessCheck{Name: "orders-per-bucket",
		SourceSQL: `SELECT (id % 4)::text, count(*) FROM old_orders GROUP BY 1`,
		TargetSQL: `SELECT (id % 4)::text, count(*) FROM new_orders GROUP BY 1`}
	v, err := e.bf.Verify(tctx(t), j, backfill.VerifyOptions{Checks: []backfill.BusinessCheck{revenue, orders}})
	require.NoError(t, err)
	assert.True(t, v.OK, "rows equal through the transform, revenue within 0.1%%: %v", v.Problems)

	revenue.RelTolerance = 0
	exec(t, e.pool, `DELETE FROM new_orders WHERE id = 8`)
	v, err = e.bf.Verify(tctx(t), j, backfill.VerifyOptions{Checks: []backfill.BusinessCheck{revenue, orders}})
	require.NoError(t, err)
	assert.False(t, v.OK)
	require.Len(t, v.Checks, 2)
	assert.False(t, v.Checks[0].OK)
	assert.Contains(t, v.Checks[0].Detail, "groups differ")
	assert.False(t, v.Checks[1].OK)
	assert.Contains(t, v.Checks[1].Detail, "0: source 250, target 249")
}

// hammer dual-writes the hot keys over and over as a service in dualwrite
// does: old first, then new in a transaction of its own a moment later,
// under the dual writer's version guard (an older write never replaces a
// newer one). Several writers share the keys. stop waits for the writers;
// writes counts the dual writes made.
func hammer(t *testing.T, oldPool, newPool *pgxpool.Pool, hot []int64, writers int) (writes *atomic.Int64, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(tctx(t))
	writes = new(atomic.Int64)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 11))
			// Writers stop between dual writes, never inside one: an
			// interrupted dual write is the repair log's business.
			wctx := context.WithoutCancel(ctx)
			for ctx.Err() == nil {
				id := hot[rng.IntN(len(hot))]
				var amount string
				var note *string
				var version int64
				if err := oldPool.QueryRow(wctx, `UPDATE old_orders SET amount = amount + 1, version = version + 1 WHERE id = $1
RETURNING amount::text, note, version`, id).Scan(&amount, &note, &version); err != nil {
					t.Errorf("dual write old: %v", err)
					return
				}
				time.Sleep(time.Duration(rng.IntN(3000)) * time.Microsecond)
				if _, err := newPool.Exec(wctx, `INSERT INTO new_orders AS t (id, amount, note, version) VALUES ($1, $2::numeric, $3, $4)
ON CONFLICT (id) DO UPDATE SET amount = EXCLUDED.amount, note = EXCLUDED.note, version = EXCLUDED.version
WHERE t.version < EXCLUDED.version`, id, amount, note, version); err != nil {
					t.Errorf("dual write new: %v", err)
					return
				}
				writes.Add(1)
				time.Sleep(time.Duration(rng.IntN(2000)) * time.Microsecond)
			}
		})
	}
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); wg.Wait() }) }
	t.Cleanup(stop)
	return writes, stop
}

// TestVerifyUnderDualWrites verifies while writers hammer a few hot keys
// the way dual writes do (old, then new a moment later): the verification
// passes without pausing them, and a key corrupted in new (which nothing
// writes) is still found and repaired. Once with new in the same database
// (both sides checksummed in one statement), once in another database.
func TestVerifyUnderDualWrites(t *testing.T) {
	t.Parallel()
	for _, other := range []bool{false, true} {
		name := "same database"
		if other {
			name = "other database"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			e.orders(t, "id bigint", "id", `(id, amount, note) SELECT g, g, CASE WHEN g % 7 = 0 THEN NULL ELSE 'n' || g END FROM generate_series(1, 3000) g`)
			j := ordersJob("hammered")
			tgt := e.pool
			if other {
				tgt = dimmertest.Pool(t, dimmertest.Database(t))
				exec(t, tgt, `CREATE TABLE new_orders (id bigint PRIMARY KEY, amount numeric, note text, version bigint NOT NULL)`)
				sink, err := backfill.NewPGSink(tgt, backfill.Table{Name: "new_orders"})
				require.NoError(t, err)
				j.Sink = sink
			}
			_, err := e.bf.Run(tctx(t), j)
			require.NoError(t, err)

			// Two hot keys in every range of 300 keys.
			var hot []int64
			for id := int64(7); id <= 3000; id += 150 {
				hot = append(hot, id)
			}
			writes, stop := hammer(t, e.pool, tgt, hot, 6)
			require.Eventually(t, func() bool { return writes.Load() > 50 }, 30*time.Second, 10*time.Millisecond)
			opts := backfill.VerifyOptions{ChunkRows: 300}
			// At least two verifications, and until one caught a key with a
			// dual write in flight (the writers' lag is a few milliseconds,
			// so most checksums meet none).
			var inFlight int64
			for i := 0; i < 2 || (inFlight == 0 && i < 10); i++ {
				before := writes.Load()
				v, err := e.bf.Verify(tctx(t), j, opts)
				require.NoError(t, err)
				assert.Greater(t, writes.Load()-before, int64(20), "the writers kept writing during the verification")
				assert.True(t, v.OK, "%v %+v", v.Problems, v.Ranges)
				assert.Zero(t, v.Differing)
				assert.Equal(t, int64(3000), v.RowsSource)
				inFlight += v.InFlight
			}
			assert.Positive(t, inFlight, "keys were caught with a dual write in flight")

			// A key nothing writes, corrupted in new, and a key whose dual
			// writes never reach new: its source keeps changing, its target
			// does not follow.
			exec(t, tgt, `UPDATE new_orders SET note = 'corrupt' WHERE id = 2000`)
			bctx, stopBroken := context.WithCancel(tctx(t))
			broken := make(chan struct{})
			go func() {
				defer close(broken)
				for bctx.Err() == nil {
					_, _ = e.pool.Exec(bctx, `UPDATE old_orders SET amount = amount + 1, version = version + 1 WHERE id = 2600`)
					time.Sleep(5 * time.Millisecond)
				}
			}()
			v, err := e.bf.Verify(tctx(t), j, opts)
			stopBroken()
			<-broken
			require.NoError(t, err)
			assert.False(t, v.OK)
			assert.Equal(t, int64(2), v.Differing, "%+v", v.Ranges)
			assert.Equal(t, int64(2), v.DifferingKeys)
			if assert.Len(t, v.Ranges, 2) {
				assert.Equal(t, [][]string{{"2000"}}, v.Ranges[0].Keys)
				assert.Equal(t, [][]string{{"2600"}}, v.Ranges[1].Keys)
			}
			require.NotEmpty(t, v.Problems)
			assert.Contains(t, v.Problems[0], "2 of 11 ranges differ (keys such as (2000) (2600))")

			opts.Repair = true
			v, err = e.bf.Verify(tctx(t), j, opts)
			require.NoError(t, err)
			assert.True(t, v.OK, "%v", v.Problems)
			assert.Equal(t, int64(2), v.Repaired, "%+v", v.Ranges)
			stop()
			var note string
			require.NoError(t, tgt.QueryRow(tctx(t), `SELECT note FROM new_orders WHERE id = 2000`).Scan(&note))
			assert.Equal(t, "n2000", note, "repaired by recopy")
			assert.Equal(t, count(t, e.pool, `SELECT version FROM old_orders WHERE id = 2600`), count(t, tgt, `SELECT version FROM new_orders WHERE id = 2600`))
			v, err = e.bf.Verify(tctx(t), j, backfill.VerifyOptions{ChunkRows: 300})
			require.NoError(t, err)
			assert.True(t, v.OK, "the writers stopped: old and new are equal")
		})
	}
}

// TestRepairKeepsCreatesInFlight repairs a range while orders are created
// in it new side first (as from live on, when new is authoritative): the
// repair deletes the target-only row that is a lasting difference, and
// none of the created rows whose old side has not landed yet.
func TestRepairKeepsCreatesInFlight(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount, note) SELECT g, g, 'n' FROM generate_series(1, 1000) g`)
	j := ordersJob("creates")
	_, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	exec(t, e.pool, `INSERT INTO new_orders (id, amount) VALUES (99999, 1)`) // in the last, open-ended range

	ctx, stop := context.WithCancel(tctx(t))
	var created atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for id := int64(5000); ctx.Err() == nil; id++ {
			wctx := context.WithoutCancel(ctx) // never stop inside a dual write
			if _, err := e.pool.Exec(wctx, `INSERT INTO new_orders (id, amount, note) VALUES ($1, 1, 'new first')`, id); err != nil {
				t.Errorf("create new: %v", err)
				return
			}
			time.Sleep(3 * time.Millisecond)
			if _, err := e.pool.Exec(wctx, `INSERT INTO old_orders (id, amount, note) VALUES ($1, 1, 'new first')`, id); err != nil {
				t.Errorf("create old: %v", err)
				return
			}
			created.Add(1)
		}
	}()
	require.Eventually(t, func() bool { return created.Load() > 10 }, 30*time.Second, 5*time.Millisecond)
	v, err := e.bf.Verify(tctx(t), j, backfill.VerifyOptions{ChunkRows: 300, Repair: true})
	stop()
	<-done
	require.NoError(t, err)
	assert.True(t, v.OK, "%v", v.Problems)
	assert.Equal(t, int64(1), v.Repaired, "%+v", v.Ranges)
	assert.Zero(t, count(t, e.pool, `SELECT count(*) FROM new_orders WHERE id = 99999`))
	assert.Zero(t, e.diff(t), "every order created during the repair is in new")
}

func TestVerifyCompositeKey(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "tenant text, id bigint", "tenant, id", `(tenant, id, amount) SELECT 't' || (g % 3), g, g FROM generate_series(1, 900) g`)
	j := ordersJob("composite")
	j.Spec.Key = []string{"tenant", "id"}
	_, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	exec(t, e.pool, `UPDATE new_orders SET amount = -1 WHERE tenant = 't1' AND id = 100`)
	exec(t, e.pool, `DELETE FROM new_orders WHERE tenant = 't2' AND id = 500`)
	exec(t, e.pool, `INSERT INTO new_orders (tenant, id, amount) VALUES ('t2', 100000, 1)`)
	v, err := e.bf.Verify(tctx(t), j, backfill.VerifyOptions{ChunkRows: 200})
	require.NoError(t, err)
	assert.False(t, v.OK)
	assert.Equal(t, int64(3), v.DifferingKeys)
	var keys [][]string
	for _, r := range v.Ranges {
		keys = append(keys, r.Keys...)
	}
	assert.ElementsMatch(t, [][]string{{"t1", "100"}, {"t2", "500"}, {"t2", "100000"}}, keys)

	v, err = e.bf.Verify(tctx(t), j, backfill.VerifyOptions{ChunkRows: 200, Repair: true})
	require.NoError(t, err)
	assert.True(t, v.OK, "%v", v.Problems)
	assert.Equal(t, v.Differing, v.Repaired)
	assert.Zero(t, e.diff(t))
}

// TestVerifyNewerInTarget: a target row newer than its source is its own
// category; a plain repair leaves it (the version guard), the source
// catching up or a repair with OverwriteNewer clears it.
func TestVerifyNewerInTarget(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount, note) SELECT g, g, 'n' || g FROM generate_series(1, 500) g`)
	j := ordersJob("newer")
	_, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	exec(t, e.pool, `UPDATE new_orders SET amount = -1, version = version + 1 WHERE id = 5`)
	exec(t, e.pool, `UPDATE new_orders SET note = 'x' WHERE id = 7`)
	opts := backfill.VerifyOptions{ChunkRows: 100, RecheckDelay: time.Millisecond}
	v, err := e.bf.Verify(tctx(t), j, opts)
	require.NoError(t, err)
	assert.False(t, v.OK)
	assert.Equal(t, int64(1), v.NewerInTarget)
	assert.Equal(t, int64(1), v.DifferingKeys, "the newer key is not counted twice")
	if assert.Len(t, v.Ranges, 1) {
		assert.Equal(t, [][]string{{"5"}}, v.Ranges[0].NewerKeys)
		assert.Equal(t, [][]string{{"7"}}, v.Ranges[0].Keys)
	}
	if assert.Len(t, v.Problems, 2) {
		assert.Contains(t, v.Problems[0], "1 of 6 ranges differ (keys such as (7))")
		assert.Contains(t, v.Problems[1], "1 keys are newer in the target than in the source (such as (5))")
		assert.Contains(t, v.Problems[1], "--overwrite-newer")
	}

	opts.Repair = true
	v, err = e.bf.Verify(tctx(t), j, opts)
	require.NoError(t, err)
	assert.False(t, v.OK, "the version guard keeps the newer row")
	assert.Equal(t, int64(1), v.NewerInTarget)
	assert.Len(t, v.Problems, 1)
	assert.Equal(t, int64(1), v.Repaired, "key 7 was repaired, though its range still holds the newer key 5")
	if assert.Len(t, v.Ranges, 1) {
		assert.True(t, v.Ranges[0].Repaired)
	}
	assert.Equal(t, int64(-1), count(t, e.pool, `SELECT amount::int8 FROM new_orders WHERE id = 5`))
	assert.Equal(t, int64(1), count(t, e.pool, `SELECT count(*) FROM new_orders WHERE id = 7 AND note = 'n7'`), "the other key was repaired")

	// Way out 1: the source catches up (its repair replayed).
	exec(t, e.pool, `UPDATE old_orders SET amount = -1, version = version + 1 WHERE id = 5`)
	v, err = e.bf.Verify(tctx(t), j, backfill.VerifyOptions{ChunkRows: 100})
	require.NoError(t, err)
	assert.True(t, v.OK, "%v", v.Problems)

	// Way out 2: the source is right; its row is copied over the newer one.
	exec(t, e.pool, `UPDATE new_orders SET amount = 42, version = version + 5 WHERE id = 300`)
	opts.OverwriteNewer = true
	v, err = e.bf.Verify(tctx(t), j, opts)
	require.NoError(t, err)
	assert.True(t, v.OK, "%v", v.Problems)
	assert.Equal(t, int64(1), v.NewerInTarget)
	assert.Equal(t, int64(1), v.Repaired)
	assert.Zero(t, e.diff(t))
}

// A job stopped before the end is not repaired by a verification (which
// would copy the rest past the job's rate limit and checkpoints), and a
// plain verification says why its untouched ranges differ.
func TestVerifyUnfinishedJob(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount) SELECT g, g FROM generate_series(1, 2000) g`)
	j := ordersJob("unfinished")
	e.stopAfterFirstChunk(t, j)

	opts := backfill.VerifyOptions{ChunkRows: 500, RecheckDelay: time.Millisecond}
	v, err := e.bf.Verify(tctx(t), j, opts)
	require.NoError(t, err)
	assert.False(t, v.OK)
	require.NotEmpty(t, v.Problems)
	assert.Regexp(t, `job unfinished has not finished its copy \(\d+ of ~2000 rows\): the ranges it has not reached read as differing`, v.Problems[0])

	opts.Repair = true
	_, err = e.bf.Verify(tctx(t), j, opts)
	require.ErrorIs(t, err, backfill.ErrJobNotFinished)
	assert.Less(t, count(t, e.pool, `SELECT count(*) FROM new_orders`), int64(2000), "nothing copied past the job")

	opts.Repair, opts.OverwriteNewer = false, true
	_, err = e.bf.Verify(tctx(t), j, opts)
	require.ErrorIs(t, err, backfill.ErrInvalidJob)
	assert.ErrorContains(t, err, "VerifyOptions.OverwriteNewer")

	_, err = e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	v, err = e.bf.Verify(tctx(t), j, backfill.VerifyOptions{Repair: true})
	require.NoError(t, err)
	assert.True(t, v.OK, "%v", v.Problems)
}

// A repair rewrites its range in one transaction against the service's own
// writes. One that loses a deadlock to them is retried, not failed.
func TestVerifyRepairRetriesDeadlock(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount) SELECT g, g FROM generate_series(1, 100) g`)
	j := ordersJob("repair-deadlock")
	_, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	exec(t, e.pool, `UPDATE new_orders SET amount = -1 WHERE id = 10`)

	// The service: a transaction holding row 90 of new, which then wants
	// row 2 while the repair holds row 2 and waits for row 90. The
	// service's deadlock check is put off, so the repair's finds the cycle
	// and the repair is the transaction aborted.
	svc, observer := dimmertest.Conn(t), dimmertest.Conn(t)
	ctx := tctx(t)
	newOrders := pgx.Identifier{e.schema, "new_orders"}.Sanitize()
	_, err = svc.Exec(ctx, `SET deadlock_timeout = '1min'`)
	require.NoError(t, err)
	tx, err := svc.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(context.WithoutCancel(ctx))
	_, err = tx.Exec(ctx, `SELECT 1 FROM `+newOrders+` WHERE id = 90 FOR UPDATE`)
	require.NoError(t, err)

	type verdict struct {
		v   backfill.Verification
		err error
	}
	done := make(chan verdict, 1)
	go func() {
		v, err := e.bf.Verify(ctx, j, backfill.VerifyOptions{Repair: true, RecheckDelay: time.Millisecond})
		done <- verdict{v, err}
	}()
	require.Eventually(t, func() bool { return dimmertest.Blocks(t, observer, svc) }, 30*time.Second, 5*time.Millisecond,
		"the repair never reached row 90")
	// Waits until the repair is aborted and its row 2 freed.
	_, err = tx.Exec(ctx, `SELECT 1 FROM `+newOrders+` WHERE id = 2 FOR UPDATE`)
	require.NoError(t, err)
	require.NoError(t, tx.Commit(ctx))

	got := <-done
	require.NoError(t, got.err)
	assert.True(t, got.v.OK, "%v", got.v.Problems)
	assert.Equal(t, int64(1), got.v.Repaired)
	assert.Zero(t, e.diff(t))
}
