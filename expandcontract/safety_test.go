package expandcontract_test

import (
	"context"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
)

func stepOf(t *testing.T, st expandcontract.Status, phase, name string) expandcontract.StepStatus {
	t.Helper()
	for _, s := range st.Steps {
		if s.Phase == phase && s.Name == name {
			return s
		}
	}
	t.Fatalf("no step %s/%s in %+v", phase, name, st.Steps)
	return expandcontract.StepStatus{}
}

// TestLockTimeoutBehindBlockingTransaction: an ALTER TABLE behind a long
// transaction gives up its place in the lock queue after lock_timeout, so
// the table's other queries are never stalled for longer; out of attempts it
// fails naming the step, with nothing applied; once the blocker is gone it
// succeeds on a later attempt.
func TestLockTimeoutBehindBlockingTransaction(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)`)
	e.exec(t, `INSERT INTO accounts SELECT g, g FROM generate_series(1, 100) g`)
	reg := e.registry(t, expandcontract.WithLockTimeout(100*time.Millisecond), expandcontract.WithAttempts(4),
		expandcontract.WithBackoff(20*time.Millisecond, 40*time.Millisecond))
	plan := expandcontract.Plan{Name: "accounts-currency",
		Expand:   []expandcontract.Step{{Name: "add-currency", SQL: `ALTER TABLE accounts ADD COLUMN currency text`}},
		Contract: []expandcontract.Step{{Name: "noop", SQL: `SELECT 1`}}}
	require.NoError(t, reg.Register(ctx, "test", plan))

	blocker, err := e.pool.Begin(ctx)
	require.NoError(t, err)
	defer blocker.Rollback(context.Background())
	_, err = blocker.Exec(ctx, `SELECT count(*) FROM accounts`) // holds AccessShareLock
	require.NoError(t, err)

	// Readers keep going while the DDL waits and retries.
	reads := runTraffic(2, func(ctx context.Context, _, _ int) error {
		start := time.Now()
		var n int
		if err := e.pool.QueryRow(ctx, `SELECT count(*) FROM accounts`).Scan(&n); err != nil {
			return err
		}
		if d := time.Since(start); d > time.Second {
			return &slowError{d}
		}
		return nil
	})
	start := time.Now()
	_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "test"})
	elapsed := time.Since(start)
	var se *expandcontract.StepError
	require.ErrorAs(t, err, &se)
	require.ErrorIs(t, err, expandcontract.ErrLockTimeout)
	assert.Equal(t, "add-currency", se.Step)
	assert.Equal(t, 4, se.Attempts)
	assert.Less(t, elapsed, 5*time.Second)
	n, errs := reads.stop()
	assert.Empty(t, errs, "a reader was stalled behind the waiting DDL")
	assert.Positive(t, n)

	st, err := reg.Status(ctx, plan.Name)
	require.NoError(t, err)
	assert.Equal(t, expandcontract.Pending, st.Stage)
	assert.Equal(t, expandcontract.PhaseExpand, st.Running)
	s := stepOf(t, st, expandcontract.PhaseExpand, "add-currency")
	assert.Equal(t, "failed", s.State)
	assert.Equal(t, 4, s.Attempts)
	assert.Contains(t, s.LastError, "lock timeout")
	assert.NotContains(t, e.columns(t, "accounts"), "currency")

	// Run again; the blocker ends during the retries.
	released := make(chan error, 1)
	go func() {
		// Release only once the second run has timed out at least once.
		for {
			st, err := reg.Status(context.Background(), plan.Name)
			if err != nil || st.Steps[0].Attempts > 5 {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		released <- blocker.Commit(context.Background())
	}()
	reg2 := e.registry(t, expandcontract.WithLockTimeout(100*time.Millisecond), expandcontract.WithAttempts(50),
		expandcontract.WithBackoff(20*time.Millisecond, 40*time.Millisecond))
	st, err = reg2.Expand(ctx, plan.Name, expandcontract.Request{Actor: "test"})
	require.NoError(t, <-released)
	require.NoError(t, err)
	assert.Equal(t, expandcontract.Expanded, st.Stage)
	assert.Empty(t, st.Running)
	s = stepOf(t, st, expandcontract.PhaseExpand, "add-currency")
	assert.Equal(t, "applied", s.State)
	assert.Greater(t, s.Attempts, 5, "the second run retried too")
	assert.Contains(t, e.columns(t, "accounts"), "currency")
}

type slowError struct{ d time.Duration }

func (e *slowError) Error() string { return "read took " + e.d.String() }

const (
	helperSchemaEnv = "DIMMER_EC_HELPER_SCHEMA"
	helperPlanEnv   = "DIMMER_EC_HELPER_PLAN"
)

// waitForRunner waits until the plan's runner session is waiting on a lock
// and returns its backend pid.
// Tests in other databases may run a plan of the same name: only this
// database's sessions count.
func waitForRunner(t *testing.T, pool *pgxpool.Pool, plan string) int32 {
	t.Helper()
	var pid int32
	require.Eventually(t, func() bool {
		err := pool.QueryRow(context.Background(), `SELECT pid FROM pg_stat_activity
