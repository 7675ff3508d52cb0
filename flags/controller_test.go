package flags_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// newStore returns a Postgres flag store in a schema of the test's own.
func newStore(t *testing.T) *pgflags.Store {
	t.Helper()
	pool, schema := dimmertest.Schema(t)
	s, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, s.Install(ctx(t)))
	return s
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func req(m string, s flags.Stage, reason string) flags.Request {
	return flags.Request{Migration: m, Stage: s, Actor: "alice", Reason: reason}
}

func refusedChecks(t *testing.T, err error) []string {
	t.Helper()
	var r *flags.RefusedError
	require.ErrorAs(t, err, &r)
	require.ErrorIs(t, err, flags.ErrRefused)
	var names []string
	for _, c := range r.Failed {
		names = append(names, c.Name)
	}
	return names
}

func TestControllerWalksForwardOneStepAtATime(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	c, err := flags.NewController(store)
	require.NoError(t, err)

	st, err := store.Load(ctx(t), "orders")
	require.NoError(t, err)
	assert.Equal(t, flags.Off, st.Stage, "a migration never set reads as off")
	assert.Zero(t, st.Revision)

	_, err = c.Set(ctx(t), req("orders", flags.Shadow, "too fast"))
	assert.Equal(t, []string{"one-step-forward"}, refusedChecks(t, err))

	for i, s := range flags.Stages()[1:] {
		st, err := c.Advance(ctx(t), "orders", "alice", "step "+s.String())
		require.NoError(t, err)
		assert.Equal(t, s, st.Stage)
		assert.Equal(t, int64(i+1), st.Revision)
		assert.Equal(t, "alice", st.UpdatedBy)
	}
	_, err = c.Advance(ctx(t), "orders", "alice", "beyond")
	require.Error(t, err)

	audit, err := store.Audit(ctx(t), "orders", 0)
	require.NoError(t, err)
	require.Len(t, audit, 6, "five applied steps and one refusal")
	assert.Equal(t, flags.Applied, audit[0].Outcome)
	assert.Equal(t, "rampdown", audit[0].From)
	assert.Equal(t, "complete", audit[0].To)
	last := audit[len(audit)-1]
	assert.Equal(t, flags.Refused, last.Outcome)
	assert.Equal(t, "too fast", last.Reason)
	assert.Equal(t, "alice", last.Actor)
}

func TestControllerStepsBackFreelyBeforeComplete(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	failing := flags.NewGuard("always-no", nil, func(context.Context, flags.Transition) error { return errors.New("no") })
	c, err := flags.NewController(store)
	require.NoError(t, err)
	for range 3 {
		_, err := c.Advance(ctx(t), "orders", "alice", "up")
		require.NoError(t, err)
	}
	guarded, err := flags.NewController(store, flags.WithGuards(failing))
	require.NoError(t, err)

	st, err := guarded.Set(ctx(t), req("orders", flags.DualWrite, "back two steps"))
	require.NoError(t, err, "guards never judge a step back")
	assert.Equal(t, flags.DualWrite, st.Stage)
	assert.Zero(t, st.Epoch)

	st, err = guarded.Set(ctx(t), req("orders", flags.Off, "all the way back"))
	require.NoError(t, err)
	assert.Equal(t, int64(1), st.Epoch, "going back to off marks new as stale")

	_, err = guarded.Advance(ctx(t), "orders", "alice", "forward again")
	assert.Equal(t, []string{"always-no"}, refusedChecks(t, err))
}

