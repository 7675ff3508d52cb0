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

// A group that never consumed new moves there on a long topic: it finds
// its position after reading a bounded number of records on new (the
// bound its state carries, raised while it read old), not the whole log;
// translate reads as little. Exactly once, each key in order.
func TestFirstMoveOnALongTopicReadsABoundedWindow(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("longmove")
	topic(t, oldSeeds, name, 3)
	topic(t, newSeeds, name, 3)
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}

	const long = 30000
	w := newWriter(t, oldSeeds, name, 50)
	for range long / 5000 {
		w.produce(t, ctx, 5000)
	}
	mirror, err := streams.NewMirror(streams.MirrorConfig{Topic: name, Old: oldOpts, New: newOpts})
	require.NoError(t, err)
	var wg sync.WaitGroup
	mstop := goRun(t, &wg, ctx, mirror.Run)

	stage := newStage(flags.Shadow)
	l := newLedger()
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "totals",
		Old: oldOpts, New: newOpts, Source: stage, Handler: l.handle, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	cstop := goRun(t, &wg, ctx, c.Run)

	eventually(t, 60*time.Second, "old processed and new followed", func() bool {
		return l.n.Load() >= long && c.Stats().Followed >= long
	})
	w.produce(t, ctx, 300)
	eventually(t, 30*time.Second, "the tail copied", func() bool { return mirror.Stats().Copied >= long+300 })
	tr, err := streams.Translate(ctx, [3][]kgo.Opt{flags.Old: oldOpts, flags.New: newOpts}, name, "totals", flags.New)
	require.NoError(t, err)
	var scanned int64
	for _, p := range tr {
		scanned += p.Scanned
	}
	assert.LessOrEqual(t, scanned, int64(1000), "translate starts at the bound, not at the log start")

	stage.set(flags.Live)
	eventually(t, 30*time.Second, "moved to new", func() bool { return c.Stats().Cutovers >= 1 })
	w.produce(t, ctx, 300)
	want := w.all()
	eventually(t, 30*time.Second, "every record processed", func() bool { return l.n.Load() >= int64(len(want)) })
	time.Sleep(200 * time.Millisecond)
	cstop()
	mstop()
	wg.Wait()

	l.assertExact(t, want)
	st := c.Stats()
	assert.LessOrEqual(t, st.Rescanned, int64(1000), "records read on new to find the position, of %d there", long+300)
	t.Logf("consumer %+v (pauses elided), translate scanned %d", struct{ Processed, Duplicates, Rescanned, Followed, Cutovers int64 }{st.Processed, st.Duplicates, st.Rescanned, st.Followed, st.Cutovers}, scanned)
}
