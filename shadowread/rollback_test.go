package shadowread_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/shadowread"
)

// TestWatchdogRollsBackLiveOnLastingMismatches: a migration in live through
// the real Postgres flag provider; 3 % of keys differ for good between the
// stores. The reader's observations feed the watchdog, which steps the flag
// back to shadow, audits why, and the next reads are served by old again.
func TestWatchdogRollsBackLiveOnLastingMismatches(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	var schema string
	require.NoError(t, s.pg.QueryRow(ctx(t), `SELECT current_schema()`).Scan(&schema))
	store, err := pgflags.NewStore(s.pg, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, store.Install(ctx(t)))
	ctrl, err := flags.NewController(store)
	require.NoError(t, err)
	for range 3 {
		_, err := ctrl.Advance(ctx(t), "users_to_redis", "alice", "up")
		require.NoError(t, err)
	}
	provider, err := pgflags.NewProvider(s.pg, pgflags.WithSchema(schema))
	require.NoError(t, err)
	_, client := flagstest.Client(t, provider)
	source, err := flags.NewSource(client, flags.Off)
	require.NoError(t, err)
	wd, err := flags.NewWatchdog(ctrl, flags.WatchdogConfig{Window: time.Minute, MinSamples: 1000, MaxMismatchRate: 0.01})
	require.NoError(t, err)
	// The watchdog does not judge observations from the slot (Window/60) in
	// which the migration last changed: they may belong to the stage before.
	// Read only once a slot that starts after the last change has begun.
	last, err := store.Load(ctx(t), "users_to_redis")
	require.NoError(t, err)
	const slot = time.Minute / 60
	require.Eventually(t, func() bool { return time.Now().Truncate(slot).After(last.UpdatedAt) },
		5*time.Second, 5*time.Millisecond, "a slot after the last change (%v) begins", last.UpdatedAt)

	const n = 1000
	for i := range n {
		id := fmt.Sprintf("u%d", i)
		newName := "same"
		if i%100 < 3 {
			newName = "corrupted"
		}
		s.put(t, id, "same", newName)
	}
	r := newReader(t, s, source, shadowread.WithWait(), shadowread.WithRecheck(time.Millisecond), shadowread.WithObserver(wd),
		shadowread.WithReports(shadowread.ReportSinkFunc(func(context.Context, shadowread.Report) {}), 0, nil))
	for i := range n {
		u, err := r.Read(ctx(t), fmt.Sprintf("u%d", i))
		require.NoError(t, err)
		if i%100 < 3 {
			require.Equal(t, "corrupted", u.Name, "live serves the new side")
		}
	}
	h := wd.Health("users_to_redis", flags.Live)
	assert.EqualValues(t, n, h.Compared)
	assert.EqualValues(t, 30, h.Lasting)

	trips := wd.Judge(ctx(t))
	require.Len(t, trips, 1)
	require.NoError(t, trips[0].Err)
	assert.Equal(t, flags.Shadow, trips[0].State.Stage)
	audit, err := store.Audit(ctx(t), "users_to_redis", 1)
	require.NoError(t, err)
	assert.Equal(t, "watchdog", audit[0].Actor)
	assert.Equal(t, "shadow", audit[0].To)
	assert.Contains(t, audit[0].Reason, "mismatch")

	// The flip reaches the provider and the reader serves old again.
	require.Eventually(t, func() bool {
		st, _ := source.Stage(ctx(t), "users_to_redis", "u0")
		return st == flags.Shadow
	}, 5*time.Second, 10*time.Millisecond)
	u, err := r.Read(ctx(t), "u1") // u1 differs: old has "same"
	require.NoError(t, err)
	assert.Equal(t, "same", u.Name)
}