func TestControllerLeavingComplete(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	c, err := flags.NewController(store)
	require.NoError(t, err)
	for range 5 {
		_, err := c.Advance(ctx(t), "orders", "alice", "up")
		require.NoError(t, err)
	}
	_, err = c.Set(ctx(t), req("orders", flags.Live, "oops"))
	assert.Equal(t, []string{"leaving-complete"}, refusedChecks(t, err))

	forced := req("orders", flags.RampDown, "old reconciled by hand, ticket 42")
	forced.Force = true
	st, err := c.Set(ctx(t), forced)
	require.NoError(t, err)
	assert.Equal(t, flags.RampDown, st.Stage)
	audit, err := store.Audit(ctx(t), "orders", 1)
	require.NoError(t, err)
	require.Len(t, audit, 1)
	assert.True(t, audit[0].Forced)
	assert.Equal(t, "old reconciled by hand, ticket 42", audit[0].Reason)

	_, err = c.Advance(ctx(t), "orders", "alice", "complete again")
	require.NoError(t, err)
	proven := true
	withProof, err := flags.NewController(store, flags.WithReconciliation(flags.NewGuard("reverse-backfill", nil,
		func(context.Context, flags.Transition) error {
			if !proven {
				return errors.New("reverse backfill not verified")
			}
			return nil
		})))
	require.NoError(t, err)
	st, err = withProof.Set(ctx(t), req("orders", flags.Live, "reverse backfill verified"))
	require.NoError(t, err)
	assert.Equal(t, flags.Live, st.Stage)
}

func TestControllerForceNeverSkipsAStage(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	c, err := flags.NewController(store)
	require.NoError(t, err)
	r := req("orders", flags.Live, "skip it")
	r.Force = true
	_, err = c.Set(ctx(t), r)
	assert.Equal(t, []string{"one-step-forward"}, refusedChecks(t, err))
	st, err := store.Load(ctx(t), "orders")
	require.NoError(t, err)
	assert.Equal(t, flags.Off, st.Stage)
}

func TestControllerRefusalListsEveryFailedCheck(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	no := func(name string) flags.Guard {
		return flags.NewGuard(name, flags.Entering(flags.Shadow), func(context.Context, flags.Transition) error {
			return fmt.Errorf("%s says no", name)
		})
	}
	c, err := flags.NewController(store, flags.WithGuards(no("backfill-verified"), no("schema-expanded")))
	require.NoError(t, err)
	_, err = c.Advance(ctx(t), "orders", "alice", "dualwrite")
	require.NoError(t, err, "the guards only judge keys entering shadow")
	_, err = c.Advance(ctx(t), "orders", "alice", "shadow")
	assert.Equal(t, []string{"backfill-verified", "schema-expanded"}, refusedChecks(t, err))
	assert.Contains(t, err.Error(), "backfill-verified says no")
	assert.Contains(t, err.Error(), "schema-expanded says no")

	r := req("orders", flags.Shadow, "guards are wrong, incident 7")
	r.Force = true
	st, err := c.Set(ctx(t), r)
	require.NoError(t, err)
	assert.Equal(t, flags.Shadow, st.Stage)
}

func TestControllerRacingOperatorsOneWins(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	// Both operators pass their guards before either writes, so both plans
	// start from the same revision.
	var arrived sync.WaitGroup
	arrived.Add(2)
	barrier := flags.NewGuard("barrier", nil, func(context.Context, flags.Transition) error {
		arrived.Done()
		arrived.Wait()
		return nil
	})
	c, err := flags.NewController(store, flags.WithGuards(barrier))
	require.NoError(t, err)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = c.Set(ctx(t), flags.Request{Migration: "orders", Stage: flags.DualWrite, Actor: fmt.Sprintf("op%d", i), Reason: "race"})
		}()
	}
	wg.Wait()
	var wins, conflicts int
	for _, err := range errs {
		switch {
		case err == nil:
			wins++
		case errors.Is(err, flags.ErrConflict):
			conflicts++
			var ce *flags.ConflictError
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, int64(0), ce.Expected)
			assert.Equal(t, int64(1), ce.Current)
		default:
			t.Fatalf("unexpected error: %v", err)
		}
	}
	assert.Equal(t, 1, wins)
	assert.Equal(t, 1, conflicts)
	st, err := store.Load(ctx(t), "orders")
	require.NoError(t, err)
	assert.Equal(t, int64(1), st.Revision)
}

