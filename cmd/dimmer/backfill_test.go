package main

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// flagStore gives a test a schema of its own holding a Postgres flag store.
func flagStore(t *testing.T) (*pgxpool.Pool, string, *pgflags.Store) {
	t.Helper()
	pool, schema := dimmertest.Schema(t)
	pg, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, pg.Install(context.Background()))
	return pool, schema, pg
}

func TestCLIBackfill(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, schema, pg := flagStore(t)
	_, err := pool.Exec(ctx, `CREATE TABLE old_orders (id bigint PRIMARY KEY, amount numeric, version bigint NOT NULL DEFAULT 1);
CREATE TABLE new_orders (LIKE old_orders INCLUDING ALL);
INSERT INTO old_orders (id, amount) SELECT g, g FROM generate_series(-99, 400) g`)
	require.NoError(t, err)
	store := []string{"--store", dimmertest.PostgresURL(), "--schema", schema, "backfill", "--backfill-schema", schema}
	def := []string{"--migration", "orders", "--source", schema + ".old_orders", "--target", schema + ".new_orders", "--key", "id", "--version-column", "version"}

	r := dimmer(t, store, "run", "copy")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "job copy is not stored: define it with --migration")

	noStore := []string{"--store", "", "backfill", "--db", dimmertest.PostgresURL(), "--backfill-schema", schema}
	r = dimmer(t, noStore, append([]string{"run", "copy"}, def...)...)
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "no store: a backfill reads its migration's stage and epoch from the flag store")

	r = dimmer(t, store, append([]string{"run", "copy"}, def...)...)
	assert.Equal(t, exitRefused, r.code, "the migration is off")
	assert.Contains(t, r.stderr, "orders is off; run the backfill in dualwrite")
	r = dimmer(t, store, append([]string{"run", "copy", "--dry-run"}, def...)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Regexp(t, `a run would be refused now: .*orders is off; run the backfill in dualwrite`, r.stdout)
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

	_, err = pool.Exec(ctx, `UPDATE new_orders SET amount = -1, version = 2 WHERE id = 3`)
	require.NoError(t, err)
	r = dimmer(t, store, "verify", "copy", "--repair")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stdout, "keys newer in the target: 1")
	assert.Contains(t, r.stdout, "repaired: false, newer in the target: 1 [[3]]")
	assert.Contains(t, r.stderr, "1 keys are newer in the target than in the source (such as (3))")
	r = dimmer(t, store, "verify", "copy", "--repair", "--overwrite-newer")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "copy: verified at epoch 0")
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM new_orders WHERE id = 3 AND amount = 3 AND version = 1`).Scan(&n))
	assert.Equal(t, 1, n, "old's row copied over the newer one")

	r = dimmer(t, store, "status", "copy")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "job copy (migration orders, epoch 0): done")
	assert.Contains(t, r.stdout, schema+".old_orders -> "+schema+".new_orders, key id, version version")
	assert.Contains(t, r.stdout, "rows 500 of ~500, ranges 2/2 done", "a range per 100,000 rows, at least one per worker")
	assert.Contains(t, r.stdout, "verified: ok at epoch 0")

	r = dimmer(t, store, "pause", "nope", "--reason", "x")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, `unknown job: "nope"`)
	for _, args := range [][]string{{"status", "nope"}, {"verify", "nope"}, {"run", "nope", "--workers", "-1"}} {
		r = dimmer(t, store, args...)
		assert.Equal(t, exitUsage, r.code, "%v: %s", args, r.stderr)
	}
	r = dimmer(t, store, append([]string{"run", "copy2", "--workers", "-1"}, def...)...)
	assert.Equal(t, exitUsage, r.code, r.stderr)
	assert.Contains(t, r.stderr, "--workers: -1 is negative")
	r = dimmer(t, store, "pause", "copy")
	assert.Equal(t, exitUsage, r.code)
	r = dimmer(t, store, "pause", "copy", "--reason", "peak")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "copy: paused\n", r.stdout)
	r = dimmer(t, store, "resume", "copy")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "copy: resumed\n", r.stdout)
}

// TestCLIBackfillResumesAsStarted: the command that started a job, run
// again after the job was interrupted, resumes it; a different definition
// under the same name is refused. The lease and locking flags reach the job.
func TestCLIBackfillResumesAsStarted(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, schema, pg := flagStore(t)
	ctl, err := flags.NewController(pg)
	require.NoError(t, err)
	_, err = ctl.Set(ctx, flags.Request{Migration: "orders", Stage: flags.DualWrite, Actor: "t", Reason: "go"})
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `CREATE TABLE old_orders (id bigint PRIMARY KEY, amount numeric, version bigint NOT NULL DEFAULT 1);
CREATE TABLE new_orders (LIKE old_orders INCLUDING ALL);
INSERT INTO old_orders (id, amount) SELECT g, g FROM generate_series(1, 2000) g`)
	require.NoError(t, err)
	store := []string{"--store", dimmertest.PostgresURL(), "--schema", schema, "backfill", "--backfill-schema", schema}
	def := []string{"--migration", "orders", "--source", schema + ".old_orders", "--target", schema + ".new_orders", "--key", "id", "--version-column", "version"}
	rowsDone := func() int64 {
		var n int64
		require.NoError(t, pool.QueryRow(ctx, `SELECT coalesce(sum(rows_done), 0)::int8 FROM `+schema+`.backfill_ranges`).Scan(&n))
		return n
	}

	// Interrupted part way.
	runCtx, cancel := context.WithCancel(ctx)
	stopped := make(chan int, 1)
	var out, errOut bytes.Buffer
	go func() {
		stopped <- run(runCtx, append(append([]string{"--actor", "tester"}, store...),
			append([]string{"run", "copy", "--rows-per-second", "2000", "--worker-id", "cli-a", "--lease-ttl", "7s"}, def...)...), &out, &errOut)
	}()
	t.Cleanup(cancel)
	require.Eventually(t, func() bool {
		var n int64
		err := pool.QueryRow(ctx, `SELECT coalesce(sum(rows_done), 0)::int8 FROM `+schema+`.backfill_ranges`).Scan(&n)
		return err == nil && n >= 300 // the tables are installed by the run
	}, 20*time.Second, 5*time.Millisecond)
	var owner string
	var ttl float64
	require.NoError(t, pool.QueryRow(ctx, `SELECT owner, extract(epoch FROM lease_until - updated_at)::float8 FROM `+schema+
		`.backfill_ranges WHERE owner IS NOT NULL ORDER BY updated_at DESC LIMIT 1`).Scan(&owner, &ttl))
	assert.Equal(t, "cli-a/0", owner, "--worker-id names the lease")
	assert.InDelta(t, 7, ttl, 1.5, "--lease-ttl sets the lease")
	cancel()
	assert.NotEqual(t, exitOK, <-stopped)
	before := rowsDone()
	require.Less(t, before, int64(2000))

	// The same command again resumes.
	r := dimmer(t, store, append([]string{"run", "copy", "--lock-source-rows"}, def...)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "copy: done")
	assert.Equal(t, int64(2000), rowsDone(), "no row counted twice: resumed from the checkpoints")
	var n, locked int64
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM old_orders o JOIN new_orders n USING (id, amount, version)`).Scan(&n))
	assert.Equal(t, int64(2000), n)
	// FOR KEY SHARE leaves its locker's transaction id on the rows it locked.
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM old_orders WHERE xmax <> '0'`).Scan(&locked))
	assert.Equal(t, 2000-before, locked, "--lock-source-rows locked the rows the resumed run copied, and only those")

	// Another definition under the same name is refused, naming what changed.
	other := append([]string{"run", "copy"}, def...)
	other[len(other)-3] = "id,amount"
	r = dimmer(t, store, other...)
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "job copy is stored with another definition (--key id,amount, stored id)")
	r = dimmer(t, store, "run", "copy", "--source", schema+".old_orders")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "a definition needs all of")
}

// An interrupted run says how far it got and that running the same command
// again resumes it, which it does.
func TestCLIBackfillInterrupted(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, schema, pg := flagStore(t)
	flagstest.Set(t, pg, "orders", flags.DualWrite, nil)
	_, err := pool.Exec(ctx, `CREATE TABLE old_orders (id bigint PRIMARY KEY, version bigint NOT NULL DEFAULT 1);
