package expandcontract_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
)

func completeMigration(t *testing.T, e env, migration string) {
	t.Helper()
	for _, s := range []flags.Stage{flags.DualWrite, flags.Shadow, flags.Live, flags.RampDown, flags.Complete} {
		flagstest.Set(t, e.flags, migration, s, nil)
	}
}

// pendingVerifier says a migration's backfill is verified when its plan's
// transform has no row left to copy.
func pendingVerifier(e env, plans ...expandcontract.Plan) expandcontract.VerificationChecker {
	return expandcontract.VerifierFunc(func(ctx context.Context, migration string) (bool, string, error) {
		for _, p := range plans {
			if p.Migration == migration {
				n, err := p.Transform.Pending(ctx, e.pool)
				if err != nil {
					return false, "", err
				}
				return n == 0, "rows left to copy: " + itoa(n), nil
			}
		}
		return false, "unknown migration", nil
	})
}

func itoa(n int64) string { return fmtInt(n) }

// TestTwoPlansInFlight runs two independent plans at once: expanded
// concurrently, one contracted while the other stays migrating, each judged
// on its own by the start-up guard. A second runner of the same plan is
// refused while the first holds it.
func TestTwoPlansInFlight(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE orders (id bigint PRIMARY KEY, status text)`)
	e.exec(t, `INSERT INTO orders SELECT g, CASE WHEN g % 3 = 0 THEN NULL ELSE 'paid' END FROM generate_series(1, 500) g`)
	e.exec(t, `CREATE TABLE customers (id bigint PRIMARY KEY, name text, street text, city text)`)
	e.exec(t, `INSERT INTO customers SELECT g, 'c' || g, g || ' main st', 'city ' || (g % 10) FROM generate_series(1, 400) g`)
	status, err := expandcontract.AddNotNull("orders-status-required", "orders", "id", "status", "'new'")
	require.NoError(t, err)
	addr, err := expandcontract.ExtractTable("customers-addresses", "customers", "id", "addresses", "customer_id", "bigint",
		expandcontract.Column{Name: "street", Type: "text", Expr: "street"}, expandcontract.Column{Name: "city", Type: "text", Expr: "city"})
	require.NoError(t, err)
	reg := e.registry(t, expandcontract.WithVerifier(pendingVerifier(e, status, addr)))
	require.NoError(t, reg.Register(ctx, "deploy", status, addr))

	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, p := range []expandcontract.Plan{status, addr} {
		wg.Go(func() {
			_, errs[i] = reg.Expand(ctx, p.Name, expandcontract.Request{Actor: "deploy"})
		})
	}
	wg.Wait()
	require.NoError(t, errs[0])
	require.NoError(t, errs[1])
	for _, p := range []expandcontract.Plan{status, addr} {
		_, err := reg.Migrate(ctx, p.Name, expandcontract.Request{Actor: "deploy"})
		require.NoError(t, err)
		_, err = p.Transform.Apply(ctx, e.pool, 0, 1000)
		require.NoError(t, err)
	}
	n, err := addr.Transform.Pending(ctx, e.pool)
	require.NoError(t, err)
	require.Zero(t, n)
	var copied int
	require.NoError(t, e.pool.QueryRow(ctx, `SELECT count(*) FROM addresses a JOIN customers c ON c.id = a.customer_id AND c.city = a.city`).Scan(&copied))
	assert.Equal(t, 400, copied)

	completeMigration(t, e, status.Migration)
	e.heartbeat(t, "api-1", "v2",
		expandcontract.Range{Plan: status.Name, Min: expandcontract.Expanded, Max: expandcontract.Contracted},
		expandcontract.Range{Plan: addr.Name, Min: expandcontract.Pending, Max: expandcontract.Migrating})
	st, err := reg.Contract(ctx, status.Name, expandcontract.Request{Actor: "ops"})
	require.NoError(t, err)
	assert.Equal(t, expandcontract.Contracted, st.Stage)
	var nullable string
	require.NoError(t, e.pool.QueryRow(ctx, `SELECT is_nullable FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'orders' AND column_name = 'status'`, e.schema).Scan(&nullable))
	assert.Equal(t, "NO", nullable)
	var constraints int
	require.NoError(t, e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_constraint WHERE conrelid = 'orders'::regclass AND contype = 'c'`).Scan(&constraints))
	assert.Zero(t, constraints, "the helper check constraint is gone once NOT NULL is set")

	// The other plan was not touched by the first's contract and is still
	// guarded on its own: the live instance needs its old shape.
	_, err = reg.Contract(ctx, addr.Name, expandcontract.Request{Actor: "ops"})
	requireRefused(t, err, expandcontract.CheckOldShapeUnused, expandcontract.CheckMigrationDone)
	st, err = reg.Status(ctx, addr.Name)
	require.NoError(t, err)
	assert.Equal(t, expandcontract.Migrating, st.Stage)
	assert.Contains(t, e.columns(t, "customers"), "street")

	both := []expandcontract.Range{
		{Plan: status.Name, Min: expandcontract.Expanded, Max: expandcontract.Contracted},
		{Plan: addr.Name, Min: expandcontract.Expanded, Max: expandcontract.Contracted},
	}
	require.NoError(t, reg.Check(ctx, both...))
	err = reg.Check(ctx, expandcontract.Range{Plan: status.Name, Min: expandcontract.Pending, Max: expandcontract.Migrating},
		expandcontract.Range{Plan: addr.Name, Min: expandcontract.Pending, Max: expandcontract.Migrating},
		expandcontract.Range{Plan: "not-registered-yet", Min: expandcontract.Expanded, Max: expandcontract.Contracted})
	var inc *expandcontract.IncompatibleError
	require.ErrorAs(t, err, &inc)
	require.Len(t, inc.Problems, 2, "%v", err)
	assert.Equal(t, status.Name, inc.Problems[0].Plan)
	assert.Equal(t, "not-registered-yet", inc.Problems[1].Plan)
	assert.Equal(t, expandcontract.Pending, inc.Problems[1].Stage, "a plan never registered counts as pending")
}