func TestControllerRollout(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	c, err := flags.NewController(store)
	require.NoError(t, err)
	_, err = c.Advance(ctx(t), "orders", "alice", "dualwrite")
	require.NoError(t, err)
	_, err = c.Rollout(ctx(t), "orders", flags.Live, 5, "alice", "skip")
	assert.Equal(t, []string{"one-step-forward"}, refusedChecks(t, err))

	st, err := c.Rollout(ctx(t), "orders", flags.Shadow, 5, "alice", "canary")
	require.NoError(t, err)
	assert.Equal(t, flags.DualWrite, st.Stage)
	require.NotNil(t, st.Rollout)
	assert.Equal(t, flags.Rollout{Stage: flags.Shadow, Percent: 5}, *st.Rollout)
	assert.Equal(t, "dualwrite (shadow 5%)", st.String())

	// dualwrite keys may not jump to live, even while 5% are in shadow.
	_, err = c.Set(ctx(t), req("orders", flags.Live, "too fast"))
	assert.Equal(t, []string{"one-step-forward"}, refusedChecks(t, err))

	st, err = c.Rollout(ctx(t), "orders", flags.Shadow, 0, "alice", "cancel")
	require.NoError(t, err)
	assert.Nil(t, st.Rollout)
	assert.Equal(t, flags.DualWrite, st.Stage)

	st, err = c.Rollout(ctx(t), "orders", flags.Shadow, 100, "alice", "all in")
	require.NoError(t, err)
	assert.Nil(t, st.Rollout)
	assert.Equal(t, flags.Shadow, st.Stage)

	_, err = c.Rollout(ctx(t), "orders", flags.Live, 101, "alice", "bad")
	require.ErrorContains(t, err, "percent 101")
	require.ErrorIs(t, err, flags.ErrInvalidRequest)

	// A rollout serves whole buckets of 0.01 %: a share that rounds to all
	// of them would move every key without the canary check, one that
	// rounds to none would move nobody. Both are refused, forced or not.
	_, err = c.Rollout(ctx(t), "orders", flags.Live, 5, "alice", "canary")
	require.NoError(t, err)
	for _, pct := range []float64{99.999, 99.995, 0.004} {
		_, err = c.Rollout(ctx(t), "orders", flags.Live, pct, "alice", "almost")
		require.ErrorIs(t, err, flags.ErrInvalidRequest, "%v", pct)
		_, err = c.Set(ctx(t), flags.Request{Migration: "orders", Stage: flags.Live, Percent: pct, Actor: "alice", Reason: "almost", Force: true})
		require.ErrorIs(t, err, flags.ErrInvalidRequest, "%v", pct)
	}
	require.ErrorContains(t, err, "percent 0.004 rounds to no key")
	st, err = c.Rollout(ctx(t), "orders", flags.Live, 99.99, "alice", "all but one bucket")
	require.NoError(t, err)
	assert.Equal(t, flags.Rollout{Stage: flags.Live, Percent: 99.99}, *st.Rollout)
	st, err = c.Rollout(ctx(t), "orders", flags.Live, 0.01, "alice", "one bucket")
	require.NoError(t, err)
	assert.Equal(t, flags.Rollout{Stage: flags.Live, Percent: 0.01}, *st.Rollout)
}

// A request that would serve every key what it is served already changes
// nothing: no revision for the fleet to acknowledge again, no audit entry.
func TestControllerNoOpChangesNothing(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	c, err := flags.NewController(store)
	require.NoError(t, err)
	st, err := c.Advance(ctx(t), "orders", "alice", "dualwrite")
	require.NoError(t, err)
	require.Equal(t, int64(1), st.Revision)
	for _, r := range []flags.Request{
		req("orders", flags.DualWrite, "same"),
		{Migration: "orders", Stage: flags.DualWrite, Percent: 50, Actor: "alice", Reason: "same, as a rollout"},
		{Migration: "orders", Stage: flags.DualWrite, Actor: "alice", Reason: "same, forced", Force: true},
	} {
		st, err = c.Set(ctx(t), r)
		require.NoError(t, err, r.Reason)
		assert.Equal(t, int64(1), st.Revision, r.Reason)
	}
	st, err = c.Rollout(ctx(t), "orders", flags.Shadow, 5, "alice", "canary")
	require.NoError(t, err)
	again, err := c.Rollout(ctx(t), "orders", flags.Shadow, 5, "alice", "canary again")
	require.NoError(t, err)
	assert.Equal(t, st.Revision, again.Revision)
	audit, err := store.Audit(ctx(t), "orders", 10)
	require.NoError(t, err)
	assert.Len(t, audit, 2, "only the two changes are audited")
}