WHERE application_name = $1 AND wait_event_type = 'Lock' AND datname = current_database()`, expandcontract.ApplicationName(plan)).Scan(&pid)
		return err == nil
	}, 20*time.Second, 10*time.Millisecond, "the runner never waited on its lock")
	return pid
}

func runnerGone(t *testing.T, pool *pgxpool.Pool, plan string) {
	t.Helper()
	require.Eventually(t, func() bool {
		var n int
		err := pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()`,
			expandcontract.ApplicationName(plan)).Scan(&n)
		return err == nil && n == 0
	}, 20*time.Second, 20*time.Millisecond, "the dead runner's session stayed")
}

// TestCrashMidStepThenResume kills the process applying a plan (SIGKILL)
// while its second step waits for a lock. The server notices the dead
// client and rolls the step back; the first step stays applied; running the
// phase again applies only what is missing.
func TestCrashMidStepThenResume(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE orders (id int PRIMARY KEY)`)
	reg := e.registry(t)
	// Neither CREATE TABLE is idempotent: running one twice fails, which
	// proves a resumed phase skips what was applied.
	plan := expandcontract.Plan{Name: "orders-audit",
		Expand: []expandcontract.Step{
			{Name: "create-a", SQL: `CREATE TABLE crash_a (id int)`},
			{Name: "add-note", SQL: `ALTER TABLE orders ADD COLUMN note text; CREATE TABLE crash_half (id int)`},
			{Name: "create-b", SQL: `CREATE TABLE crash_b (id int)`},
		},
		Contract: []expandcontract.Step{{Name: "noop", SQL: `SELECT 1`}}}
	require.NoError(t, reg.Register(ctx, "test", plan))

	blocker, err := e.pool.Begin(ctx)
	require.NoError(t, err)
	defer blocker.Rollback(context.Background())
	_, err = blocker.Exec(ctx, `LOCK TABLE orders IN ACCESS SHARE MODE`)
	require.NoError(t, err)

	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHelperExpandProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperSchemaEnv+"="+e.schema, helperPlanEnv+"="+plan.Name)
	require.NoError(t, cmd.Start())
	waitForRunner(t, e.pool, plan.Name)
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	_ = cmd.Wait()
	runnerGone(t, e.pool, plan.Name)

	st, err := reg.Status(ctx, plan.Name)
	require.NoError(t, err)
	assert.Equal(t, expandcontract.Pending, st.Stage)
	assert.Equal(t, expandcontract.PhaseExpand, st.Running, "the interrupted phase is visible")
	assert.Equal(t, "applied", stepOf(t, st, expandcontract.PhaseExpand, "create-a").State)
	assert.Empty(t, stepOf(t, st, expandcontract.PhaseExpand, "add-note").State, "a crashed transactional step leaves no record")
	assert.NotContains(t, e.columns(t, "orders"), "note")
	assert.Empty(t, e.columns(t, "crash_half"), "nothing of the crashed step is left")

	// While the expand is half done, only builds that run with both shapes start.
	require.NoError(t, reg.Check(ctx, expandcontract.Range{Plan: plan.Name, Min: expandcontract.Pending, Max: expandcontract.Migrating}))
	err = reg.Check(ctx, expandcontract.Range{Plan: plan.Name, Min: expandcontract.Expanded, Max: expandcontract.Contracted})
	require.ErrorIs(t, err, expandcontract.ErrIncompatible)
	assert.Contains(t, err.Error(), "pending with expand in progress")
	// Nor can the interrupted expand be skipped.
	_, err = reg.Migrate(ctx, plan.Name, expandcontract.Request{Actor: "test"})
	require.ErrorIs(t, err, expandcontract.ErrWrongStage)

	require.NoError(t, blocker.Commit(ctx))
	st, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "test"})
	require.NoError(t, err)
	assert.Equal(t, expandcontract.Expanded, st.Stage)
	assert.Contains(t, e.columns(t, "orders"), "note")
	assert.NotEmpty(t, e.columns(t, "crash_b"))
	assert.Equal(t, 1, stepOf(t, st, expandcontract.PhaseExpand, "create-a").Attempts)
}

// TestHelperExpandProcess is the process TestCrashMidStepThenResume kills;
// it does nothing when run directly.
func TestHelperExpandProcess(t *testing.T) {
	schema, plan := os.Getenv(helperSchemaEnv), os.Getenv(helperPlanEnv)
	if schema == "" {
		t.Skip("helper process for TestCrashMidStepThenResume")
	}
	cfg, err := pgxpool.ParseConfig(dimmertest.PostgresURL())
	require.NoError(t, err)
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	defer pool.Close()
	reg, err := expandcontract.NewRegistry(pool, expandcontract.WithSchema(schema), expandcontract.WithLockTimeout(time.Minute))
	require.NoError(t, err)
	_, err = reg.Expand(context.Background(), plan, expandcontract.Request{Actor: "helper"})
	t.Fatalf("the helper should have been killed, Expand returned %v", err)
}

func indexValid(t *testing.T, pool *pgxpool.Pool, name string) (exists, valid bool) {
	t.Helper()
	var v *bool
	err := pool.QueryRow(context.Background(), `SELECT (SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1))`, name).Scan(&v)
	require.NoError(t, err)
	if v == nil {
		return false, false
	}
	return true, *v
}

// TestInterruptedConcurrentIndexIsRebuilt: CREATE INDEX CONCURRENTLY
// behind an open writing transaction leaves an invalid index when it times
// out on its lock and when its backend is terminated; the next run detects
// it, drops it and builds a valid one. Index names need not be ASCII, nor
// unquoted: the index is found by what the server resolves the name to.
func TestInterruptedConcurrentIndexIsRebuilt(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ how, index, regclass string }{
		{"lock-timeout", "events_kind", "events_kind"},
		{"terminated", "events_kind", "events_kind"},
		{"terminated", "idx_émail", "idx_émail"},
		{"lock-timeout", `"Idx ""É"" kind"`, `"Idx ""É"" kind"`},
	} {
		how := c.how
		t.Run(how+"/"+c.regclass, func(t *testing.T) {
			t.Parallel()
			e := newEnvDB(t)
			ctx := flagstest.Context(t)
			e.exec(t, `CREATE TABLE events (id int PRIMARY KEY, kind text)`)
			e.exec(t, `INSERT INTO events SELECT g, 'k' || (g % 7) FROM generate_series(1, 1000) g`)
			plan := expandcontract.Plan{Name: "events-kind-index",
				Expand: []expandcontract.Step{{Name: "index-kind", Concurrently: true,
					SQL: `CREATE INDEX CONCURRENTLY IF NOT EXISTS ` + c.index + ` ON events (kind)`}},
				Contract: []expandcontract.Step{{Name: "noop", SQL: `SELECT 1`}}}
			opts := []expandcontract.Option{expandcontract.WithLockTimeout(time.Minute)}
			if how == "lock-timeout" {
				opts = []expandcontract.Option{expandcontract.WithLockTimeout(100 * time.Millisecond), expandcontract.WithLockWaitBudget(300 * time.Millisecond)}
			}
			reg := e.registry(t, opts...)
			require.NoError(t, reg.Register(ctx, "test", plan))

			blocker, err := e.pool.Begin(ctx)
			require.NoError(t, err)
			defer blocker.Rollback(context.Background())
			_, err = blocker.Exec(ctx, `INSERT INTO events VALUES (0, 'open')`)
			require.NoError(t, err)

			done := make(chan error, 1)
			go func() {
				_, err := reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "test"})
				done <- err
			}()
			if how == "terminated" {
				pid := waitForRunner(t, e.pool, plan.Name)
				_, err := e.pool.Exec(ctx, `SELECT pg_terminate_backend($1)`, pid)
				require.NoError(t, err)
			}
			err = <-done
			var se *expandcontract.StepError
			require.ErrorAs(t, err, &se)
			assert.Equal(t, "index-kind", se.Step)
			if how == "lock-timeout" {
				require.ErrorIs(t, err, expandcontract.ErrLockTimeout)
			}
			exists, valid := indexValid(t, e.pool, c.regclass)
			require.True(t, exists, "an interrupted concurrent build leaves its index behind")
			require.False(t, valid)

			require.NoError(t, blocker.Commit(ctx))
			st, err := e.registry(t, expandcontract.WithLockTimeout(time.Minute)).Expand(ctx, plan.Name, expandcontract.Request{Actor: "test"})
			require.NoError(t, err)
			assert.Equal(t, expandcontract.Expanded, st.Stage)
			exists, valid = indexValid(t, e.pool, c.regclass)
			assert.True(t, exists)
			assert.True(t, valid, "IF NOT EXISTS alone would have kept the invalid index")
			var uses int
			require.NoError(t, e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_indexes WHERE schemaname = $1 AND tablename = 'events'`, e.schema).Scan(&uses))
			assert.Equal(t, 2, uses, "primary key and the new index, no leftovers")
		})
	}
}

