package profilesvc_test

import (
	"context"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/chaos"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/examples/profiles/profilesvc"
	"github.com/dimmer-dev/dimmer/flags"
)

type counts struct{ compared, lasting, newErrs atomic.Int64 }

func (c *counts) Observe(o flags.Observation) {
	if o.Compared {
		c.compared.Add(1)
		if o.Lasting {
			c.lasting.Add(1)
		}
	}
	if o.Side == flags.New && o.Err {
		c.newErrs.Add(1)
	}
}

// The migration on real Postgres and Redis: dual writes reach both stores,
// a Redis outage never fails a Put and is repaired by the relay, shadow
// reads compare equal, and live serves Redis.
func TestMigration(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool, schema := dimmertest.Schema(t)
	rdb, prefix := dimmertest.Redis(t)
	faults, err := chaos.NewInjector("redis")
	require.NoError(t, err)
	var seen counts
	svc, err := profilesvc.Open(ctx, profilesvc.Config{Pool: pool, Schema: schema, Redis: rdb, Prefix: prefix,
		Watchdog: flags.WatchdogConfig{Window: time.Second, MinSamples: 1000}, NewFaults: faults, Observer: &seen,
		Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = svc.Close(context.Background()) })

	to := func(st flags.Stage) {
		t.Helper()
		_, err := svc.Controller.Set(ctx, flags.Request{Migration: profilesvc.Migration, Stage: st, Actor: "test", Reason: "test"})
		require.NoError(t, err)
		require.Eventually(t, func() bool { return svc.Stage(ctx, "any") == st }, 5*time.Second, 10*time.Millisecond)
	}
	redisVersion := func(id string) int64 {
		v, err := rdb.HGet(ctx, svc.Key(id), "version").Int64()
		if err != nil {
			return 0
		}
		return v
	}
	pgVersion := func(id string) int64 {
		var v int64
		_ = pool.QueryRow(ctx, `SELECT version FROM profiles WHERE id = $1`, id).Scan(&v)
		return v
	}

	// off: Postgres only.
	require.NoError(t, svc.Put(ctx, profilesvc.Profile{ID: "old", Name: "Ada", Email: "ada@example.com", Version: 1}))
	assert.Equal(t, int64(1), pgVersion("old"))
	assert.Zero(t, redisVersion("old"))
	st, err := svc.Repairs.Stats(ctx, pool, "")
	require.NoError(t, err)
	assert.Zero(t, st.Pending, "off writes one side and owes the other nothing")
	require.ErrorContains(t, svc.Put(ctx, profilesvc.Profile{ID: "old", Version: 0}), "Version must be at least 1, got 0")

	// dualwrite: both stores.
	to(flags.DualWrite)
	require.NoError(t, svc.Put(ctx, profilesvc.Profile{ID: "p1", Name: "Bo", Email: "bo@example.com", Version: 1}))
	require.NoError(t, svc.Put(ctx, profilesvc.Profile{ID: "p1", Name: "Bo", Email: "bo@new.example.com", Version: 2}))
	assert.Equal(t, int64(2), pgVersion("p1"))
	assert.Equal(t, int64(2), redisVersion("p1"))
	require.ErrorIs(t, svc.Put(ctx, profilesvc.Profile{ID: "p1", Name: "late", Version: 2}), profilesvc.ErrStale)
	got, err := svc.Get(ctx, "p1")
	require.NoError(t, err)
	assert.Equal(t, "bo@new.example.com", got.Email, "a stale write never replaces a newer one")

	// Redis down: the caller sees no error, the write is a repair, replayed
	// once Redis is back.
	faults.Down(true, nil)
	require.NoError(t, svc.Put(ctx, profilesvc.Profile{ID: "p1", Name: "Bo", Email: "bo@down.example.com", Version: 3}))
	assert.Positive(t, seen.newErrs.Load())
	st, err = svc.Repairs.Stats(ctx, pool, "")
	require.NoError(t, err)
	assert.Positive(t, st.Pending, "the missed write is a pending repair")
	assert.Equal(t, int64(2), redisVersion("p1"))
	faults.Heal()
	require.Eventually(t, func() bool { return redisVersion("p1") == 3 }, 10*time.Second, 20*time.Millisecond, "the repair relay brings Redis up to date")
	require.Eventually(t, func() bool {
		st, err := svc.Repairs.Stats(ctx, pool, "")
		return err == nil && st.Pending == 0
	}, 10*time.Second, 20*time.Millisecond)

	// The history, then shadow: every read compared, none differs for good.
	// Shadow is refused until the history is in Redis and verified.
	_, err = svc.Controller.Set(ctx, flags.Request{Migration: profilesvc.Migration, Stage: flags.Shadow, Actor: "test", Reason: "too early"})
	require.ErrorContains(t, err, "backfill-verified")
	res, v, err := svc.CopyAll(ctx)
	require.NoError(t, err)
	assert.Equal(t, int64(2), res.Rows)
	assert.True(t, v.OK, "%v", v.Problems)
	assert.Equal(t, int64(2), v.RowsTarget, "Redis read back: both profiles")
	assert.Equal(t, int64(1), redisVersion("old"), "the profile written before dualwrite was copied")
	assert.Equal(t, map[string]string{"version": "1", "data": `{"id":"old","name":"Ada","email":"ada@example.com","version":1}`},
		rdb.HGetAll(ctx, svc.Key("old")).Val(), "in the layout Put writes")
	to(flags.Shadow)
	for range 5 {
		for _, id := range []string{"old", "p1"} {
			_, err := svc.Get(ctx, id)
			require.NoError(t, err)
		}
	}
	_, err = svc.Get(ctx, "nobody")
	require.ErrorIs(t, err, profilesvc.ErrNotFound)
	require.Eventually(t, func() bool { return seen.compared.Load() >= 11 }, 5*time.Second, 10*time.Millisecond)
	assert.Zero(t, seen.lasting.Load(), "no lasting mismatch")
	assert.Equal(t, int64(11), svc.Health(flags.Shadow).Compared, "the watchdog saw the comparisons")

	// live: reads come from Redis (a change made in Postgres alone is not
	// what the caller gets), writes too.
	to(flags.Live)
	_, err = pool.Exec(ctx, `UPDATE profiles SET name = 'only in postgres' WHERE id = 'p1'`)
	require.NoError(t, err)
	got, err = svc.Get(ctx, "p1")
	require.NoError(t, err)
	assert.Equal(t, profilesvc.Profile{ID: "p1", Name: "Bo", Email: "bo@down.example.com", Version: 3}, got)
	require.NoError(t, svc.Put(ctx, profilesvc.Profile{ID: "p1", Name: "Bo", Email: "bo@live.example.com", Version: 4}))
	assert.Equal(t, int64(4), redisVersion("p1"))
	assert.Equal(t, int64(4), pgVersion("p1"), "live still writes Postgres second")
}
