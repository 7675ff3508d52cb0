package expandcontract_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

type env struct {
	pool   *pgxpool.Pool
	schema string
	flags  *pgflags.Store
}

func newEnv(t testing.TB) env {
	t.Helper()
	pool, schema := dimmertest.Schema(t)
	fs, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, fs.Install(flagstest.Context(t)))
	return env{pool: pool, schema: schema, flags: fs}
}

// newEnvDB is newEnv in a database of the test's own, for tests whose DDL
// waits on every older transaction of the database (CREATE INDEX
// CONCURRENTLY), which other tests' open transactions would otherwise hold up.
func newEnvDB(t *testing.T) env {
	t.Helper()
	pool := dimmertest.Pool(t, dimmertest.Database(t))
	fs, err := pgflags.NewStore(pool)
	require.NoError(t, err)
	require.NoError(t, fs.Install(flagstest.Context(t)))
	return env{pool: pool, schema: "public", flags: fs}
}

// registry returns a registry over the env with fast retries.
func (e env) registry(t *testing.T, opts ...expandcontract.Option) *expandcontract.Registry {
	t.Helper()
	regSchema := e.schema
	if regSchema == "public" {
		regSchema = expandcontract.DefaultSchema
	}
	base := []expandcontract.Option{
		expandcontract.WithSchema(regSchema), expandcontract.WithFleet(e.flags), expandcontract.WithFlagStore(e.flags),
		expandcontract.WithLockTimeout(50 * time.Millisecond), expandcontract.WithAttempts(100),
		expandcontract.WithBackoff(5*time.Millisecond, 50*time.Millisecond),
	}
	r, err := expandcontract.NewRegistry(e.pool, append(base, opts...)...)
	require.NoError(t, err)
	require.NoError(t, r.Install(flagstest.Context(t)))
	return r
}

func (e env) exec(t testing.TB, sql string, args ...any) {
	t.Helper()
	_, err := e.pool.Exec(flagstest.Context(t), sql, args...)
	require.NoError(t, err, sql)
}

func (e env) columns(t *testing.T, table string) []string {
	t.Helper()
	rows, err := e.pool.Query(flagstest.Context(t), `SELECT column_name FROM information_schema.columns
WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position`, e.schema, table)
	require.NoError(t, err)
	var out []string
	for rows.Next() {
		var c string
		require.NoError(t, rows.Scan(&c))
		out = append(out, c)
	}
	require.NoError(t, rows.Err())
	return out
}

// heartbeat registers a live instance of a build declaring ranges; it
// deregisters when the returned function is called or the test ends.
func (e env) heartbeat(t *testing.T, id, build string, ranges ...expandcontract.Range) func() {
	t.Helper()
	h, err := flags.NewHeartbeater(e.flags, id, build, func() map[string]int64 { return nil },
		flags.WithHeartbeatInterval(100*time.Millisecond),
		// Stopped instances deregister; the TTL only has to outlast a late
		// beat on a loaded machine.
		flags.WithTTL(10*time.Second),
		flags.WithAttributes(expandcontract.Attributes(ranges...)))
	require.NoError(t, err)
	require.NoError(t, h.Start(flagstest.Context(t)))
	var once sync.Once
	stop := func() {
		once.Do(func() {
			require.NoError(t, h.Close(context.Background()))
			// Close cancels a beat in flight, and a cancelled call may still
			// commit on the server after the deregistration: then the
			// instance stays listed until its TTL. The guards are right to
			// count it; the test waits until it is gone.
			require.Eventually(t, func() bool {
				insts, err := e.flags.Instances(context.Background())
				if err != nil {
					return false
				}
				for _, in := range insts {
					if in.ID == id {
						return false
					}
				}
				return true
			}, 20*time.Second, 20*time.Millisecond, "instance %s still listed after it stopped", id)
		})
	}
	t.Cleanup(stop)
	return stop
}

// traffic runs a build's queries in a loop on workers goroutines until
// stopped, counting successes and keeping every error.
type traffic struct {
	ok       atomic.Int64
	mu       sync.Mutex
	errs     []error
	stopping atomic.Bool
	cancel   context.CancelFunc
	wg       sync.WaitGroup
}

func runTraffic(workers int, op func(ctx context.Context, worker, i int) error) *traffic {
	ctx, cancel := context.WithCancel(context.Background())
	tr := &traffic{cancel: cancel}
	for w := range workers {
		tr.wg.Go(func() {
			for i := 0; !tr.stopping.Load(); i++ {
				if err := op(ctx, w, i); err != nil {
					tr.mu.Lock()
					tr.errs = append(tr.errs, err)
					tr.mu.Unlock()
					continue
				}
				tr.ok.Add(1)
			}
		})
	}
	return tr
}

// stop ends the traffic and returns the successes and failures. Workers
// finish the operation they are in instead of having it cancelled: a
// statement whose client call was cancelled may still commit on the server
// later, so only once every call has returned is the table's content final
// (a bound read after stop covers every row the traffic wrote).
func (tr *traffic) stop() (int64, []error) {
	tr.stopping.Store(true)
	tr.wg.Wait()
	tr.cancel()
	return tr.ok.Load(), tr.errs
}