// TestConcurrentIndexCheckedAfterBuild: a concurrent step whose index is not
// there after its statement ran (here its Index names another one) is not
// recorded as applied.
func TestConcurrentIndexCheckedAfterBuild(t *testing.T) {
	t.Parallel()
	e := newEnvDB(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE tags (id int PRIMARY KEY, label text)`)
	reg := e.registry(t)
	plan := expandcontract.Plan{Name: "tags-label-index",
		Expand: []expandcontract.Step{{Name: "index-label", Concurrently: true, Index: "tags_label_idx",
			SQL: `CREATE INDEX CONCURRENTLY IF NOT EXISTS tags_by_label ON tags (label)`}},
		Contract: []expandcontract.Step{{Name: "noop", SQL: `SELECT 1`}}}
	require.NoError(t, reg.Register(ctx, "test", plan))
	_, err := reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "test"})
	require.ErrorIs(t, err, expandcontract.ErrInvalidIndex)
	assert.ErrorContains(t, err, "index tags_label_idx does not exist")
	st, err := reg.Status(ctx, plan.Name)
	require.NoError(t, err)
	assert.Equal(t, "failed", stepOf(t, st, expandcontract.PhaseExpand, "index-label").State)
	assert.Equal(t, expandcontract.Pending, st.Stage)
}

// TestResumeRebuildsAnInvalidIndexRecordedAsApplied: an expand interrupted
// after a concurrent step was recorded as applied while its index is not
// valid (as a build that never checked validity recorded it) rebuilds that
// index when resumed, found by its identity.
func TestResumeRebuildsAnInvalidIndexRecordedAsApplied(t *testing.T) {
	t.Parallel()
	e := newEnvDB(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE logins (id int PRIMARY KEY, email text)`)
	e.exec(t, `INSERT INTO logins VALUES (1, 'a@x'), (2, 'a@x'), (3, 'b@x')`)
	reg := e.registry(t)
	plan := expandcontract.Plan{Name: "logins-unique-email",
		Expand: []expandcontract.Step{
			{Name: "unique-email", Concurrently: true, SQL: `CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "idx_Émail" ON logins (email)`},
			{Name: "fail", SQL: `SELECT 1/0`},
		},
		Contract: []expandcontract.Step{{Name: "noop", SQL: `SELECT 1`}}}
	require.NoError(t, reg.Register(ctx, "test", plan))
	// The duplicates leave an invalid index; record the step applied as an
	// unchecked build did.
	_, err := e.pool.Exec(ctx, `CREATE UNIQUE INDEX CONCURRENTLY "idx_Émail" ON logins (email)`)
	require.Error(t, err)
	e.exec(t, `UPDATE dimmer.schema_plans SET running = 'expand' WHERE plan = $1`, plan.Name)
	e.exec(t, `INSERT INTO dimmer.schema_plan_steps (plan, phase, step, state) VALUES ($1, 'expand', 'unique-email', 'applied')`, plan.Name)
	e.exec(t, `DELETE FROM logins WHERE id = 2`)

	_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "test"})
	require.ErrorContains(t, err, "division by zero", "the run reaches the next step")
	exists, valid := indexValid(t, e.pool, `"idx_Émail"`)
	assert.True(t, exists)
	assert.True(t, valid, "the invalid index recorded as applied was rebuilt")
}
