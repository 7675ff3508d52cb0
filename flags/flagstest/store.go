package flagstest

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
)

// Context returns a context bounded by a generous timeout, cancelled when the
// test ends.
func Context(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// Entry returns an applied audit entry for a transition, as the controller
// writes it.
func Entry(migration string, from, to flags.Stage, actor string) flags.AuditEntry {
	return flags.AuditEntry{
		Migration: migration,
		At:        time.Now().UTC().Truncate(time.Microsecond),
		Actor:     actor,
		From:      from.String(),
		To:        to.String(),
		Reason:    "test " + from.String() + " -> " + to.String(),
		Outcome:   flags.Applied,
	}
}

// Set swaps a migration to stage from whatever it is now, failing the test on
// any error, and returns the stored state.
func Set(t testing.TB, s flags.Store, migration string, stage flags.Stage, rollout *flags.Rollout) flags.State {
	t.Helper()
	ctx := Context(t)
	cur, err := s.Load(ctx, migration)
	require.NoError(t, err)
	next := cur
	next.Stage = stage
	next.Rollout = rollout
	next.UpdatedBy = "flagstest"
	got, err := s.Swap(ctx, cur.Revision, next, Entry(migration, cur.Stage, stage, "flagstest"))
	require.NoError(t, err)
	return got
}

// RunStore runs the flags.Store conformance suite. newStore is called once per
// subtest and must return an empty store of its own.
func RunStore(t *testing.T, newStore func(t *testing.T) flags.Store) {
	t.Run("NeverSetReadsOff", func(t *testing.T) {
		t.Parallel()
		s, ctx := newStore(t), Context(t)
		st, err := s.Load(ctx, "never-set")
		require.NoError(t, err)
		assert.Equal(t, "never-set", st.Migration)
		assert.Equal(t, flags.Off, st.Stage)
		assert.Zero(t, st.Revision)
		assert.Nil(t, st.Rollout)
		audit, err := s.Audit(ctx, "never-set", 0)
		require.NoError(t, err)
		assert.Empty(t, audit)
		all, err := s.Migrations(ctx)
		require.NoError(t, err)
		assert.Empty(t, all, "loading a migration must not create it")
	})

	t.Run("SwapIncrementsRevisionAndAudits", func(t *testing.T) {
		t.Parallel()
		s, ctx := newStore(t), Context(t)
		at := time.Date(2025, 3, 4, 5, 6, 7, 123456000, time.UTC)
		next := flags.State{Migration: "orders", Stage: flags.DualWrite, Epoch: 2, UpdatedAt: at, UpdatedBy: "alice"}
		entry := Entry("orders", flags.Off, flags.DualWrite, "alice")
		entry.At = at
		entry.Checks = []flags.CheckResult{{Name: "fleet", Passed: true, Detail: "3 of 3 instances"}}
		got, err := s.Swap(ctx, 0, next, entry)
		require.NoError(t, err)
		assert.Equal(t, int64(1), got.Revision)
		assert.Equal(t, flags.DualWrite, got.Stage)

		loaded, err := s.Load(ctx, "orders")
		require.NoError(t, err)
		assert.Equal(t, int64(1), loaded.Revision)
		assert.Equal(t, flags.DualWrite, loaded.Stage)
		assert.Equal(t, int64(2), loaded.Epoch)
		assert.Equal(t, "alice", loaded.UpdatedBy)
		assert.True(t, at.Equal(loaded.UpdatedAt), "UpdatedAt %v, want %v", loaded.UpdatedAt, at)

		rollout := &flags.Rollout{Stage: flags.Live, Percent: 12.5}
		got, err = s.Swap(ctx, 1, flags.State{Migration: "orders", Stage: flags.Shadow, Rollout: rollout},
			Entry("orders", flags.DualWrite, flags.Shadow, "bob"))
		require.NoError(t, err)
		assert.Equal(t, int64(2), got.Revision)
		loaded, err = s.Load(ctx, "orders")
		require.NoError(t, err)
		assert.Equal(t, int64(2), loaded.Revision)
		require.NotNil(t, loaded.Rollout)
		assert.Equal(t, *rollout, *loaded.Rollout)

		audit, err := s.Audit(ctx, "orders", 0)
		require.NoError(t, err)
		require.Len(t, audit, 2, "each swap appends exactly one audit entry")
		assert.Equal(t, "bob", audit[0].Actor)
		assert.Equal(t, "shadow", audit[0].To)
		assert.Equal(t, "alice", audit[1].Actor)
		assert.Equal(t, "off", audit[1].From)
		assert.Equal(t, "dualwrite", audit[1].To)
		assert.Equal(t, flags.Applied, audit[1].Outcome)
		assert.Equal(t, entry.Checks, audit[1].Checks)
		assert.True(t, entry.At.Equal(audit[1].At))
	})

	t.Run("SwapSetsWhoAndWhenAfresh", func(t *testing.T) {
		t.Parallel()
		s, ctx := newStore(t), Context(t)
		Set(t, s, "orders", flags.Live, nil)
		entry := Entry("orders", flags.Live, flags.Shadow, "watchdog")
		entry.At = time.Now().UTC().Add(-time.Hour).Truncate(time.Microsecond)
		rolledBack, err := s.Swap(ctx, 1, flags.State{Migration: "orders", Stage: flags.Shadow}, entry)
		require.NoError(t, err)
		assert.Equal(t, "watchdog", rolledBack.UpdatedBy)
		// An operator copies the loaded state and swaps it: the copy
		// must not carry the watchdog's name and time (its cooldown).
		cur, err := s.Load(ctx, "orders")
		require.NoError(t, err)
		next := cur
		next.Stage = flags.Live
		before := time.Now().UTC().Add(-time.Second)
		got, err := s.Swap(ctx, cur.Revision, next, flags.AuditEntry{Actor: "bob", From: "shadow", To: "live", Reason: "fixed"})
		require.NoError(t, err)
		loaded, err := s.Load(ctx, "orders")
		require.NoError(t, err)
		for _, st := range []flags.State{got, loaded} {
			assert.Equal(t, "bob", st.UpdatedBy)
			assert.True(t, st.UpdatedAt.After(before), "UpdatedAt %v is the copied one", st.UpdatedAt)
		}
		audit, err := s.Audit(ctx, "orders", 1)
		require.NoError(t, err)
		assert.True(t, audit[0].At.Equal(loaded.UpdatedAt), "the audit entry and the state share one time")
	})

	t.Run("StaleRevisionConflicts", func(t *testing.T) {
		t.Parallel()
		s, ctx := newStore(t), Context(t)
		Set(t, s, "users", flags.DualWrite, nil)

		_, err := s.Swap(ctx, 0, flags.State{Migration: "users", Stage: flags.Shadow}, Entry("users", flags.Off, flags.Shadow, "late"))
		require.ErrorIs(t, err, flags.ErrConflict)
		var ce *flags.ConflictError
		require.ErrorAs(t, err, &ce)
		assert.Equal(t, "users", ce.Migration)
		assert.Equal(t, int64(0), ce.Expected)
		assert.Equal(t, int64(1), ce.Current)

		_, err = s.Swap(ctx, 7, flags.State{Migration: "fresh", Stage: flags.DualWrite}, Entry("fresh", flags.Off, flags.DualWrite, "x"))
		require.ErrorAs(t, err, &ce, "a never-set migration is at revision 0")
		assert.Equal(t, int64(0), ce.Current)

		// The refused swaps changed nothing and wrote no audit entry.
		st, err := s.Load(ctx, "users")
		require.NoError(t, err)
		assert.Equal(t, flags.DualWrite, st.Stage)
		assert.Equal(t, int64(1), st.Revision)
		audit, err := s.Audit(ctx, "users", 0)
		require.NoError(t, err)
		assert.Len(t, audit, 1)
		audit, err = s.Audit(ctx, "fresh", 0)
		require.NoError(t, err)
		assert.Empty(t, audit)
	})

	race := func(t *testing.T, s flags.Store, migration string) {
		ctx := Context(t)
		cur, err := s.Load(ctx, migration)
		require.NoError(t, err)
		const racers = 8
		var wg sync.WaitGroup
		errs := make([]error, racers)
		start := make(chan struct{})
		for i := range racers {
			wg.Go(func() {
				<-start
				next := flags.State{Migration: migration, Stage: flags.Stage(i % 6), UpdatedBy: fmt.Sprint("op", i)}
				_, errs[i] = s.Swap(ctx, cur.Revision, next, Entry(migration, cur.Stage, next.Stage, fmt.Sprint("op", i)))
			})
		}
		close(start)
		wg.Wait()
		winner := -1
		for i, err := range errs {
			if err == nil {
				require.Equal(t, -1, winner, "two racing swaps both won")
				winner = i
				continue
			}
			require.ErrorIs(t, err, flags.ErrConflict, "racer %d", i)
		}
		require.NotEqual(t, -1, winner, "no racing swap won")
		st, err := s.Load(ctx, migration)
		require.NoError(t, err)
		assert.Equal(t, cur.Revision+1, st.Revision)
		assert.Equal(t, fmt.Sprint("op", winner), st.UpdatedBy)
		audit, err := s.Audit(ctx, migration, 0)
		require.NoError(t, err)
		require.Len(t, audit, int(cur.Revision)+1, "only the winner is audited")
		assert.Equal(t, fmt.Sprint("op", winner), audit[0].Actor)
	}
	t.Run("RacingSwapsOneWins", func(t *testing.T) {
		t.Parallel()
		s := newStore(t)
		race(t, s, "created-by-race") // both racers insert the first revision
		Set(t, s, "existing", flags.DualWrite, nil)
		race(t, s, "existing")
	})

	t.Run("AuditNewestFirstWithLimit", func(t *testing.T) {
		t.Parallel()
		s, ctx := newStore(t), Context(t)
		for _, st := range []flags.Stage{flags.DualWrite, flags.Shadow, flags.Live, flags.RampDown, flags.Complete} {
			Set(t, s, "payments", st, nil)
		}
		Set(t, s, "other", flags.DualWrite, nil)
		top, err := s.Audit(ctx, "payments", 3)
		require.NoError(t, err)
		require.Len(t, top, 3)
		assert.Equal(t, []string{"complete", "rampdown", "live"}, []string{top[0].To, top[1].To, top[2].To})
		all, err := s.Audit(ctx, "payments", 0)
		require.NoError(t, err)
		require.Len(t, all, 5)
		assert.Equal(t, "dualwrite", all[4].To)
		for _, e := range all {
			assert.Equal(t, "payments", e.Migration)
		}
		other, err := s.Audit(ctx, "other", -1)
		require.NoError(t, err)
		assert.Len(t, other, 1)
	})

	t.Run("AppendAuditRecordsRefusal", func(t *testing.T) {
		t.Parallel()
		s, ctx := newStore(t), Context(t)
		Set(t, s, "carts", flags.DualWrite, nil)
		refusal := flags.AuditEntry{
			Migration: "carts", At: time.Now().UTC().Truncate(time.Microsecond), Actor: "carol",
			From: "dualwrite", To: "live", Reason: "skip ahead", Outcome: flags.Refused, Revision: 1,
			Checks: []flags.CheckResult{
				{Name: "one-step", Passed: false, Detail: "dualwrite -> live skips shadow"},
				{Name: "backfill", Passed: false, Detail: "not verified"},
			},
		}
		require.NoError(t, s.AppendAudit(ctx, refusal))
		audit, err := s.Audit(ctx, "carts", 0)
		require.NoError(t, err)
		require.Len(t, audit, 2)
		got := audit[0]
		assert.Equal(t, flags.Refused, got.Outcome)
		assert.Equal(t, refusal.Checks, got.Checks)
		assert.Equal(t, "skip ahead", got.Reason)
		assert.True(t, refusal.At.Equal(got.At))
		st, err := s.Load(ctx, "carts")
		require.NoError(t, err)
		assert.Equal(t, int64(1), st.Revision, "a refusal changes no state")
		assert.Equal(t, flags.DualWrite, st.Stage)
	})

	t.Run("MigrationsListsAll", func(t *testing.T) {
		t.Parallel()
		s, ctx := newStore(t), Context(t)
		Set(t, s, "a.one", flags.DualWrite, nil)
		Set(t, s, "b-two", flags.Shadow, &flags.Rollout{Stage: flags.Live, Percent: 5})
		Set(t, s, "c_three", flags.DualWrite, nil)
		Set(t, s, "c_three", flags.Shadow, nil)
		all, err := s.Migrations(ctx)
		require.NoError(t, err)
		got := map[string]flags.State{}
		for _, st := range all {
			got[st.Migration] = st
		}
		require.Len(t, got, 3)
		assert.Equal(t, flags.DualWrite, got["a.one"].Stage)
		assert.Equal(t, flags.Shadow, got["b-two"].Stage)
		require.NotNil(t, got["b-two"].Rollout)
		assert.Equal(t, flags.Live, got["b-two"].Rollout.Stage)
		assert.Equal(t, int64(2), got["c_three"].Revision)
	})

	t.Run("InvalidInputRejected", func(t *testing.T) {
		t.Parallel()
		s, ctx := newStore(t), Context(t)
		for _, name := range []string{"", "Has Space", "UPPER", "semi;colon", "-leading"} {
			_, err := s.Load(ctx, name)
			assertNamed(t, err, flags.ErrInvalidName, fmt.Sprintf("%q", name))
			_, err = s.Swap(ctx, 0, flags.State{Migration: name, Stage: flags.DualWrite}, Entry(name, flags.Off, flags.DualWrite, "x"))
			assertNamed(t, err, flags.ErrInvalidName, fmt.Sprintf("%q", name))
			_, err = s.Audit(ctx, name, 0)
			assertNamed(t, err, flags.ErrInvalidName, fmt.Sprintf("%q", name))
			err = s.AppendAudit(ctx, flags.AuditEntry{Migration: name, Outcome: flags.Refused})
			assertNamed(t, err, flags.ErrInvalidName, fmt.Sprintf("%q", name))
		}
		_, err := s.Swap(ctx, 0, flags.State{Migration: "m", Stage: flags.Stage(42)}, Entry("m", flags.Off, flags.Off, "x"))
		assertNamed(t, err, flags.ErrUnknownStage, "Stage(42)")
		_, err = s.Swap(ctx, 0, flags.State{Migration: "m", Stage: flags.Shadow, Rollout: &flags.Rollout{Stage: flags.Live, Percent: 150}},
			Entry("m", flags.Off, flags.Shadow, "x"))
		assertNamed(t, err, nil, "150")
		all, err := s.Migrations(ctx)
		require.NoError(t, err)
		assert.Empty(t, all, "rejected input stored nothing")
	})
}

// assertNamed checks that err matches target (when not nil) and that its
// message names what is wrong.
func assertNamed(t *testing.T, err, target error, named string) {
	t.Helper()
	if !assert.Error(t, err) {
		return
	}
	if target != nil {
		assert.ErrorIs(t, err, target)
	}
	assert.Contains(t, err.Error(), named)
}

// RunFleet runs the flags.FleetStore conformance suite. newFleet is called once
// per subtest and must return an empty registry of its own.
func RunFleet(t *testing.T, newFleet func(t *testing.T) flags.FleetStore) {
	inst := func(id string, applied map[string]int64) flags.Instance {
		now := time.Now().UTC().Truncate(time.Microsecond)
		return flags.Instance{ID: id, Build: "v1.2.3", Applied: applied,
			Attributes: map[string]string{"schema": "3-4"}, StartedAt: now, SeenAt: now}
	}
	ids := func(is []flags.Instance) []string {
		out := make([]string, 0, len(is))
		for _, i := range is {
			out = append(out, i.ID)
		}
		slices.Sort(out)
		return out
	}

	t.Run("HeartbeatAndInstances", func(t *testing.T) {
		t.Parallel()
		f, ctx := newFleet(t), Context(t)
		got, err := f.Instances(ctx)
		require.NoError(t, err)
		assert.Empty(t, got)
		a := inst("host-a:1", map[string]int64{"orders": 3, "users": 1})
		require.NoError(t, f.Heartbeat(ctx, a, time.Minute))
		require.NoError(t, f.Heartbeat(ctx, inst("host-b:1", map[string]int64{"orders": 2}), time.Minute))
		got, err = f.Instances(ctx)
		require.NoError(t, err)
		require.Equal(t, []string{"host-a:1", "host-b:1"}, ids(got))
		for _, g := range got {
			if g.ID == a.ID {
				assert.Equal(t, a.Applied, g.Applied)
				assert.Equal(t, a.Build, g.Build)
				assert.Equal(t, a.Attributes, g.Attributes)
				assert.True(t, a.StartedAt.Equal(g.StartedAt))
			}
		}
		// A second heartbeat replaces the first, it does not add an instance.
		a.Applied = map[string]int64{"orders": 4, "users": 1}
		require.NoError(t, f.Heartbeat(ctx, a, time.Minute))
		got, err = f.Instances(ctx)
		require.NoError(t, err)
		require.Len(t, got, 2)
		for _, g := range got {
			if g.ID == a.ID {
				assert.Equal(t, int64(4), g.Applied["orders"])
			}
		}
	})

	t.Run("SilentInstanceExpires", func(t *testing.T) {
		t.Parallel()
		f, ctx := newFleet(t), Context(t)
		const ttl = 400 * time.Millisecond
		require.NoError(t, f.Heartbeat(ctx, inst("steady", nil), time.Minute))
		start := time.Now()
		require.NoError(t, f.Heartbeat(ctx, inst("silent", nil), ttl))
		got, err := f.Instances(ctx)
		require.NoError(t, err)
		if time.Since(start) < ttl {
			assert.Equal(t, []string{"silent", "steady"}, ids(got), "alive before its TTL")
		}
		require.Eventually(t, func() bool {
			got, err := f.Instances(ctx)
			return err == nil && slices.Equal(ids(got), []string{"steady"})
		}, ttl+3*time.Second, 25*time.Millisecond, "the silent instance must expire after its TTL")
		assert.GreaterOrEqual(t, time.Since(start), ttl, "expired before its TTL")
		// A heartbeat brings it back.
		require.NoError(t, f.Heartbeat(ctx, inst("silent", nil), time.Minute))
		got, err = f.Instances(ctx)
		require.NoError(t, err)
		assert.Equal(t, []string{"silent", "steady"}, ids(got))
	})

	t.Run("Deregister", func(t *testing.T) {
		t.Parallel()
		f, ctx := newFleet(t), Context(t)
		require.NoError(t, f.Heartbeat(ctx, inst("a", nil), time.Minute))
		require.NoError(t, f.Heartbeat(ctx, inst("b", nil), time.Minute))
		require.NoError(t, f.Deregister(ctx, "a"))
		got, err := f.Instances(ctx)
		require.NoError(t, err)
		assert.Equal(t, []string{"b"}, ids(got))
		require.NoError(t, f.Deregister(ctx, "a"), "deregistering twice is not an error")
		require.NoError(t, f.Deregister(ctx, "never-registered"))
	})

	t.Run("InvalidInputRejected", func(t *testing.T) {
		t.Parallel()
		f, ctx := newFleet(t), Context(t)
		err := f.Heartbeat(ctx, inst("", nil), time.Minute)
		if assert.Error(t, err) {
			assert.Contains(t, err.Error(), "ID")
		}
		err = f.Heartbeat(ctx, inst("x", nil), 0)
		if assert.Error(t, err) {
			assert.Contains(t, err.Error(), "ttl")
		}
		got, err := f.Instances(ctx)
		require.NoError(t, err)
		assert.Empty(t, got)
		assert.Error(t, f.Deregister(ctx, ""))
	})
}

// RunHandEdited checks what a store makes of documents edited by hand
// behind its back. newStore returns an empty store of its own and a
// function that replaces a migration's stored document and nothing else
// (neither the store's revision nor its audit log).
//
// A document without a stage must not read as off (a service in live
// would quietly go back to old), and one whose revision is not the store's
// must not lock the flag for good (a swap compares the store's revision):
// both are corrupt, and a forced change overwrites them.
func RunHandEdited(t *testing.T, newStore func(t *testing.T) (flags.Store, func(ctx context.Context, migration string, doc []byte) error)) {
	for name, doc := range map[string]string{
		"NoStage":          `{"migration":"orders","revision":1,"epoch":0}`,
		"NullStage":        `{"migration":"orders","stage":null,"revision":1}`,
		"RevisionMismatch": `{"migration":"orders","stage":"live","revision":99}`,
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			s, writeDoc := newStore(t)
			ctx := Context(t)
			Set(t, s, "orders", flags.Live, nil)
			require.NoError(t, writeDoc(ctx, "orders", []byte(doc)))
			_, err := s.Load(ctx, "orders")
			var corrupt *flags.CorruptFlagError
			require.ErrorAs(t, err, &corrupt)
			assert.Equal(t, int64(1), corrupt.Revision, "the store's revision, which a swap compares")
			c, err := flags.NewController(s)
			require.NoError(t, err)
			_, err = c.Set(ctx, flags.Request{Migration: "orders", Stage: flags.Live, Actor: "alice", Reason: "repair"})
			require.ErrorIs(t, err, flags.ErrCorruptFlag)
			st, err := c.Set(ctx, flags.Request{Migration: "orders", Stage: flags.Live, Actor: "alice", Reason: "repair", Force: true})
			require.NoError(t, err)
			assert.Equal(t, int64(2), st.Revision)
			st, err = s.Load(ctx, "orders")
			require.NoError(t, err)
			assert.Equal(t, flags.Live, st.Stage)
		})
	}
}