CREATE TABLE new_orders (LIKE old_orders INCLUDING ALL);
INSERT INTO old_orders (id) SELECT generate_series(1, 2000)`)
	require.NoError(t, err)
	args := []string{"--actor", "tester", "--store", dimmertest.PostgresURL(), "--schema", schema, "backfill", "--backfill-schema", schema,
		"run", "slow", "--migration", "orders", "--source", schema + ".old_orders", "--target", schema + ".new_orders",
		"--key", "id", "--version-column", "version", "--rows-per-second", "1000"}
	// Interrupted once it has shown progress (not while it connects).
	rctx, cancel := context.WithCancel(ctx)
	progress := &cancelOnWrite{cancel: cancel}
	var out, errOut bytes.Buffer
	code := run(rctx, args, progress, &errOut)
	assert.Equal(t, exitError, code)
	assert.Regexp(t, `slow: interrupted at \d+ of ~2000 rows; run the same command again to resume from its checkpoints`, errOut.String())
	errOut.Reset()
	require.Equal(t, exitOK, run(ctx, append(slices.Clone(args), "--dry-run"), &out, &errOut), errOut.String())
	assert.Regexp(t, `would copy ~2000 rows up to key \[2000\] in 1 ranges, \d+ of them copied already \(a run resumes after them\)`, out.String())
	assert.NotContains(t, out.String(), "refused")
	out.Reset()
	require.Equal(t, exitOK, run(ctx, append(args[:len(args)-2], "--rows-per-second", "0"), &out, &errOut), errOut.String())
	assert.Contains(t, out.String(), "slow: done")
}

// cancelOnWrite cancels a run at its first line of output.
type cancelOnWrite struct {
	once   sync.Once
	cancel context.CancelFunc
}

func (w *cancelOnWrite) Write(p []byte) (int, error) {
	w.once.Do(w.cancel)
	return len(p), nil
}

// A hold and its end are printed at once, not on the next second's line.
func TestProgressLineShowsHoldAtOnce(t *testing.T) {
	var out bytes.Buffer
	l := &progressLine{out: &out}
	l.update(backfill.Progress{Job: "j", RowsDone: 1})
	l.update(backfill.Progress{Job: "j", RowsDone: 2})
	l.update(backfill.Progress{Job: "j", RowsDone: 2, Held: "paused: peak"})
	l.update(backfill.Progress{Job: "j", RowsDone: 2, Held: "paused: peak"})
	l.update(backfill.Progress{Job: "j", RowsDone: 3})
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, lines, 3, out.String())
	assert.Contains(t, lines[0], "j: 1/")
	assert.Contains(t, lines[1], "held: paused: peak")
	assert.Contains(t, lines[2], "j: 3/")
	assert.NotContains(t, lines[2], "held")
}

// A dry run's sample rows read as SQL values, not as Go structures.
func TestFormatRow(t *testing.T) {
	var n pgtype.Numeric
	require.NoError(t, n.Scan("1.25"))
	at := time.Date(2026, 12, 5, 10, 0, 0, 500, time.UTC)
	ref := [16]byte{0x01, 0x90, 0xf0, 0xa8, 0, 0, 0x70, 0, 0x80, 0, 0, 0, 0, 0, 0, 0x01}
	got := formatRow(backfill.Row{"amount": n, "blob": []byte{0xc4, 0xca}, "note": nil, "id": int64(7), "at": at, "name": "a \"b\"", "ref": ref})
	assert.Equal(t, `amount=1.25 at=2026-12-05T10:00:00.0000005Z blob=\xc4ca id=7 name="a \"b\"" note=NULL ref=0190f0a8-0000-7000-8000-000000000001`, got)
}

// Table names are read as SQL writes them.
func TestParseTable(t *testing.T) {
	for in, want := range map[string]backfill.Table{
		"orders":             {Name: "orders"},
		"app.orders":         {Schema: "app", Name: "orders"},
		`app."Orders"`:       {Schema: "app", Name: "Orders"},
		`"my.schema"."a""b"`: {Schema: "my.schema", Name: `a"b`},
	} {
		got, err := parseTable("--source", in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, in := range []string{"", "a.", ".b", "a.b.c", `"open`, `"a"b`} {
		_, err := parseTable("--source", in)
		assert.Error(t, err, in)
	}
}
