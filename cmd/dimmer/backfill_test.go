package main

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

func TestCLIBackfill(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, schema := dimmertest.Schema(t)
	pg, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, pg.Install(ctx))
	_, err = pool.Exec(ctx, `CREATE TABLE old_orders (id bigint PRIMARY KEY, amount numeric, version bigint NOT NULL DEFAULT 1);
CREATE TABLE new_orders (LIKE old_orders INCLUDING ALL);
INSERT INTO old_orders (id, amount) SELECT g, g FROM generate_series(-99, 400) g`)
	require.NoError(t, err)
	store := []string{"--store", dimmertest.PostgresURL(), "--schema", schema, "backfill", "--backfill-schema", schema}
	def := []string{"--migration", "orders", "--source", schema + ".old_orders", "--target", schema + ".new_orders", "--key", "id", "--version-column", "version"}

	r := dimmer(t, store, "run", "copy")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "job copy is not stored: define it with --migration")

	r = dimmer(t, store, append([]string{"run", "copy"}, def...)...)
	assert.Equal(t, exitError, r.code, "the migration is off")
	assert.Contains(t, r.stderr, "orders is off; run the backfill in dualwrite")
	ctl, err := flags.NewController(pg)
	require.NoError(t, err)
	_, err = ctl.Set(ctx, flags.Request{Migration: "orders", Stage: flags.DualWrite, Actor: "t", Reason: "go"})
	require.NoError(t, err)

	r = dimmer(t, store, append([]string{"run", "copy", "--dry-run"}, def...)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "would copy ~500 rows up to key [400]")
	var n int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM new_orders`).Scan(&n))
	assert.Zero(t, n, "a dry run writes nothing")

	r = dimmer(t, store, append([]string{"run", "copy", "--workers", "2"}, def...)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "copy: 500/~500 rows (100.0%)")
	assert.Contains(t, r.stdout, "copy: done, 500 rows")

	r = dimmer(t, store, "run", "copy")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "copy: already done at epoch 0\n", r.stdout)

	r = dimmer(t, store, "status")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "copy\torders\tdone\t500/~500 rows\tverified: never\n", r.stdout)

	_, err = pool.Exec(ctx, `UPDATE new_orders SET amount = NULL WHERE id = 0`)
	require.NoError(t, err)
	r = dimmer(t, store, "verify", "copy", "--chunk-rows", "100")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stdout, "differing: 1 ranges / 1 keys, repaired: 0, keys with a write in flight: 0")
	assert.Contains(t, r.stdout, "differing keys: 1 [[0]], repaired: false")
	assert.Contains(t, r.stderr, "copy differs: 1 of 6 ranges differ")
	r = dimmer(t, store, "verify", "copy", "--repair")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "copy: verified at epoch 0")

	r = dimmer(t, store, "status", "copy")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "job copy (migration orders, epoch 0): done")
	assert.Contains(t, r.stdout, schema+".old_orders -> "+schema+".new_orders, key id, version version")
	assert.Contains(t, r.stdout, "rows 500 of ~500, ranges 32/32 done")
	assert.Contains(t, r.stdout, "verified: ok at epoch 0")

	r = dimmer(t, store, "pause", "nope", "--reason", "x")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, `unknown job: "nope"`)
	r = dimmer(t, store, "pause", "copy")
	assert.Equal(t, exitUsage, r.code)
	r = dimmer(t, store, "pause", "copy", "--reason", "peak")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "copy: paused\n", r.stdout)
	r = dimmer(t, store, "resume", "copy")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "copy: resumed\n", r.stdout)
}
