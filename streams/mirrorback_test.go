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
	mstop := goRun(t, &wg, ctx, mirror.Run)

	stage := newStage(flags.Complete)
	l := newLedger()
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "totals",
		Old: oldOpts, New: newOpts, Source: stage, Handler: l.handle, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	cstop := goRun(t, &wg, ctx, c.Run)

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

	l.assertExact(t, want)
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

// A mirror back from new after complete commits its position on new, under
// the same default group as the mirror to new before it: status finds it
// there and measures its lag against new's end, and shows the mirror to new
// again while that one runs (a rollback restarted it).
func TestGroupStatusOfMirrorFromNew(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("statusback")
	topic(t, oldSeeds, name, 2)
	topic(t, newSeeds, name, 2)
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}
	adm := func(seeds []string) *kadm.Client {
		cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
		require.NoError(t, err)
		t.Cleanup(cl.Close)
		return kadm.NewClient(cl)
	}
	oldAdm, newAdm := adm(oldSeeds), adm(newSeeds)
	status := func() (on flags.Side, at, lag int64) {
		st, err := streams.GroupStatus(ctx, oldAdm, newAdm, name, "", "dimmer-mirror."+name)
		require.NoError(t, err)
		require.Len(t, st.Partitions, 2)
		on = st.Partitions[0].MirrorOn
		for _, p := range st.Partitions {
			require.Equal(t, on, p.MirrorOn, "one mirror, one cluster")
			at += p.MirrorAt
			lag += p.MirrorLag
		}
		return on, at, lag
	}
	run := func(cfg streams.MirrorConfig) (m *streams.Mirror, stop func()) {
		cfg.Topic, cfg.Old, cfg.New = name, oldOpts, newOpts
		m, err := streams.NewMirror(cfg)
		require.NoError(t, err)
		mctx, mstop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); assert.NoError(t, m.Run(mctx)) }()
		return m, func() { mstop(); <-done }
	}

	// Before complete: the mirror to new, its group on old.
	oldW := newWriter(t, oldSeeds, name, 4)
	oldW.produce(t, ctx, 30)
	fwd, stopFwd := run(streams.MirrorConfig{})
	eventually(t, 30*time.Second, "mirrored to new", func() bool { return fwd.Stats().Copied >= 30 })
	stopFwd()
	on, at, lag := status()
	assert.Equal(t, flags.Old, on)
	assert.EqualValues(t, 30, at)
	assert.Zero(t, lag)

	// After complete: producers write new, a mirror copies them back.
	newW := newWriter(t, newSeeds, name, 4)
	newW.produce(t, ctx, 20)
	back, stopBack := run(streams.MirrorConfig{From: flags.New})
	eventually(t, 30*time.Second, "mirrored back to old", func() bool { return back.Stats().Copied >= 20 })
	stopBack()
	newW.produce(t, ctx, 7) // not copied back yet
	on, at, lag = status()
	assert.Equal(t, flags.New, on, "the mirror back commits on new")
	assert.EqualValues(t, 50, at, "its position on new: the 30 copies and the 20 it copied back")
	assert.EqualValues(t, 7, lag, "the 7 records of new it has not copied back")

	// Rolled back: the mirror to new runs again (it copies nothing back
	// to new: old's new records are copies from new), and status shows it.
	fwd, stopFwd = run(streams.MirrorConfig{})
	defer stopFwd()
	// Its skips are committed after they are counted: wait for the commit.
	eventually(t, 30*time.Second, "the running mirror to new shown, past old's copies", func() bool {
		on, at, _ = status()
		return on == flags.Old && at == 50
	})
	_, _, lag = status()
	assert.Zero(t, lag)
	assert.EqualValues(t, 20, fwd.Stats().Skipped)
	assert.Zero(t, fwd.Stats().Copied)
}