// TestSecondRunnerIsBusy: while one process applies a plan, another is
// refused and told who holds it.
func TestSecondRunnerIsBusy(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE items (id int PRIMARY KEY)`)
	reg := e.registry(t, expandcontract.WithLockTimeout(time.Minute))
	plan := expandcontract.Plan{Name: "items-sku",
		Expand:   []expandcontract.Step{{Name: "add-sku", SQL: `ALTER TABLE items ADD COLUMN sku text`}},
		Contract: []expandcontract.Step{{Name: "noop", SQL: `SELECT 1`}}}
	require.NoError(t, reg.Register(ctx, "test", plan))
	blocker, err := e.pool.Begin(ctx)
	require.NoError(t, err)
	defer blocker.Rollback(context.Background())
	_, err = blocker.Exec(ctx, `LOCK TABLE items IN ACCESS SHARE MODE`)
	require.NoError(t, err)
	first := make(chan error, 1)
	go func() {
		_, err := reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "first"})
		first <- err
	}()
	waitForRunner(t, e.pool, plan.Name)
	_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "second"})
	require.ErrorIs(t, err, expandcontract.ErrBusy)
	assert.Contains(t, err.Error(), expandcontract.ApplicationName(plan.Name))
	require.NoError(t, blocker.Commit(ctx))
	require.NoError(t, <-first)
}

// planLockHolders counts this database's sessions holding an advisory lock
// under the plan's application name: the runner's, while it has the plan.
func planLockHolders(t *testing.T, e env, plan string) int {
	t.Helper()
	var n int
	require.NoError(t, e.pool.QueryRow(context.Background(), `SELECT count(*)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1 AND a.datname = current_database()`,
		expandcontract.ApplicationName(plan)).Scan(&n))
	return n
}

// TestFinishedRunReleasesPlanLock: when a phase returns, its plan lock is
// free, so a deploy script running phases back to back is never told the
// plan is busy by its own previous phase. Closing the runner's connection
// does not do that by itself: the server ends the session (and only then
// drops its locks) a moment after the client has gone. The same holds when
// the run ends because its context was cancelled mid-step.
func TestFinishedRunReleasesPlanLock(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE crates (id int PRIMARY KEY)`)
	reg := e.registry(t)
	plan := expandcontract.Plan{Name: "crates-lock-release",
		Expand:   []expandcontract.Step{{Name: "add-tag", SQL: `ALTER TABLE crates ADD COLUMN IF NOT EXISTS tag text`}},
		Rollback: []expandcontract.Step{{Name: "drop-tag", SQL: `ALTER TABLE crates DROP COLUMN IF EXISTS tag`}},
		Contract: []expandcontract.Step{{Name: "noop", SQL: `SELECT 1`}}}
	require.NoError(t, reg.Register(ctx, "test", plan))
	for i := range 20 {
		_, err := reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
		require.NoError(t, err, "round %d", i)
		require.Zero(t, planLockHolders(t, e, plan.Name), "round %d: expand returned with the plan still locked", i)
		_, err = reg.Rollback(ctx, plan.Name, expandcontract.Request{Actor: "deploy", Force: true, Reason: "no fleet in this test"})
		require.NoError(t, err, "round %d: the rollback right after the expand", i)
		require.Zero(t, planLockHolders(t, e, plan.Name), "round %d: rollback returned with the plan still locked", i)
	}

	// A run whose context is cancelled while its step waits on a table lock.
	blocker, err := e.pool.Begin(ctx)
	require.NoError(t, err)
	defer blocker.Rollback(context.Background())
	_, err = blocker.Exec(ctx, `LOCK TABLE crates IN ACCESS SHARE MODE`)
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := reg.Expand(runCtx, plan.Name, expandcontract.Request{Actor: "deploy"})
		done <- err
	}()
	waitForRunner(t, e.pool, plan.Name)
	cancel()
	require.ErrorIs(t, <-done, context.Canceled)
	assert.Zero(t, planLockHolders(t, e, plan.Name), "a cancelled expand returned with the plan still locked")
	require.NoError(t, blocker.Rollback(ctx))
	_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	require.NoError(t, err, "the expand run again right after the cancelled one")
}

