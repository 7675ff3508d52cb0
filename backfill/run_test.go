package backfill_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
)

func TestKeyTypes(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, keyDDL, pk, gen string
		key                   []string
	}{
		{"int-negative-and-zero", "id bigint", "id",
			`(id, amount, note) SELECT g, g * 1.5, CASE WHEN g % 7 = 0 THEN NULL ELSE 'n' || g END FROM generate_series(-600, 400) g`, []string{"id"}},
		{"int-min-max", "id bigint", "id",
			`(id, amount) VALUES (-9223372036854775808, 1), (9223372036854775807, 2), (0, 3), (-1, 4)`, []string{"id"}},
		{"composite", "tenant int, seq text", "tenant, seq",
			`(tenant, seq, amount) SELECT t, 's' || s, s FROM generate_series(-3, 3) t, generate_series(1, 150) s`, []string{"tenant", "seq"}},
		{"text", "code text COLLATE \"en_US\"", "code",
			`(code, amount) SELECT md5(g::text) || CASE WHEN g % 3 = 0 THEN ' É' WHEN g % 3 = 1 THEN 'a,b"''' ELSE '' END, g FROM generate_series(1, 900) g`, []string{"code"}},
		{"uuid", "id uuid", "id",
			`(id, amount) SELECT gen_random_uuid(), g FROM generate_series(1, 900) g`, []string{"id"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			if tc.name == "text" {
				// en_US may be missing on a minimal server: C collation is still text.
				if _, err := e.pool.Exec(tctx(t), `SELECT 'a' COLLATE "en_US"`); err != nil {
					tc.keyDDL = "code text"
				}
			}
			e.orders(t, tc.keyDDL, tc.pk, tc.gen)
			j := ordersJob("copy")
			j.Spec.Key = tc.key
			j.Config.Workers, j.Config.Ranges = 3, 5
			res, err := e.bf.Run(tctx(t), j)
			require.NoError(t, err)
			want := count(t, e.pool, `SELECT count(*) FROM old_orders`)
			assert.Equal(t, want, res.Rows, "every source row copied once")
			assert.Zero(t, e.diff(t), "new equals old")
			assert.Equal(t, want, count(t, e.pool, `SELECT sum(rows_done)::int8 FROM `+e.schema+`.backfill_ranges`))

			again, err := e.bf.Run(tctx(t), j)
			require.NoError(t, err)
			assert.True(t, again.AlreadyDone)
		})
	}
}

func TestDefinitionChangedRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id) SELECT generate_series(1, 100)`)
	j := ordersJob("copy")
	e.stopAfterFirstChunk(t, j)

	j.Spec.Exprs = map[string]string{"note": "upper(note)"}
	_, err := e.bf.Run(tctx(t), j)
	require.ErrorIs(t, err, backfill.ErrDefinitionChanged)
	var dc *backfill.DefinitionChangedError
	require.True(t, errors.As(err, &dc))
	assert.Contains(t, err.Error(), `job "copy" was started with another definition`)
	assert.Contains(t, dc.GivenSpec, "upper(note)")

	j.Spec.Exprs = nil
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err, "the original definition resumes")
	assert.Less(t, res.Rows, int64(100), "resumed, not restarted")
	assert.Zero(t, e.diff(t))
}

// A target the copy cannot write correctly is refused before anything is
// copied, by the field at fault: no unique index on the key (the upsert
// needs one; a redone chunk would duplicate rows), a column only the server
// may set, a version column the source lacks.
func TestTargetRefusedUpFront(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	exec(t, e.pool, `CREATE TABLE src (id bigint PRIMARY KEY, n int, version bigint NOT NULL DEFAULT 1);
INSERT INTO src (id, n) SELECT g, g FROM generate_series(1, 10) g;
CREATE TABLE no_key (id bigint, n int, version bigint);
CREATE TABLE partial_key (id bigint, n int, version bigint);
CREATE UNIQUE INDEX ON partial_key (id) WHERE n > 0;
CREATE TABLE wider_key (id bigint, n int, version bigint, PRIMARY KEY (id, n));
CREATE TABLE identity_always (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, n int, version bigint);
CREATE TABLE generated_col (id bigint PRIMARY KEY, n int, version bigint, twice int GENERATED ALWAYS AS (n * 2) STORED);
CREATE TABLE fine (id bigint, n int, version bigint, UNIQUE (id) INCLUDE (n))`)
	job := func(target string) backfill.Job {
		return backfill.Job{Name: "to_" + target, Migration: "orders", Spec: backfill.Spec{
			Source: backfill.Table{Name: "src"}, Target: backfill.Table{Name: target}, Key: []string{"id"}, VersionColumn: "version"}}
	}
	for target, want := range map[string]string{
		"no_key":          "invalid Spec.Key: the target no_key has no unique index or primary key on exactly (id)",
		"partial_key":     "no unique index or primary key on exactly (id)",
		"wider_key":       "no unique index or primary key on exactly (id)",
		"identity_always": "invalid Spec.Columns: the target identity_always sets id itself (GENERATED ALWAYS)",
	} {
		_, err := e.bf.Run(tctx(t), job(target))
		require.ErrorIs(t, err, backfill.ErrInvalidJob, target)
		assert.ErrorContains(t, err, want, target)
		assert.Zero(t, count(t, e.pool, `SELECT count(*) FROM `+target), "%s: nothing copied", target)
	}
	j := job("generated_col")
	j.Spec.Columns = []string{"id", "n", "version", "twice"}
	j.Spec.Exprs = map[string]string{"twice": "n * 2"}
	_, err := e.bf.Run(tctx(t), j)
	assert.ErrorContains(t, err, "sets twice itself")
	j.Spec.Columns, j.Spec.Exprs = []string{"id", "n", "version"}, nil
	_, err = e.bf.Run(tctx(t), j)
	require.NoError(t, err, "generated columns left out are computed by the target")

	exec(t, e.pool, `CREATE TABLE nullable_src (id bigint, n int, version bigint NOT NULL DEFAULT 1);
INSERT INTO nullable_src (id, n) VALUES (1, 1), (NULL, 2)`)
	j = job("fine")
	j.Spec.Source = backfill.Table{Name: "nullable_src"}
	_, err = e.bf.Run(tctx(t), j)
	require.ErrorIs(t, err, backfill.ErrInvalidJob)
	assert.ErrorContains(t, err, `invalid Spec.Key: column "id" of nullable_src holds NULL`)

	j = job("fine")
	j.Spec.VersionColumn = "vers"
	_, err = e.bf.Run(tctx(t), j)
	assert.ErrorContains(t, err, `invalid Spec.VersionColumn: column "vers" is not in src`)
	_, err = e.bf.Run(tctx(t), job("fine"))
	require.NoError(t, err, "a unique constraint with included columns is keyed by id alone")
	assert.Equal(t, int64(10), count(t, e.pool, `SELECT count(*) FROM fine`))
}

// TestInPlaceFill fills a new column of the source table itself (Target =
// Source) while single-row updates keep landing: every row gets its value,
// a row updated meanwhile keeps its update, and chunks stay within the lock
// time.
func TestInPlaceFill(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount) SELECT g, g FROM generate_series(1, 3000) g`)
	exec(t, e.pool, `ALTER TABLE old_orders ADD COLUMN cents bigint`)
	j := backfill.Job{Name: "in-place", Migration: "orders",
		Spec: backfill.Spec{Source: backfill.Table{Name: "old_orders"}, Target: backfill.Table{Name: "old_orders"}, Key: []string{"id"},
			VersionColumn: "version", Exprs: map[string]string{"cents": "(amount * 100)::bigint"}},
		Config: backfill.Config{Ranges: 1, InitialChunk: 1000, LockTime: 2 * time.Millisecond, TargetChunkTime: time.Second}}
	// A dual write (the service's own update, version bumped, its value
	// computed by the service) during the fill is never overwritten.
	exec(t, e.pool, `UPDATE old_orders SET amount = 7, cents = 700, version = 2 WHERE id = 2500`)
	p, err := e.bf.DryRun(tctx(t), j)
	require.NoError(t, err)
	assert.True(t, strings.HasPrefix(p.CopySQL, `UPDATE "old_orders" SET "cents" = ((amount * 100)::bigint) WHERE`), "an in-place chunk is one UPDATE: %s", p.CopySQL)
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, int64(3000), res.Rows)
	assert.Zero(t, count(t, e.pool, `SELECT count(*) FROM old_orders WHERE cents IS DISTINCT FROM (amount * 100)::bigint`))
	assert.Equal(t, int64(2), count(t, e.pool, `SELECT version FROM old_orders WHERE id = 2500`))
	// At a 1s chunk time the sizer would double to 2000 rows: two chunks.
	// Bounded by 2ms, the first 1,000-row UPDATE (over 1ms even on an idle
	// machine) shrinks the next chunk below 2,000: three chunks or more.
	// (At 20ms an idle machine updated 1,000 rows in under 10ms, and the
	// lock-time rule itself allowed doubling.)
	assert.GreaterOrEqual(t, res.Chunks, int64(3), "chunks bounded by the lock time, not by TargetChunkTime")
}