func TestControllerBadInput(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	_, err := flags.NewController(nil)
	require.ErrorContains(t, err, "store is nil")
	_, err = flags.NewController(store, flags.WithGuards(nil))
	require.ErrorContains(t, err, "guard 0 is nil")
	c, err := flags.NewController(store)
	require.NoError(t, err)
	for _, tc := range []struct {
		r    flags.Request
		want string
	}{
		{flags.Request{Migration: "Bad Name", Stage: flags.DualWrite, Actor: "a", Reason: "r"}, `invalid migration name "Bad Name"`},
		{flags.Request{Migration: "orders", Stage: flags.Stage(9), Actor: "a", Reason: "r"}, "unknown stage"},
		{flags.Request{Migration: "orders", Stage: flags.DualWrite, Reason: "r"}, "actor is required"},
		{flags.Request{Migration: "orders", Stage: flags.DualWrite, Actor: "a"}, "reason is required"},
		{flags.Request{Migration: "orders", Stage: flags.DualWrite, Actor: "a", Reason: " \t\n"}, "reason is required"},
		{flags.Request{Migration: "orders", Stage: flags.DualWrite, Actor: "a", Reason: "r", Percent: 99.999}, "rounds to every key"},
	} {
		_, err := c.Set(ctx(t), tc.r)
		require.ErrorContains(t, err, tc.want)
		if tc.r.Stage.Valid() && flags.ValidateName(tc.r.Migration) == nil {
			require.ErrorIs(t, err, flags.ErrInvalidRequest)
		}
	}
	st, err := store.Load(ctx(t), "orders")
	require.NoError(t, err)
	assert.Zero(t, st.Revision, "bad input changed nothing")
}

func TestFleetGuard(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	c, err := flags.NewController(store, flags.WithFleet(store))
	require.NoError(t, err)

	_, err = c.Advance(ctx(t), "orders", "alice", "nobody listens")
	require.ErrorContains(t, err, "no live instance is registered")

	revs := map[string]map[string]int64{"api-1": {}, "api-2": {}}
	var mu sync.Mutex
	beaters := map[string]*flags.Heartbeater{}
	for id := range revs {
		hb, err := flags.NewHeartbeater(store, id, "v1", func() map[string]int64 {
			mu.Lock()
			defer mu.Unlock()
			return revs[id]
		}, flags.WithHeartbeatInterval(50*time.Millisecond), flags.WithTTL(10*time.Second))
		require.NoError(t, err)
		require.NoError(t, hb.Start(ctx(t)))
		beaters[id] = hb
	}
	st, err := c.Advance(ctx(t), "orders", "alice", "both at revision 0")
	require.NoError(t, err)
	require.Equal(t, int64(1), st.Revision)

	mu.Lock()
	revs["api-1"]["orders"] = 1
	mu.Unlock()
	require.NoError(t, beaters["api-1"].Beat(ctx(t)))
	require.NoError(t, beaters["api-2"].Beat(ctx(t)))
	_, err = c.Advance(ctx(t), "orders", "alice", "api-2 lags")
	assert.Equal(t, []string{"fleet-acknowledged"}, refusedChecks(t, err))
	assert.Contains(t, err.Error(), "api-2 at revision 0")
	assert.NotContains(t, err.Error(), "api-1")

	// A rollback needs no acknowledgement.
	_, err = c.Set(ctx(t), req("orders", flags.Off, "back"))
	require.NoError(t, err)

	// A closed instance deregisters; the other catches up.
	require.NoError(t, beaters["api-2"].Close(ctx(t)))
	mu.Lock()
	revs["api-1"]["orders"] = 2
	mu.Unlock()
	require.NoError(t, beaters["api-1"].Beat(ctx(t)))
	st, err = c.Advance(ctx(t), "orders", "alice", "all caught up")
	require.NoError(t, err)
	assert.Equal(t, flags.DualWrite, st.Stage)

	status, err := c.Status(ctx(t), "orders", store)
	require.NoError(t, err)
	require.Len(t, status.Instances, 1)
	assert.Equal(t, "api-1", status.Instances[0].ID)
	assert.False(t, status.Ready, "api-1 has not applied revision 3")
	require.NoError(t, beaters["api-1"].Close(ctx(t)))
}

