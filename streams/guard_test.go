package streams_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/streams"
)

func move(from, to flags.Stage) flags.Transition {
	return flags.Transition{Migration: "events", From: flags.State{Migration: "events", Stage: from}, To: flags.State{Migration: "events", Stage: to}}
}

// Each guard refuses while its condition fails, naming what, and passes
// once the mirror, the repairs and the consumers have caught up.
func TestGuards(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("guards")
	topic(t, oldSeeds, name, 2)
	topic(t, newSeeds, name, 2)
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}
	ocl, err := kgo.NewClient(oldOpts...)
	require.NoError(t, err)
	defer ocl.Close()
	ncl, err := kgo.NewClient(newOpts...)
	require.NoError(t, err)
	defer ncl.Close()
	oldAdm, newAdm := kadm.NewClient(ocl), kadm.NewClient(ncl)
	w := newWriter(t, oldSeeds, name, 4)
	w.produce(t, ctx, 20)

	mirrorGuard := streams.MirrorCaughtUpGuard(oldAdm, newAdm, name, "dimmer-mirror."+name, 0)
	assert.True(t, mirrorGuard.Applies(move(flags.Shadow, flags.Live)))
	assert.False(t, mirrorGuard.Applies(move(flags.Off, flags.DualWrite)))
	err = mirrorGuard.Check(ctx, move(flags.Shadow, flags.Live))
	require.Error(t, err)
	assert.ErrorContains(t, err, "records behind")

	m, err := streams.NewMirror(streams.MirrorConfig{Topic: name, Old: oldOpts, New: newOpts})
	require.NoError(t, err)
	var wg sync.WaitGroup
	mstop := goRun(t, &wg, ctx, m.Run)
	eventually(t, 30*time.Second, "mirrored", func() bool { return m.Stats().Copied >= 20 })
	require.NoError(t, mirrorGuard.Check(ctx, move(flags.Shadow, flags.Live)))

	lagGuard := streams.ConsumerLagGuard(oldAdm, newAdm, name, "g", 0)
	assert.True(t, lagGuard.Applies(move(flags.Live, flags.RampDown)))
	assert.False(t, lagGuard.Applies(move(flags.Shadow, flags.Live)))
	err = lagGuard.Check(ctx, move(flags.Live, flags.RampDown))
	require.ErrorIs(t, err, streams.ErrUnknownGroup, "a group that never consumed is named")

	stage := newStage(flags.Shadow)
	l := newLedger()
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "g", Old: oldOpts, New: newOpts,
		Source: stage, Handler: l.handle, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	cstop := goRun(t, &wg, ctx, c.Run)
	eventually(t, 30*time.Second, "consumed on old", func() bool { return l.n.Load() >= 20 })
	err = lagGuard.Check(ctx, move(flags.Live, flags.RampDown))
	require.Error(t, err)
	assert.ErrorContains(t, err, "still consumed on old")
	stage.set(flags.Live)
	eventually(t, 30*time.Second, "moved", func() bool { return c.Stats().Cutovers >= 1 })
	eventually(t, 30*time.Second, "lag guard passes", func() bool { return lagGuard.Check(ctx, move(flags.Live, flags.RampDown)) == nil })
	cstop()
	mstop()
	wg.Wait()
	require.NoError(t, lagGuard.Check(ctx, move(flags.RampDown, flags.Complete)), "no member left on old")

	repairs := streams.RepairsGuard(pendingLog(3))
	err = repairs.Check(ctx, move(flags.RampDown, flags.Complete))
	require.Error(t, err)
	assert.ErrorContains(t, err, "3 stream repairs pending")
	require.NoError(t, streams.RepairsGuard(pendingLog(0)).Check(ctx, move(flags.RampDown, flags.Complete)))
}

type pendingLog int64

func (pendingLog) Record(context.Context, streams.Repair) error { return nil }
func (p pendingLog) Pending(context.Context) (int64, error)     { return int64(p), nil }
