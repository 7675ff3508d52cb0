package streams_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/streams"
)

// After complete, producers that cannot be changed write to new only; a
// mirror from new fills old back, so consumers can roll back to old and
// forward again: exactly once, each key in order, and every copy on old
// names its origin on new.
func TestMirrorFromNewAfterCompleteRollsBack(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("mirrorback")
	topic(t, oldSeeds, name, 3)
	topic(t, newSeeds, name, 3)
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}

	w := newWriter(t, newSeeds, name, 20)
	w.produce(t, ctx, 400)
	mirror, err := streams.NewMirror(streams.MirrorConfig{Topic: name, From: flags.New, Old: oldOpts, New: newOpts})
	require.NoError(t, err)
	var wg sync.WaitGroup
	mctx, mstop := context.WithCancel(ctx)
	wg.Go(func() { assert.NoError(t, mirror.Run(mctx)) })

	stage := newStage(flags.Complete)
	l := newLedger()
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "totals",
		Old: oldOpts, New: newOpts, Source: stage, Handler: l.handle, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	cctx, cstop := context.WithCancel(ctx)
	wg.Go(func() { assert.NoError(t, c.Run(cctx)) })

	eventually(t, 30*time.Second, "consumer on new processed some", func() bool { return l.n.Load() >= 200 })
	w.produce(t, ctx, 200)
	stage.set(flags.Shadow) // rolled back: consumers read old
	eventually(t, 30*time.Second, "consumer moved to old", func() bool { return c.Stats().Cutovers >= 1 })
	w.produce(t, ctx, 200)
	eventually(t, 30*time.Second, "consumer on old processed more", func() bool { return l.n.Load() >= 700 })
	stage.set(flags.Live)
	w.produce(t, ctx, 200)
	want := w.all()
	eventually(t, 60*time.Second, "every record processed", func() bool { return l.n.Load() >= int64(len(want)) })
	time.Sleep(200 * time.Millisecond) // a record processed twice would show up now
	cstop()
	mstop()
	wg.Wait()

	skipped, twice, disorder := l.check(t, want)
	assert.Zero(t, skipped, "skipped")
	assert.Zero(t, twice, "processed twice")
	assert.Zero(t, disorder, "per-key order violations")
	assert.EqualValues(t, 2, c.Stats().Cutovers)
	recs := readAll(t, oldSeeds, name)
	require.Len(t, recs, len(want), "old holds a copy of every record")
	for _, r := range recs {
		o, err := streams.OriginOf(r, flags.Old)
		require.NoError(t, err)
		require.Equal(t, flags.New, o.Side, "copy at old %d@%d", r.Partition, r.Offset)
		require.Equal(t, r.Partition, o.Partition)
	}
}
