package backfill_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
)

// The fast path inserts the rows the target lacks with a plain INSERT and
// upserts only those it holds. A dual write landing in the chunk's range
// while the plain INSERT runs makes it fail; the chunk is then redone by
// the version-guarded upsert, and nothing newer is overwritten.
func TestPlainInsertFallsBackOnDualWrite(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount, note) SELECT g, g, 'n' || g FROM generate_series(1, 2000) g`)
	// Rows dual-written before the backfill, newer than old's, in the middle
	// of chunks: they go through the upsert and keep their version.
	exec(t, e.pool, `INSERT INTO new_orders (id, amount, note, version) VALUES (150, -1, 'dual', 9), (1000, -1, 'dual', 9),
	(1001, -1, 'dual', 9), (1777, -1, 'dual', 9)`)
	// The backfill's inserts wait at a gate (an advisory lock the test holds)
	// so a concurrent dual write can land in the chunk being copied.
	var gate int64 = 917_331_007
	exec(t, e.pool, `CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	IF NEW.note IS DISTINCT FROM 'dual' THEN PERFORM pg_advisory_xact_lock_shared(`+strconv.FormatInt(gate, 10)+`); END IF;
	RETURN NEW;
END $$;
CREATE TRIGGER gate BEFORE INSERT ON new_orders FOR EACH ROW EXECUTE FUNCTION gate();`)
	locker, err := e.pool.Acquire(tctx(t))
	require.NoError(t, err)
	defer locker.Release()
	_, err = locker.Exec(tctx(t), `SELECT pg_advisory_lock($1)`, gate)
	require.NoError(t, err)
	unlocked := false
	defer func() {
		if !unlocked {
			_, _ = locker.Exec(context.Background(), `SELECT pg_advisory_unlock($1)`, gate)
		}
	}()

	j := ordersJob("plain")
	j.Config.Workers, j.Config.Ranges = 1, 1
	j.Config.InitialChunk, j.Config.MinChunk, j.Config.MaxChunk = 100, 100, 100
	type out struct {
		res backfill.Result
		err error
	}
	done := make(chan out, 1)
	go func() {
		res, err := e.bf.Run(tctx(t), j)
		done <- out{res, err}
	}()
	require.Eventually(t, func() bool {
		return count(t, e.pool, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1 AND NOT granted`, gate) > 0
	}, 20*time.Second, 5*time.Millisecond, "the first chunk's insert reaches the gate")
	// The first chunk is (nothing, 100]: a dual write lands in it, committed
	// before the chunk's insert gets there.
	exec(t, e.pool, `INSERT INTO new_orders (id, amount, note, version) VALUES (50, -1, 'dual', 7)`)
	_, err = locker.Exec(tctx(t), `SELECT pg_advisory_unlock($1)`, gate)
	require.NoError(t, err)
	unlocked = true

	o := <-done
	require.NoError(t, o.err)
	assert.Equal(t, int64(2000), o.res.Rows)
	assert.Equal(t, int64(1), o.res.Fallbacks, "the first chunk's plain insert met the dual write and was redone by the upsert")
	assert.Equal(t, int64(2000), count(t, e.pool, `SELECT count(*) FROM new_orders`))
	assert.Equal(t, int64(5), count(t, e.pool, `SELECT count(*) FROM new_orders WHERE note = 'dual' AND amount = -1 AND id IN (50, 150, 1000, 1001, 1777)`),
		"no newer row overwritten")
	assert.Equal(t, int64(1995), count(t, e.pool, `SELECT count(*) FROM new_orders n JOIN old_orders o USING (id)
WHERE (n.amount, n.note, n.version) IS NOT DISTINCT FROM (o.amount, o.note, o.version)`), "every other row copied")
}

// Rows of old whose older copy is already in new (the target holds them at
// a lower version) are brought up to date by the upsert half of a chunk;
// with a composite key too.
func TestPlainInsertUpdatesOlderRows(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, keyDDL, pk, gen, stale string
		key                          []string
	}{
		{"bigint", "id bigint", "id", `(id, amount, note, version) SELECT g, g, 'n' || g, 3 FROM generate_series(-500, 499) g`,
			`INSERT INTO new_orders (id, amount, note, version) SELECT g, 0, 'stale', 2 FROM generate_series(-500, 499, 37) g`, []string{"id"}},
		{"composite", "tenant int, seq text", "tenant, seq",
			`(tenant, seq, amount, note, version) SELECT t, 's' || s, s, 'n', 3 FROM generate_series(-2, 2) t, generate_series(1, 200) s`,
			`INSERT INTO new_orders (tenant, seq, amount, note, version) SELECT t, 's' || s, 0, 'stale', 2 FROM generate_series(-2, 2) t, generate_series(1, 200, 29) s`,
			[]string{"tenant", "seq"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			e.orders(t, tc.keyDDL, tc.pk, tc.gen)
			exec(t, e.pool, tc.stale)
			j := ordersJob("older")
			j.Spec.Key = tc.key
			res, err := e.bf.Run(tctx(t), j)
			require.NoError(t, err)
			assert.Equal(t, int64(1000), res.Rows)
			assert.Zero(t, res.Fallbacks)
			assert.Zero(t, e.diff(t), "new equals old: stale copies replaced")
		})
	}
}
