package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// TestSchemaCLI applies a plan a service registered, by name, through every
// command, with the guards' refusals as exit code 3.
func TestSchemaCLI(t *testing.T) {
	t.Parallel()
	ctx := flagstest.Context(t)
	pool, schema := dimmertest.Schema(t)
	fs, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, fs.Install(ctx))
	_, err = pool.Exec(ctx, `CREATE TABLE widgets (id int PRIMARY KEY, colour text)`)
	require.NoError(t, err)

	// What the service does at start-up: its pool's search_path is the
	// test schema, which the CLI's connection does not have.
	reg, err := expandcontract.NewRegistry(pool, expandcontract.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, reg.Install(ctx))
	plan := expandcontract.Plan{Name: "widgets-color", Migration: "widgets-color",
		Expand:   []expandcontract.Step{{Name: "add-color", SQL: `ALTER TABLE widgets ADD COLUMN IF NOT EXISTS color text`}},
		Contract: []expandcontract.Step{{Name: "drop-colour", SQL: `ALTER TABLE widgets DROP COLUMN IF EXISTS colour`}},
		Rollback: []expandcontract.Step{{Name: "drop-color", SQL: `ALTER TABLE widgets DROP COLUMN IF EXISTS color`}}}
	require.NoError(t, reg.Register(ctx, "service", plan))
	store := []string{"--store", dimmertest.PostgresURL(), "--schema", schema}
	columns := func() []string {
		var cols []string
		require.NoError(t, pool.QueryRow(ctx, `SELECT array_agg(column_name::text ORDER BY ordinal_position) FROM information_schema.columns
WHERE table_schema = $1 AND table_name = 'widgets'`, schema).Scan(&cols))
		return cols
	}

	r := dimmer(t, store, "schema", "status")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Regexp(t, `widgets-color\s+pending\s+-\s+0/2`, r.stdout)

	r = dimmer(t, store, "schema", "expand", "widgets-color", "--reason", "color column")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "widgets-color: pending -> expanded\n", r.stdout)
	assert.Equal(t, []string{"id", "colour", "color"}, columns())
	r = dimmer(t, store, "schema", "expand", "widgets-color")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "widgets-color: expanded (nothing to do)\n", r.stdout)

	r = dimmer(t, store, "schema", "contract", "widgets-color")
	assert.Equal(t, exitRefused, r.code, r.stdout)
	assert.Contains(t, r.stderr, "run migrate first")
	r = dimmer(t, store, "schema", "migrate", "widgets-color")
	require.Equal(t, exitOK, r.code, r.stderr)

	require.NoError(t, fs.Heartbeat(ctx, flags.Instance{ID: "api-1", Build: "v1", SeenAt: time.Now(),
		Attributes: expandcontract.Attributes(expandcontract.Range{Plan: plan.Name, Min: expandcontract.Pending, Max: expandcontract.Migrating})()}, time.Minute))
	flagstest.Set(t, fs, plan.Migration, flags.DualWrite, nil)
	r = dimmer(t, store, "schema", "status", "widgets-color")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "[FAIL] no-instance-needs-old-shape: 1 of 1 live instance(s) cannot run once widgets-color is contracted: api-1 (build v1) runs with pending..migrating")
	assert.Contains(t, r.stdout, "[FAIL] migration-complete: migration widgets-color is dualwrite")
	assert.Contains(t, r.stdout, "[PASS] backfill-verified")
	assert.Contains(t, r.stdout, "verdict: NO-GO for contract (2 check(s) failing)")
	r = dimmer(t, store, "schema", "contract", "widgets-color")
	assert.Equal(t, exitRefused, r.code)
	assert.Contains(t, r.stderr, "no-instance-needs-old-shape")
	assert.Contains(t, r.stderr, "migration-complete")
	assert.Contains(t, columns(), "colour")

	require.NoError(t, fs.Deregister(ctx, "api-1"))
	require.NoError(t, fs.Heartbeat(ctx, flags.Instance{ID: "api-2", Build: "v2", SeenAt: time.Now(),
		Attributes: expandcontract.Attributes(expandcontract.Range{Plan: plan.Name, Min: expandcontract.Expanded, Max: expandcontract.Contracted})()}, time.Minute))
	for _, s := range []flags.Stage{flags.Shadow, flags.Live, flags.RampDown, flags.Complete} {
		flagstest.Set(t, fs, plan.Migration, s, nil)
	}
	r = dimmer(t, store, "schema", "contract", "widgets-color", "--reason", "old build retired")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "widgets-color: migrating -> contracted\n", r.stdout)
	assert.Equal(t, []string{"id", "color"}, columns())

	r = dimmer(t, store, "schema", "rollback", "widgets-color", "--force", "--reason", "regret")
	assert.Equal(t, exitRefused, r.code)
	assert.Contains(t, r.stderr, "rollback is refused after contract")
	assert.NotContains(t, r.stderr, "transition -", "the refusal names the stages, not a placeholder")

	r = dimmer(t, store, "schema", "audit", "widgets-color")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Regexp(t, `(?s)applied\s+contract migrating -> contracted\s+by tester: old build retired.*refused\s+contract.*failed no-instance-needs-old-shape`, r.stdout)

	r = dimmer(t, store, "schema", "expand", "no-such-plan")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "unknown plan")
	r = dimmer(t, nil, "schema", "status")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "no database")
	r = dimmer(t, store, "schema", "contract", "widgets-color", "--force")
	assert.Equal(t, exitUsage, r.code)
}

