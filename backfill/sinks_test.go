package backfill_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
)

func TestOtherDatabaseWithGoTransform(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount, note) SELECT g, g, CASE WHEN g % 4 = 0 THEN NULL ELSE 'n' || g END FROM generate_series(-50, 449) g`)
	other := dimmertest.Pool(t, dimmertest.Database(t))
	exec(t, other, `CREATE TABLE orders (id bigint PRIMARY KEY, amount numeric, note text, version bigint NOT NULL)`)
	// A newer dual write already in new: the copy must leave it alone.
	exec(t, other, `INSERT INTO orders VALUES (7, 700, 'dual', 5)`)
	sink, err := backfill.NewPGSink(other, backfill.Table{Name: "orders"})
	require.NoError(t, err)
	j := ordersJob("cross")
	j.Sink = sink
	j.Spec.Target = backfill.Table{Name: "orders"}
	j.Spec.TransformVersion = "upper-notes-v1"
	j.Spec.VerifyIgnore = []string{"note"}
	j.Transform = func(_ context.Context, r backfill.Row) (backfill.Row, error) {
		if n, ok := r["note"].(string); ok {
			r["note"] = strings.ToUpper(n)
		}
		return r, nil
	}
	j.Config.Workers = 2
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, int64(500), res.Rows)
	assert.Equal(t, int64(500), count(t, other, `SELECT count(*) FROM orders`))
	assert.Equal(t, int64(125), count(t, other, `SELECT count(*) FROM orders WHERE note IS NULL`), "NULLs stay NULL")
	assert.Equal(t, int64(1), count(t, other, `SELECT count(*) FROM orders WHERE note = 'N1'`))
	assert.Equal(t, int64(5), count(t, other, `SELECT version FROM orders WHERE id = 7`), "the newer dual write survived")

	exec(t, e.pool, `UPDATE old_orders SET amount = 700, note = 'dual', version = 5 WHERE id = 7`)
	exec(t, other, `DELETE FROM orders WHERE id = 100; INSERT INTO orders VALUES (5000, 1, 'x', 1)`)
	v, err := e.bf.Verify(tctx(t), j, backfill.VerifyOptions{ChunkRows: 100, Repair: true, RecheckDelay: time.Millisecond})
	require.NoError(t, err)
	assert.True(t, v.OK, "%v", v.Problems)
	assert.Equal(t, int64(2), v.Repaired)
	assert.Equal(t, int64(500), count(t, other, `SELECT count(*) FROM orders`))
	assert.Equal(t, int64(0), count(t, other, `SELECT count(*) FROM orders WHERE id = 5000`))
}

func TestRedisSink(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id uuid", "id", `(id, amount, note) SELECT gen_random_uuid(), g, CASE WHEN g % 2 = 0 THEN 'n' END FROM generate_series(1, 300) g`)
	client, prefix := dimmertest.Redis(t)
	var newer string
	// Not the row checked below (amount 2): the ids are random.
	require.NoError(t, e.pool.QueryRow(tctx(t), `SELECT id::text FROM old_orders WHERE amount = 300`).Scan(&newer))
	require.NoError(t, client.HSet(tctx(t), prefix+"order:"+newer, "version", "9", "amount", "dual").Err())
	sink, err := backfill.NewRedisSink(client, "order:{id}", func(r backfill.Row) string {
		return prefix + "order:" + backfill.RedisValue(r["id"])
	})
	require.NoError(t, err)
	j := ordersJob("to-redis")
	j.Sink = sink
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, int64(300), res.Rows)
	keys, err := client.Keys(tctx(t), prefix+"order:*").Result()
	require.NoError(t, err)
	assert.Len(t, keys, 300)
	var id string
	require.NoError(t, e.pool.QueryRow(tctx(t), `SELECT id::text FROM old_orders WHERE amount = 2`).Scan(&id))
	h, err := client.HGetAll(tctx(t), prefix+"order:"+id).Result()
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"id": id, "amount": "2", "note": "n", "version": "1"}, h)
	assert.Equal(t, "dual", client.HGet(tctx(t), prefix+"order:"+newer, "amount").Val(), "a newer version is not overwritten")

	// Read back: the one newer hash is its own category, the rest equal.
	opts := backfill.VerifyOptions{ChunkRows: 64, RecheckDelay: time.Millisecond}
	v, err := e.bf.Verify(tctx(t), j, opts)
	require.NoError(t, err)
	assert.False(t, v.OK)
	assert.Equal(t, int64(300), v.RowsSource)
	assert.Equal(t, int64(300), v.RowsTarget)
	assert.Equal(t, int64(1), v.NewerInTarget)
	assert.Zero(t, v.DifferingKeys)

	// Damage: a changed field, a field gone, a NULL that became a value, a
	// lost hash; and a source row deleted whose hash stays.
	var ids []string
	rows, err := e.pool.Query(tctx(t), `SELECT id::text FROM old_orders WHERE amount BETWEEN 10 AND 14 ORDER BY amount`)
	require.NoError(t, err)
	ids, err = pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	key := func(i int) string { return prefix + "order:" + ids[i] }
	require.NoError(t, client.HSet(tctx(t), key(0), "amount", "1000").Err())
	// Even amounts have note 'n', odd ones NULL (no field).
	require.NoError(t, client.HSet(tctx(t), key(1), "note", "").Err())
	require.NoError(t, client.HDel(tctx(t), key(2), "note").Err())
	require.NoError(t, client.HSet(tctx(t), key(3), "note", "null").Err())
	require.NoError(t, client.Del(tctx(t), key(4)).Err())
	opts.OverwriteNewer = false
	v, err = e.bf.Verify(tctx(t), j, opts)
	require.NoError(t, err)
	assert.False(t, v.OK)
	assert.Equal(t, int64(5), v.DifferingKeys, "%+v", v.Ranges)
	assert.Equal(t, int64(299), v.RowsTarget)

	// Repair writes them again; OverwriteNewer replaces the newer hash.
	opts.Repair, opts.OverwriteNewer = true, true
	v, err = e.bf.Verify(tctx(t), j, opts)
	require.NoError(t, err)
	assert.True(t, v.OK, "%v", v.Problems)
	assert.Equal(t, "300", client.HGet(tctx(t), prefix+"order:"+newer, "amount").Val())
	v, err = e.bf.Verify(tctx(t), j, backfill.VerifyOptions{ChunkRows: 64})
	require.NoError(t, err)
	assert.True(t, v.OK, "%v", v.Problems)
	assert.Equal(t, int64(300), v.RowsTarget)

	// The guard passes on an honest verification.
	ctl, err := flags.NewController(e.store, flags.WithGuards(e.bf.Guard()))
	require.NoError(t, err)
	st, err := ctl.Advance(tctx(t), "orders", "test", "verified in redis")
	require.NoError(t, err)
	assert.Equal(t, flags.Shadow, st.Stage)

	_, err = e.bf.Verify(tctx(t), j, backfill.VerifyOptions{Checks: []backfill.BusinessCheck{{Name: "x", SourceSQL: "SELECT 1", TargetSQL: "SELECT 1"}}})
	require.ErrorIs(t, err, backfill.ErrNotVerifiable)
}

func TestDryRunWritesNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "tenant int, id bigint", "tenant, id", `(tenant, id, amount) SELECT g % 3, g, g FROM generate_series(-100, 899) g`)
	j := ordersJob("dry")
	j.Spec.Key = []string{"tenant", "id"}
	j.Spec.Exprs = map[string]string{"note": "'t' || tenant"}
	j.Config.Ranges = 4
	p, err := e.bf.DryRun(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, []string{"2", "899"}, p.UpperBound)
	assert.Equal(t, int64(1000), p.EstimatedRows)
	require.Len(t, p.Ranges, 4)
	assert.Nil(t, p.Ranges[0].Lo)
	assert.Equal(t, p.Ranges[0].Hi, p.Ranges[1].Lo)
	require.Len(t, p.Sample, 5)
	assert.Equal(t, "t-2", p.Sample[0]["note"], "the lowest tenant first: -2 (from -98 % 3)")
	assert.Contains(t, p.CopySQL, "ON CONFLICT")
	assert.False(t, p.Stored)
	assert.Zero(t, count(t, e.pool, `SELECT count(*) FROM new_orders`))
	assert.Zero(t, count(t, e.pool, `SELECT count(*) FROM `+e.schema+`.backfill_jobs`))
}

func TestSignalsHoldTheJob(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id) SELECT generate_series(1, 500)`)
	j := ordersJob("held")
	holds := 0
	j.Config.Signals = []backfill.Signal{
		backfill.ReplicationLag(e.pool, time.Second), // no replica here: never holds
		backfill.SignalFunc("busy", func(context.Context) (time.Duration, string, error) {
			if holds < 3 {
				holds++
				return 20 * time.Millisecond, fmt.Sprintf("busy %d", holds), nil
			}
			return 0, "", nil
		}),
	}
	var seen []string
	j.Config.Progress = func(p backfill.Progress) {
		if p.Held != "" {
			seen = append(seen, p.Held)
		}
	}
	_, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	require.GreaterOrEqual(t, len(seen), 4)
	assert.Equal(t, []string{"busy: busy 1", "busy: busy 2", "busy: busy 3"}, seen[:3])
	// Three holds cut the duty cycle from its slow start (1/8) to its floor
	// (1/32): the chunks after rest in proportion, the share growing by 1/16
	// per second without a hold.
	assert.Equal(t, "duty cycle 3% (signals)", seen[3])
	prev := 0
	for _, h := range seen[3:] {
		var pct int
		_, err := fmt.Sscanf(h, "duty cycle %d%% (signals)", &pct)
		require.NoError(t, err, h)
		assert.GreaterOrEqual(t, pct, prev, "the share grows back")
		prev = pct
	}
	assert.Zero(t, e.diff(t))
	_, err = e.bf.Run(tctx(t), backfill.Job{Name: "x", Migration: "orders"})
	var fe *backfill.FieldError
	require.ErrorAs(t, err, &fe)
	assert.Equal(t, "Spec.Source.Name", fe.Field)
}