// An in-place chunk holds its rows against the service's writes, so the
// share of writes that wait is the chunk's share of the table: it stays
// under 0.5% of the table however fast the fill runs.
func TestInPlaceChunkShareOfTable(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount) SELECT g, g FROM generate_series(1, 100000) g`)
	exec(t, e.pool, `ALTER TABLE old_orders ADD COLUMN cents bigint`)
	exec(t, e.pool, `ANALYZE old_orders`)
	// Neither the chunk time nor the lock time binds: without the share,
	// chunks double from 1,000 rows toward MaxChunk, a handful in all.
	j := backfill.Job{Name: "in-place-share", Migration: "orders",
		Spec: backfill.Spec{Source: backfill.Table{Name: "old_orders"}, Target: backfill.Table{Name: "old_orders"}, Key: []string{"id"},
			VersionColumn: "version", Exprs: map[string]string{"cents": "(amount * 100)::bigint"}},
		Config: backfill.Config{Ranges: 1, LockTime: time.Minute, TargetChunkTime: time.Minute}}
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, int64(100000), res.Rows)
	assert.Zero(t, count(t, e.pool, `SELECT count(*) FROM old_orders WHERE cents IS DISTINCT FROM (amount * 100)::bigint`))
	assert.GreaterOrEqual(t, res.Chunks, int64(100000/500), "an in-place chunk took more than 0.5% of the table")
}

// Status shows a lease as held only while its holder lives: a lease row
// whose holder's session is gone (killed) and that no chunk renewed lately
// is free to be retaken, and is not reported as a running worker.
func TestStatusLeasesOfLiveHoldersOnly(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id) SELECT generate_series(1, 100)`)
	e.stopAfterFirstChunk(t, ordersJob("leases"))
	// A holder that died an hour into its lease, its last chunk a minute ago.
	exec(t, e.pool, `UPDATE `+e.schema+`.backfill_ranges SET owner = 'ghost', lease_until = now() + interval '1 hour',
	updated_at = now() - interval '1 minute' WHERE job = 'leases' AND id = 0 AND NOT done`)
	st, err := e.bf.Status(tctx(t), "leases")
	require.NoError(t, err)
	assert.Empty(t, st.Leases, "a dead holder's lease is not shown as held")

	// The same lease while its holder's session holds the range's lock.
	conn, err := e.pool.Acquire(tctx(t))
	require.NoError(t, err)
	defer conn.Release()
	_, err = conn.Exec(tctx(t), `SELECT pg_advisory_lock(hashtextextended($1, 0))`, "dimmer.backfill.range/"+e.schema+"/leases/0")
	require.NoError(t, err)
	defer conn.Exec(context.Background(), `SELECT pg_advisory_unlock_all()`)
	st, err = e.bf.Status(tctx(t), "leases")
	require.NoError(t, err)
	require.Len(t, st.Leases, 1)
	assert.Equal(t, "ghost", st.Leases[0].Owner)
}