func TestWatchdogStepsBackOverThreshold(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	c, err := flags.NewController(store)
	require.NoError(t, err)
	for range 3 {
		_, err := c.Advance(ctx(t), "orders", "alice", "up")
		require.NoError(t, err)
	}
	var trips []flags.Trip
	wd, err := flags.NewWatchdog(c, flags.WatchdogConfig{Window: 10 * time.Second, MinSamples: 100, MaxMismatchRate: 0.05},
		flags.OnTrip(func(tr flags.Trip) { trips = append(trips, tr) }))
	require.NoError(t, err)
	// Let the slot of the last change pass: observations from before it are
	// not judged.
	time.Sleep(300 * time.Millisecond)

	observe := func(n, lasting, transient int) {
		for i := range n {
			wd.Observe(flags.Observation{Migration: "orders", Stage: flags.Live, Op: flags.Read, Side: flags.Old,
				Compared: true, Mismatch: i < lasting+transient, Lasting: i < lasting})
		}
	}
	// Transient mismatches do not count; fewer samples than the minimum are
	// not judged.
	observe(99, 60, 0)
	assert.Empty(t, wd.Judge(ctx(t)), "99 comparisons are below the minimum sample")
	wd.Observe(flags.Observation{Migration: "orders", Stage: flags.Live, Op: flags.Read, Side: flags.Old, Compared: true})
	require.Len(t, wd.Judge(ctx(t)), 1, "the hundredth comparison makes the sample")
	st, err := c.Set(ctx(t), req("orders", flags.Live, "again"))
	require.NoError(t, err)
	require.Equal(t, flags.Live, st.Stage)
	time.Sleep(300 * time.Millisecond)

	observe(200, 5, 100)
	assert.Empty(t, wd.Judge(ctx(t)), "transient mismatches do not count")
	h := wd.Health("orders", flags.Live)
	assert.Equal(t, int64(200), h.Compared)
	assert.Equal(t, int64(5), h.Lasting)
	assert.Equal(t, int64(105), h.Mismatches)

	observe(100, 20, 0)
	got := wd.Judge(ctx(t))
	require.Len(t, got, 1)
	require.NoError(t, got[0].Err)
	assert.Equal(t, flags.Shadow, got[0].State.Stage)
	assert.Contains(t, got[0].Reason, "lasting mismatch rate")
	assert.Len(t, trips, 2)

	audit, err := store.Audit(ctx(t), "orders", 1)
	require.NoError(t, err)
	assert.Equal(t, "watchdog", audit[0].Actor)
	assert.Contains(t, audit[0].Reason, "automatic rollback from live")

	// Within the cooldown the shadow window may be bad too: one step only.
	time.Sleep(300 * time.Millisecond)
	for range 200 {
		wd.Observe(flags.Observation{Migration: "orders", Stage: flags.Shadow, Op: flags.Read, Side: flags.New, Err: true})
	}
	assert.Empty(t, wd.Judge(ctx(t)))
	st, err = store.Load(ctx(t), "orders")
	require.NoError(t, err)
	assert.Equal(t, flags.Shadow, st.Stage)
}