// TestRollbackBeforeContract: rollback waits for the instances that need
// the new shape and for the migration to be off, listing both; then it
// undoes the expand, the old build is welcome again, and the plan can be
// expanded anew.
func TestRollbackBeforeContract(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE people (id bigint PRIMARY KEY, full_name text NOT NULL)`)
	e.exec(t, `INSERT INTO people VALUES (1, 'Ada Lovelace'), (2, 'Alan Turing')`)
	plan, err := expandcontract.SplitColumn("people-split-name", "people", "id", "full_name",
		expandcontract.Column{Name: "first_name", Type: "text", Expr: "split_part(full_name, ' ', 1)"},
		expandcontract.Column{Name: "last_name", Type: "text", Expr: "split_part(full_name, ' ', 2)"})
	require.NoError(t, err)
	reg := e.registry(t)
	require.NoError(t, reg.Register(ctx, "deploy", plan))
	oldBuild := expandcontract.Range{Plan: plan.Name, Min: expandcontract.Pending, Max: expandcontract.Migrating}
	newBuild := expandcontract.Range{Plan: plan.Name, Min: expandcontract.Expanded, Max: expandcontract.Contracted}

	_, err = reg.Rollback(ctx, plan.Name, expandcontract.Request{Actor: "ops"})
	require.ErrorIs(t, err, expandcontract.ErrWrongStage, "nothing to roll back yet")
	_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	require.NoError(t, err)
	_, err = reg.Migrate(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	require.NoError(t, err)
	_, err = plan.Transform.Apply(ctx, e.pool, 0, 10)
	require.NoError(t, err)
	var first, last string
	require.NoError(t, e.pool.QueryRow(ctx, `SELECT first_name, last_name FROM people WHERE id = 2`).Scan(&first, &last))
	assert.Equal(t, []string{"Alan", "Turing"}, []string{first, last})

	flagstest.Set(t, e.flags, plan.Migration, flags.DualWrite, nil)
	stopNew := e.heartbeat(t, "api-new", "v2", newBuild)
	e.heartbeat(t, "api-old", "v1", oldBuild)
	_, err = reg.Rollback(ctx, plan.Name, expandcontract.Request{Actor: "ops", Reason: "bad split"})
	requireRefused(t, err, expandcontract.CheckNewShapeUnused, expandcontract.CheckMigrationOff)
	assert.Contains(t, err.Error(), "api-new (build v2) runs with expanded..contracted")
	assert.NotContains(t, err.Error(), "api-old", "the old build does not hold the rollback back")

	stopNew()
	flagstest.Set(t, e.flags, plan.Migration, flags.Off, nil)
	st, err := reg.Rollback(ctx, plan.Name, expandcontract.Request{Actor: "ops", Reason: "bad split"})
	require.NoError(t, err)
	assert.Equal(t, expandcontract.RolledBack, st.Stage)
	assert.Equal(t, []string{"id", "full_name"}, e.columns(t, "people"))
	require.NoError(t, reg.Check(ctx, oldBuild), "rolled back has the pending shape")
	require.ErrorIs(t, reg.Check(ctx, newBuild), expandcontract.ErrIncompatible)

	// A rolled-back plan may be fixed and expanded again.
	plan.Expand[0].SQL += ", ADD COLUMN IF NOT EXISTS middle_name text"
	require.NoError(t, reg.Register(ctx, "deploy", plan))
	st, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	require.NoError(t, err)
	assert.Equal(t, expandcontract.Expanded, st.Stage)
	assert.Contains(t, e.columns(t, "people"), "middle_name")
}

// TestRegisterRefusesEditsOfPhasesThatRan: the registry never believes a
// step applied that was not; a phase that has not run may still change.
func TestRegisterRefusesEditsOfPhasesThatRan(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE notes (id int PRIMARY KEY, body text)`)
	reg := e.registry(t)
	plan, err := expandcontract.RenameColumn("notes-text", "notes", "id", "body", "text", "text")
	require.NoError(t, err)
	require.NoError(t, reg.Register(ctx, "deploy", plan))
	require.NoError(t, reg.Register(ctx, "deploy", plan), "registering the same plan again is a no-op")
	_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	require.NoError(t, err)

	edited := plan
	edited.Expand = []expandcontract.Step{{Name: "add-columns", SQL: `ALTER TABLE notes ADD COLUMN text varchar(10)`}}
	err = reg.Register(ctx, "deploy", edited)
	require.ErrorIs(t, err, expandcontract.ErrPlanChanged)
	assert.Contains(t, err.Error(), "expand steps differ")
	assert.Contains(t, err.Error(), "step 1 (add-columns) changed")

	edited = plan
	edited.Contract = append([]expandcontract.Step{{Name: "lock-check", SQL: `SELECT 1`}}, plan.Contract...)
	require.NoError(t, reg.Register(ctx, "deploy", edited), "contract has not run: it may change")
	stored, err := reg.Plan(ctx, plan.Name)
	require.NoError(t, err)
	assert.Equal(t, "lock-check", stored.Contract[0].Name)

	_, err = reg.Status(ctx, "never-registered")
	require.ErrorIs(t, err, expandcontract.ErrUnknownPlan)
	_, err = reg.Expand(ctx, "never-registered", expandcontract.Request{})
	require.ErrorIs(t, err, expandcontract.ErrUnknownPlan)
}