func (tr *traffic) waitFor(t testing.TB, n int64) {
	t.Helper()
	start := tr.ok.Load()
	require.Eventually(t, func() bool { return tr.ok.Load() >= start+n }, 10*time.Second, 5*time.Millisecond)
}

func requireRefused(t *testing.T, err error, checks ...string) *flags.RefusedError {
	t.Helper()
	var refused *flags.RefusedError
	require.ErrorAs(t, err, &refused)
	require.ErrorIs(t, err, flags.ErrRefused)
	var got []string
	for _, c := range refused.Failed {
		got = append(got, c.Name)
	}
	assert.ElementsMatch(t, checks, got, "failed checks: %v", err)
	return refused
}

// TestTrafficThroughExpandAndContract renames a NOT NULL column of a busy
// table. Old-build traffic runs through the expand and new-build traffic
// through the contract, each only inside its declared range, and no query of
// either fails. In between the contract is refused for every reason at once
// while an old instance still heartbeats.
func TestTrafficThroughExpandAndContract(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE users (id bigserial PRIMARY KEY, fullname text NOT NULL)`)
	e.exec(t, `INSERT INTO users (fullname) SELECT 'user ' || g FROM generate_series(1, 300) g`)

	plan, err := expandcontract.RenameColumn("users-display-name", "users", "id", "fullname", "display_name", "text")
	require.NoError(t, err)
	var verified atomic.Bool
	reg := e.registry(t, expandcontract.WithVerifier(expandcontract.VerifierFunc(func(ctx context.Context, name string) (bool, string, error) {
		if !verified.Load() {
			return false, "the last verification found differences", nil
		}
		return true, "all chunks match", nil
	})))
	require.NoError(t, reg.Register(ctx, "deploy", plan))
	oldBuild := expandcontract.Range{Plan: plan.Name, Min: expandcontract.Pending, Max: expandcontract.Migrating}
	newBuild := expandcontract.Range{Plan: plan.Name, Min: expandcontract.Expanded, Max: expandcontract.Contracted}

	// Start-up guard before expand: the old build may start, the new may not.
	require.NoError(t, reg.Check(ctx, oldBuild))
	err = reg.Check(ctx, newBuild)
	var inc *expandcontract.IncompatibleError
	require.ErrorAs(t, err, &inc)
	require.ErrorIs(t, err, expandcontract.ErrIncompatible)
	assert.Contains(t, err.Error(), "plan users-display-name is pending; this build runs with expanded..contracted")

	stopOld := e.heartbeat(t, "api-old-1", "v1", oldBuild)
	old := runTraffic(3, func(ctx context.Context, w, i int) error {
		var id int64
		if err := e.pool.QueryRow(ctx, `INSERT INTO users (fullname) VALUES ($1) RETURNING id`, fmt.Sprintf("old %d-%d", w, i)).Scan(&id); err != nil {
			return fmt.Errorf("old insert: %w", err)
		}
		var name string
		if err := e.pool.QueryRow(ctx, `SELECT fullname FROM users WHERE id = $1`, id).Scan(&name); err != nil {
			return fmt.Errorf("old read: %w", err)
		}
		return nil
	})
	old.waitFor(t, 50)
	st, err := reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy", Reason: "rename fullname"})
	require.NoError(t, err)
	assert.Equal(t, expandcontract.Expanded, st.Stage)
	old.waitFor(t, 50)
	assert.Contains(t, e.columns(t, "users"), "display_name")

	// Now both builds may run; the new one writes both columns (dualwrite).
	require.NoError(t, reg.Check(ctx, oldBuild))
	require.NoError(t, reg.Check(ctx, newBuild))
	e.heartbeat(t, "api-new-1", "v2", newBuild)
	dual := runTraffic(2, func(ctx context.Context, w, i int) error {
		n := fmt.Sprintf("new %d-%d", w, i)
		var id int64
		if err := e.pool.QueryRow(ctx, `INSERT INTO users (fullname, display_name) VALUES ($1, $1) RETURNING id`, n).Scan(&id); err != nil {
			return fmt.Errorf("dual insert: %w", err)
		}
		var name string
		return e.pool.QueryRow(ctx, `SELECT fullname FROM users WHERE id = $1`, id).Scan(&name)
	})
	flagstest.Set(t, e.flags, plan.Name, flags.DualWrite, nil)
	_, err = reg.Migrate(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	require.NoError(t, err)

	// The backfill: keyset chunks of the plan's transform.
	var maxID int64
	require.NoError(t, e.pool.QueryRow(ctx, `SELECT max(id) FROM users`).Scan(&maxID))
	for lo := int64(0); lo < maxID; lo += 100 {
		_, err := plan.Transform.Apply(ctx, e.pool, lo, lo+100)
		require.NoError(t, err)
	}

	// Every reason is listed while the old instance heartbeats.
	_, err = reg.Contract(ctx, plan.Name, expandcontract.Request{Actor: "ops", Reason: "finish"})
	refused := requireRefused(t, err, expandcontract.CheckOldShapeUnused, expandcontract.CheckMigrationDone, expandcontract.CheckBackfillVerified)
	assert.Contains(t, err.Error(), "api-old-1 (build v1) runs with pending..migrating")
	assert.Contains(t, err.Error(), "migration users-display-name is dualwrite")
	assert.Contains(t, err.Error(), "the last verification found differences")
	assert.Equal(t, "migrating", refused.From)
	audit, err := reg.Audit(ctx, plan.Name, 1)
	require.NoError(t, err)
	require.Len(t, audit, 1)
	assert.Equal(t, expandcontract.OutcomeRefused, audit[0].Outcome)
	assert.Equal(t, "ops", audit[0].Actor)
	st, err = reg.Status(ctx, plan.Name)
	require.NoError(t, err)
	assert.Empty(t, st.Running, "a refused contract leaves no phase running")
	require.NoError(t, reg.Check(ctx, oldBuild))
	// A runner that died right after marking the contract started, before
	// any step: old builds are refused meanwhile, and the next contract
	// judges the guards again instead of resuming blindly.
	e.exec(t, `UPDATE `+e.schema+`.schema_plans SET running = 'contract' WHERE plan = $1`, plan.Name)
	require.ErrorIs(t, reg.Check(ctx, oldBuild), expandcontract.ErrIncompatible)
	_, err = reg.Contract(ctx, plan.Name, expandcontract.Request{Actor: "ops", Reason: "finish"})
	requireRefused(t, err, expandcontract.CheckOldShapeUnused, expandcontract.CheckMigrationDone, expandcontract.CheckBackfillVerified)
	require.NoError(t, reg.Check(ctx, oldBuild))

	// The old build leaves; the migration completes; the new build now
	// writes and reads only the new column.
	n, errs := old.stop()
	assert.Empty(t, errs, "old-build queries failed inside the old build's range")
	assert.Positive(t, n)
	stopOld()
	n, errs = dual.stop()
	assert.Empty(t, errs, "new-build queries failed during migrate")
	assert.Positive(t, n)
	require.NoError(t, e.pool.QueryRow(ctx, `SELECT max(id) FROM users`).Scan(&maxID))
	_, err = plan.Transform.Apply(ctx, e.pool, 0, maxID)
	require.NoError(t, err)
	pending, err := plan.Transform.Pending(ctx, e.pool)
	require.NoError(t, err)
	require.Zero(t, pending)
	verified.Store(true)
	for _, s := range []flags.Stage{flags.Shadow, flags.Live, flags.RampDown, flags.Complete} {
		flagstest.Set(t, e.flags, plan.Name, s, nil)
	}
	checks, err := reg.ContractChecks(ctx, plan.Name)
	require.NoError(t, err)
	for _, c := range checks {
		assert.True(t, c.Passed, "%s: %s", c.Name, c.Detail)
	}

	newOnly := runTraffic(3, func(ctx context.Context, w, i int) error {
		var id int64
		if err := e.pool.QueryRow(ctx, `INSERT INTO users (display_name) VALUES ($1) RETURNING id`, fmt.Sprintf("new %d-%d", w, i)).Scan(&id); err != nil {
			return fmt.Errorf("new insert: %w", err)
		}
		var name string
		return e.pool.QueryRow(ctx, `SELECT display_name FROM users WHERE id = $1`, id).Scan(&name)
	})
	newOnly.waitFor(t, 50)
	st, err = reg.Contract(ctx, plan.Name, expandcontract.Request{Actor: "ops", Reason: "finish"})
	require.NoError(t, err)
	assert.Equal(t, expandcontract.Contracted, st.Stage)
	newOnly.waitFor(t, 50)
	n, errs = newOnly.stop()
	assert.Empty(t, errs, "new-build queries failed during contract")
	assert.Positive(t, n)
	assert.Equal(t, []string{"id", "display_name"}, e.columns(t, "users"))

	// After contract the old build is refused at start-up; the new runs.
	require.NoError(t, reg.Check(ctx, newBuild))
	err = reg.Check(ctx, oldBuild)
	require.ErrorIs(t, err, expandcontract.ErrIncompatible)
	assert.Contains(t, err.Error(), "plan users-display-name is contracted; this build runs with pending..migrating")

	// Rollback after contract is refused, even forced.
	_, err = reg.Rollback(ctx, plan.Name, expandcontract.Request{Actor: "ops", Reason: "oops", Force: true})
	require.ErrorIs(t, err, expandcontract.ErrWrongStage)
	assert.Contains(t, err.Error(), "rollback is refused after contract")

	audit, err = reg.Audit(ctx, plan.Name, 0)
	require.NoError(t, err)
	var actions []string
	for _, a := range audit {
		actions = append(actions, a.Action+":"+a.Outcome)
	}
	assert.Equal(t, []string{"contract:applied", "contract:refused", "contract:refused", "migrate:applied", "expand:applied", "register:registered"}, actions)
}