// A lasting fault steps back once per incident: live -> shadow, and not on
// to dualwrite after the cooldown while the fault lasts. A window judged
// healthy since the rollback ends the incident.
func TestWatchdogOneRollbackPerIncident(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	c, err := flags.NewController(store)
	require.NoError(t, err)
	for range 3 {
		_, err := c.Advance(ctx(t), "orders", "alice", "up")
		require.NoError(t, err)
	}
	cfg := flags.WatchdogConfig{Window: 6 * time.Second, MinSamples: 100, Cooldown: time.Millisecond}
	wd, err := flags.NewWatchdog(c, cfg)
	require.NoError(t, err)
	slot := cfg.Window / 60
	// Observations in the slot of the last change are not judged: wait
	// until the clock left it.
	afterChange := func() {
		st, err := store.Load(ctx(t), "orders")
		require.NoError(t, err)
		time.Sleep(time.Until(st.UpdatedAt.Truncate(slot).Add(slot + time.Millisecond)))
	}
	failing := func(stage flags.Stage, n int) {
		for range n {
			wd.Observe(flags.Observation{Migration: "orders", Stage: stage, Op: flags.Write, Side: flags.New, Err: true})
		}
	}
	afterChange()
	failing(flags.Live, 200)
	trips := wd.Judge(ctx(t))
	require.Len(t, trips, 1)
	require.NoError(t, trips[0].Err)
	assert.Equal(t, flags.Shadow, trips[0].State.Stage)

	// The fault lasts; the cooldown is over.
	afterChange()
	for range 3 {
		failing(flags.Shadow, 200)
		assert.Empty(t, wd.Judge(ctx(t)), "the same incident must not step back again")
	}
	st, err := store.Load(ctx(t), "orders")
	require.NoError(t, err)
	assert.Equal(t, flags.Shadow, st.Stage)
	assert.Equal(t, "watchdog", st.UpdatedBy)

	// The shadow window recovers (a full sample, healthy), then fails
	// anew: a new incident, one more step.
	for range 200 {
		wd.Observe(flags.Observation{Migration: "orders", Stage: flags.Shadow, Op: flags.Write, Side: flags.New})
	}
	assert.Empty(t, wd.Judge(ctx(t)))
	failing(flags.Shadow, 200)
	trips = wd.Judge(ctx(t))
	require.Len(t, trips, 1)
	require.NoError(t, trips[0].Err)
	assert.Equal(t, flags.DualWrite, trips[0].State.Stage)
}

func TestWatchdogErrorRateAndLatency(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	c, err := flags.NewController(store)
	require.NoError(t, err)
	_, err = c.Advance(ctx(t), "orders", "alice", "up")
	require.NoError(t, err)
	wd, err := flags.NewWatchdog(c, flags.WatchdogConfig{MinSamples: 50, MaxErrorRate: 0.5, MaxLatencyP99: 50 * time.Millisecond})
	require.NoError(t, err)
	time.Sleep(1100 * time.Millisecond) // one slot of the default window
	for i := range 100 {
		lat := time.Millisecond
		if i < 5 {
			lat = 200 * time.Millisecond
		}
		wd.Observe(flags.Observation{Migration: "orders", Stage: flags.DualWrite, Op: flags.Write, Side: flags.New, Latency: lat})
		// Old-side results are not the new side's health.
		wd.Observe(flags.Observation{Migration: "orders", Stage: flags.DualWrite, Op: flags.Write, Side: flags.Old, Err: true})
	}
	h := wd.Health("orders", flags.DualWrite)
	assert.Equal(t, int64(100), h.Ops)
	assert.Zero(t, h.Errors)
	assert.Greater(t, h.P99, 50*time.Millisecond)
	trips := wd.Judge(ctx(t))
	require.Len(t, trips, 1)
	assert.Contains(t, trips[0].Reason, "p99")
	assert.Equal(t, flags.Off, trips[0].State.Stage)
}

func TestWatchdogConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		cfg  flags.WatchdogConfig
		want string
	}{
		{flags.WatchdogConfig{MaxMismatchRate: 2}, "MaxMismatchRate"},
		{flags.WatchdogConfig{Window: time.Second, Interval: time.Minute}, "Interval"},
		{flags.WatchdogConfig{MinSamples: -1}, "MinSamples"},
		{flags.WatchdogConfig{Cooldown: -time.Second}, "Cooldown"},
	} {
		require.ErrorContains(t, tc.cfg.Validate(), tc.want)
	}
	require.NoError(t, flags.WatchdogConfig{}.Validate())
}

