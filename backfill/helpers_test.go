package backfill_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

func tctx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func exec(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	_, err := pool.Exec(tctx(t), sql, args...)
	require.NoError(t, err, sql)
}

type env struct {
	pool   *pgxpool.Pool
	schema string
	store  *pgflags.Store
	bf     *backfill.Backfiller
	// load is the pool of a service's load in the benchmarks (its own
	// connections, as a service's pool would be).
	load *pgxpool.Pool
	// rows in old_orders in the benchmarks (ids 1…rows).
	rows int
}

// newEnv gives a test its own schema holding the tables, the flag store
// (the migration "orders" set to dualwrite) and the backfill tables.
func newEnv(t testing.TB, opts ...backfill.Option) *env {
	t.Helper()
	pool, schema := dimmertest.Schema(t)
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, store.Install(tctx(t)))
	ctl, err := flags.NewController(store)
	require.NoError(t, err)
	_, err = ctl.Set(tctx(t), flags.Request{Migration: "orders", Stage: flags.DualWrite, Actor: "test", Reason: "backfill"})
	require.NoError(t, err)
	bf, err := backfill.New(pool, append([]backfill.Option{backfill.WithSchema(schema), backfill.WithFlagStore(store)}, opts...)...)
	require.NoError(t, err)
	require.NoError(t, bf.Install(tctx(t)))
	return &env{pool: pool, schema: schema, store: store, bf: bf}
}

// ordersTables creates old and new tables keyed by keyDDL with n rows.
func (e *env) orders(t testing.TB, keyDDL, pk, gen string) {
	t.Helper()
	exec(t, e.pool, `CREATE TABLE old_orders (`+keyDDL+`, amount numeric, note text, version bigint NOT NULL DEFAULT 1, PRIMARY KEY (`+pk+`))`)
	exec(t, e.pool, `CREATE TABLE new_orders (`+keyDDL+`, amount numeric, note text, version bigint NOT NULL DEFAULT 1, PRIMARY KEY (`+pk+`))`)
	exec(t, e.pool, `INSERT INTO old_orders `+gen)
}

// diff counts rows present on one side only (NULL-safe, by whole row).
func (e *env) diff(t testing.TB) int {
	t.Helper()
	var n int
	require.NoError(t, e.pool.QueryRow(tctx(t), `SELECT (SELECT count(*) FROM (SELECT * FROM old_orders EXCEPT ALL SELECT * FROM new_orders) a)
	+ (SELECT count(*) FROM (SELECT * FROM new_orders EXCEPT ALL SELECT * FROM old_orders) b)`).Scan(&n))
	return n
}

func count(t testing.TB, pool *pgxpool.Pool, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	require.NoError(t, pool.QueryRow(tctx(t), sql, args...).Scan(&n), sql)
	return n
}

func ordersJob(name string) backfill.Job {
	return backfill.Job{
		Name: name, Migration: "orders",
		Spec: backfill.Spec{
			Source: backfill.Table{Name: "old_orders"}, Target: backfill.Table{Name: "new_orders"},
			Key: []string{"id"}, VersionColumn: "version",
		},
		Config: backfill.Config{InitialChunk: 50, MinChunk: 10, MaxChunk: 200, PollInterval: 50 * time.Millisecond},
	}
}

// stopAfterFirstChunk runs j until its first chunk is copied and stops it
// there, as an interrupted run leaves a job: stored, partly copied, its
// ranges released.
func (e *env) stopAfterFirstChunk(t *testing.T, j backfill.Job) {
	t.Helper()
	ctx, cancel := context.WithCancel(tctx(t))
	defer cancel()
	j.Config.Progress = func(p backfill.Progress) {
		if p.RowsDone > 0 {
			cancel()
		}
	}
	_, err := e.bf.Run(ctx, j)
	require.ErrorIs(t, err, context.Canceled)
}
