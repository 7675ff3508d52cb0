package backfill_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
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