// Infinite dates and timestamps are copied to another database (through
// COPY into a staging table) as they are, not refused by the encoder.
func TestOtherDatabaseInfiniteTimes(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const ddl = `CREATE TABLE times (id int PRIMARY KEY, tz timestamptz, ts timestamp, d date, version bigint NOT NULL)`
	exec(t, e.pool, ddl)
	exec(t, e.pool, `INSERT INTO times VALUES (1, 'infinity', 'infinity', 'infinity', 1), (2, '-infinity', '-infinity', '-infinity', 1),
	(3, '2026-12-05 06:01:02.123456+00', '2026-12-05 06:01:02', '1999-12-31', 1), (4, NULL, NULL, NULL, 1)`)
	other := dimmertest.Pool(t, dimmertest.Database(t))
	exec(t, other, ddl)
	sink, err := backfill.NewPGSink(other, backfill.Table{Name: "times"})
	require.NoError(t, err)
	j := ordersJob("times")
	j.Sink = sink
	j.Spec.Source, j.Spec.Target = backfill.Table{Name: "times"}, backfill.Table{Name: "times"}
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, int64(4), res.Rows)
	dump := `SELECT string_agg(format('%s %s %s %s', id, tz AT TIME ZONE 'UTC', ts, d), '; ' ORDER BY id) FROM times`
	var want, got string
	require.NoError(t, e.pool.QueryRow(tctx(t), dump).Scan(&want))
	require.NoError(t, other.QueryRow(tctx(t), dump).Scan(&got))
	assert.Equal(t, want, got)
	v, err := e.bf.Verify(tctx(t), j, backfill.VerifyOptions{})
	require.NoError(t, err)
	assert.True(t, v.OK, "%v", v.Problems)
}
