package ordersvc_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/examples/orders/ordersvc"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// The canary guard judges only the step that finishes a rollout, from what
// the fleet's watchdogs saw of the canary's stage: too few operations, or
// too many errors, refuse it.
func TestCanaryGuard(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	pool, schema := dimmertest.Schema(t)
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, store.Install(ctx))
	wd := flags.WatchdogConfig{Window: time.Minute, MinSamples: 10, MaxErrorRate: 0.1, MaxMismatchRate: 0.05}
	ctrl, err := flags.NewController(store)
	require.NoError(t, err)
	w, err := flags.NewWatchdog(ctrl, wd)
	require.NoError(t, err)
	guard := ordersvc.CanaryGuard(store, wd)

	m := ordersvc.Migration
	canary := flags.State{Migration: m, Stage: flags.Shadow, Rollout: &flags.Rollout{Stage: flags.Live, Percent: 25}}
	finish := flags.Transition{Migration: m, From: canary, To: flags.State{Migration: m, Stage: flags.Live}}
	assert.True(t, guard.Applies(finish))
	assert.False(t, guard.Applies(flags.Transition{Migration: m, From: flags.State{Migration: m, Stage: flags.Shadow}, To: canary}), "starting a canary")
	assert.False(t, guard.Applies(flags.Transition{Migration: m, From: flags.State{Migration: m, Stage: flags.Shadow}, To: flags.State{Migration: m, Stage: flags.Live}}), "a step without a canary")

	beat := func() {
		require.NoError(t, store.Heartbeat(ctx, flags.Instance{ID: "orders-1", Attributes: w.Attributes()}, time.Minute))
	}
	observe := func(n int, failed bool) {
		for range n {
			w.Observe(flags.Observation{Migration: m, Stage: flags.Live, Op: flags.Read, Side: flags.New, Latency: time.Millisecond, Err: failed})
		}
	}
	beat()
	assert.ErrorContains(t, guard.Check(ctx, finish), "only 0 operations in live")
	observe(9, false)
	beat()
	assert.ErrorContains(t, guard.Check(ctx, finish), "only 9 operations in live")
	observe(1, false)
	beat()
	assert.NoError(t, guard.Check(ctx, finish))
	observe(2, true)
	beat()
	assert.ErrorContains(t, guard.Check(ctx, finish), "error rate 16.67% over 12 operations")
}