// TestCanaryGuard: the canary guard judges only the step that finishes a
// rollout, from what the fleet's watchdogs saw of the canary's stage: too
// few operations, or too many errors, refuse it.
func TestCanaryGuard(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	wd := flags.WatchdogConfig{Window: time.Minute, MinSamples: 10, MaxErrorRate: 0.1, MaxMismatchRate: 0.05}
	ctrl, err := flags.NewController(store)
	require.NoError(t, err)
	w, err := flags.NewWatchdog(ctrl, wd)
	require.NoError(t, err)
	guard := flags.CanaryGuard(store, wd)

	const m = "orders"
	canary := flags.State{Migration: m, Stage: flags.Shadow, Rollout: &flags.Rollout{Stage: flags.Live, Percent: 25}}
	finish := flags.Transition{Migration: m, From: canary, To: flags.State{Migration: m, Stage: flags.Live}}
	assert.True(t, guard.Applies(finish))
	assert.False(t, guard.Applies(flags.Transition{Migration: m, From: flags.State{Migration: m, Stage: flags.Shadow}, To: canary}), "starting a canary")
	assert.False(t, guard.Applies(flags.Transition{Migration: m, From: flags.State{Migration: m, Stage: flags.Shadow}, To: flags.State{Migration: m, Stage: flags.Live}}), "a step without a canary")
	assert.False(t, guard.Applies(flags.Transition{Migration: m, From: canary, To: flags.State{Migration: m, Stage: flags.Shadow}}), "a canary called off")

	beat := func() {
		require.NoError(t, store.Heartbeat(ctx(t), flags.Instance{ID: "orders-1", Attributes: w.Attributes()}, time.Minute))
	}
	observe := func(n int, failed bool) {
		for range n {
			w.Observe(flags.Observation{Migration: m, Stage: flags.Live, Op: flags.Read, Side: flags.New, Latency: time.Millisecond, Err: failed})
		}
	}
	beat()
	assert.ErrorContains(t, guard.Check(ctx(t), finish), "only 0 operations in live")
	observe(9, false)
	beat()
	assert.ErrorContains(t, guard.Check(ctx(t), finish), "only 9 operations in live")
	observe(1, false)
	beat()
	assert.NoError(t, guard.Check(ctx(t), finish))
	observe(2, true)
	beat()
	assert.ErrorContains(t, guard.Check(ctx(t), finish), "error rate 16.67% over 12 operations")
}

func TestControllerRefusesRunawayText(t *testing.T) {
	t.Parallel()
	store := newStore(t)
	c, err := flags.NewController(store)
	require.NoError(t, err)
	huge := strings.Repeat("x", flags.MaxText+1)
	for _, r := range []flags.Request{
		{Migration: "orders", Stage: flags.Live, Actor: "alice", Reason: huge},
		{Migration: "orders", Stage: flags.DualWrite, Actor: huge, Reason: "ok"},
	} {
		_, err := c.Set(ctx(t), r)
		require.ErrorIs(t, err, flags.ErrTextTooLong)
		assert.Less(t, len(err.Error()), 300)
	}
	_, err = c.StepBack(ctx(t), "orders", flags.Live, "watchdog", huge)
	require.ErrorIs(t, err, flags.ErrTextTooLong)
	audit, err := store.Audit(ctx(t), "orders", 0)
	require.NoError(t, err)
	assert.Empty(t, audit, "a refused step with a runaway reason stores nothing")

	// The stores cap whatever reaches the audit log directly.
	require.NoError(t, store.AppendAudit(ctx(t), flags.AuditEntry{Migration: "orders", Actor: "a", Reason: huge + huge, Outcome: flags.Refused}))
	audit, err = store.Audit(ctx(t), "orders", 1)
	require.NoError(t, err)
	assert.LessOrEqual(t, len(audit[0].Reason), flags.MaxText)
	assert.True(t, strings.HasSuffix(audit[0].Reason, "…"))

	err = flags.ValidateName(strings.Repeat("N", 10_000))
	require.ErrorIs(t, err, flags.ErrInvalidName)
	assert.Less(t, len(err.Error()), 300)
	assert.Contains(t, err.Error(), "(10000 bytes)")
}