// TestChangeTypeTransformIsIdempotent copies with the helper's transform
// twice and under concurrent writes of the new column, which it never
// overwrites with a different value.
func TestChangeTypeTransformIsIdempotent(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE payments (id bigint PRIMARY KEY, amount integer NOT NULL)`)
	e.exec(t, `INSERT INTO payments SELECT g, g * 100 FROM generate_series(1, 1000) g`)
	plan, err := expandcontract.ChangeType("payments-amount-numeric", "payments", "id", "amount", "amount_exact", "numeric(12,2)", "amount / 100.0")
	require.NoError(t, err)
	reg := e.registry(t)
	require.NoError(t, reg.Register(ctx, "deploy", plan))
	_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	require.NoError(t, err)
	n, err := plan.Transform.Pending(ctx, e.pool)
	require.NoError(t, err)
	assert.EqualValues(t, 1000, n)
	changed, err := plan.Transform.Apply(ctx, e.pool, 0, 500)
	require.NoError(t, err)
	assert.EqualValues(t, 500, changed)
	changed, err = plan.Transform.Apply(ctx, e.pool, 0, 500)
	require.NoError(t, err)
	assert.Zero(t, changed, "a chunk run again changes nothing")
	// A dual write already wrote row 700's new column: it is not rewritten.
	e.exec(t, `UPDATE payments SET amount = 12345, amount_exact = 123.45 WHERE id = 700`)
	changed, err = plan.Transform.Apply(ctx, e.pool, 500, 1000)
	require.NoError(t, err)
	assert.EqualValues(t, 499, changed)
	n, err = plan.Transform.Pending(ctx, e.pool)
	require.NoError(t, err)
	assert.Zero(t, n)
	var v string
	require.NoError(t, e.pool.QueryRow(ctx, `SELECT amount_exact::text FROM payments WHERE id = 7`).Scan(&v))
	assert.Equal(t, "7.00", v)
}