// TestSchemaLockWaitBudget: a step behind a session that keeps its table
// locked retries with short attempts, names the holder on stderr as it
// goes, and gives up when --lock-wait-budget is spent, with nothing applied.
func TestSchemaLockWaitBudget(t *testing.T) {
	t.Parallel()
	ctx := flagstest.Context(t)
	pool, schema := dimmertest.Schema(t)
	_, err := pool.Exec(ctx, `CREATE TABLE gadgets (id int PRIMARY KEY)`)
	require.NoError(t, err)
	reg, err := expandcontract.NewRegistry(pool, expandcontract.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, reg.Install(ctx))
	plan := expandcontract.Plan{Name: "gadgets-size",
		Expand:   []expandcontract.Step{{Name: "add-size", SQL: `ALTER TABLE gadgets ADD COLUMN size int`}},
		Contract: []expandcontract.Step{{Name: "noop", SQL: `SELECT 1`}}}
	require.NoError(t, reg.Register(ctx, "service", plan))
	holder, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer holder.Rollback(context.Background())
	_, err = holder.Exec(ctx, `SET LOCAL application_name = 'nightly-report'; SELECT count(*) FROM gadgets`)
	require.NoError(t, err)

	r := dimmer(t, []string{"--db", dimmertest.PostgresURL(), "--schema", schema}, "schema", "expand", plan.Name, "--lock-wait-budget", "1s")
	assert.Equal(t, exitError, r.code, r.stdout)
	assert.Contains(t, r.stderr, "lock-wait budget 1s spent")
	assert.Contains(t, r.stderr, `blocked_by="pid `)
	assert.Contains(t, r.stderr, "nightly-report")
	st, err := reg.Status(ctx, plan.Name)
	require.NoError(t, err)
	assert.Equal(t, expandcontract.Pending, st.Stage)

	r = dimmer(t, []string{"--db", dimmertest.PostgresURL(), "--schema", schema}, "schema", "expand", plan.Name, "--lock-wait-budget", "0s")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "--lock-wait-budget 0s: must be positive")
}

// TestSchemaRollbackOfFailedExpand: an expand whose step fails every time
// is undone from the CLI; status offers it, the guards apply (here no fleet
// is configured, so it is forced with a reason) and the audit keeps it.
func TestSchemaRollbackOfFailedExpand(t *testing.T) {
	t.Parallel()
	ctx := flagstest.Context(t)
	pool, schema := dimmertest.Schema(t)
	_, err := pool.Exec(ctx, `CREATE TABLE sprockets (id int PRIMARY KEY, size int)`)
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `INSERT INTO sprockets VALUES (1, 0)`)
	require.NoError(t, err)
	reg, err := expandcontract.NewRegistry(pool, expandcontract.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, reg.Install(ctx))
	plan := expandcontract.Plan{Name: "sprockets-ratio",
		Expand: []expandcontract.Step{
			{Name: "add-ratio", SQL: `ALTER TABLE sprockets ADD COLUMN IF NOT EXISTS ratio int`},
			{Name: "fill-ratio", SQL: `UPDATE sprockets SET ratio = 100 / size`},
		},
		Contract: []expandcontract.Step{{Name: "noop", SQL: `SELECT 1`}},
		Rollback: []expandcontract.Step{{Name: "drop-ratio", SQL: `ALTER TABLE sprockets DROP COLUMN IF EXISTS ratio`}}}
	require.NoError(t, reg.Register(ctx, "service", plan))
	db := []string{"--db", dimmertest.PostgresURL(), "--schema", schema}

	r := dimmer(t, db, "schema", "expand", plan.Name)
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "division by zero")
	r = dimmer(t, db, "schema", "status", plan.Name)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "or `dimmer schema rollback sprockets-ratio` to undo it")
	r = dimmer(t, db, "schema", "rollback", plan.Name)
	assert.Equal(t, exitRefused, r.code, r.stdout)
	assert.Contains(t, r.stderr, "no fleet registry configured")
	r = dimmer(t, db, "schema", "rollback", plan.Name, "--force", "--reason", "the fill cannot succeed")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "sprockets-ratio: pending -> rolled back\n", r.stdout)
	var cols []string
	require.NoError(t, pool.QueryRow(ctx, `SELECT array_agg(column_name::text ORDER BY ordinal_position) FROM information_schema.columns
WHERE table_schema = $1 AND table_name = 'sprockets'`, schema).Scan(&cols))
	assert.Equal(t, []string{"id", "size"}, cols)
	r = dimmer(t, db, "schema", "audit", plan.Name, "--limit", "1")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Regexp(t, `applied\s+FORCED\s+rollback pending -> rolled back\s+by tester: the fill cannot succeed`, r.stdout)
}

// TestSchemaContractAfterTransform: the service copied a helper plan's rows
// with its Transform (no backfill job exists); `dimmer schema verify`
// records that nothing is pending, and contract passes every guard without
// --force.
func TestSchemaContractAfterTransform(t *testing.T) {
	t.Parallel()
	ctx := flagstest.Context(t)
	pool, schema := dimmertest.Schema(t)
	fs, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, fs.Install(ctx))
	_, err = pool.Exec(ctx, `CREATE TABLE films (id bigint PRIMARY KEY, director text);
INSERT INTO films SELECT g, 'd' || g FROM generate_series(1, 100) g`)
	require.NoError(t, err)
	reg, err := expandcontract.NewRegistry(pool, expandcontract.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, reg.Install(ctx))
	plan, err := expandcontract.RenameColumn("films-maker", "films", "id", "director", "maker", "text")
	require.NoError(t, err)
	require.NoError(t, reg.Register(ctx, "service", plan))
	store := []string{"--store", dimmertest.PostgresURL(), "--schema", schema}
	require.NoError(t, fs.Heartbeat(ctx, flags.Instance{ID: "api-2", Build: "v2", SeenAt: time.Now(),
		Attributes: expandcontract.Attributes(expandcontract.Range{Plan: plan.Name, Min: expandcontract.Expanded, Max: expandcontract.Contracted})()}, time.Minute))

	for _, action := range []string{"expand", "migrate"} {
		r := dimmer(t, store, "schema", action, plan.Name)
		require.Equal(t, exitOK, r.code, r.stderr)
	}
	flagstest.Set(t, fs, plan.Migration, flags.DualWrite, nil)
	r := dimmer(t, store, "schema", "verify", plan.Name)
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "100 row(s) not filled by the transform yet")
	_, err = plan.Transform.Apply(ctx, pool, 0, 100)
	require.NoError(t, err)
	// The reason is masked before it is stored: a later reader (another
	// run, the console) does not know the password to mask it.
	const secret = "Verify5ecretPw"
	withPW := strings.Replace(dimmertest.PostgresURL(), "://postgres@", "://postgres:"+secret+"@", 1)
	require.Contains(t, withPW, secret)
	r = dimmer(t, nil, "--store", withPW, "--schema", schema, "schema", "verify", plan.Name, "--reason", "checked with "+secret)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "films-maker: transform verified, 0 rows pending (migration dualwrite, epoch 0)\n", r.stdout)
	r = dimmer(t, store, "schema", "audit", plan.Name)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "checked with ***")
	assert.NotContains(t, r.stdout, secret)

	for _, s := range []flags.Stage{flags.Shadow, flags.Live, flags.RampDown, flags.Complete} {
		flagstest.Set(t, fs, plan.Migration, s, nil)
	}
	r = dimmer(t, store, "schema", "status", plan.Name)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "[PASS] backfill-verified: transform verified")
	assert.Contains(t, r.stdout, "verdict: GO for contract")
	r = dimmer(t, store, "schema", "contract", plan.Name)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "films-maker: migrating -> contracted\n", r.stdout)
}
