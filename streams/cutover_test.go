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

// A topic filled on new by the mirror: the consumer moves to new at live
// and back to old on a rollback to shadow, while producers keep writing to
// old. Every record is processed exactly once, each key in order.
func TestMirroredCutoverIsExact(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("mirrored")
	topic(t, oldSeeds, name, 3)
	topic(t, newSeeds, name, 3)

	w := newWriter(t, oldSeeds, name, 20)
	w.produce(t, ctx, 600)

	mirror, err := streams.NewMirror(streams.MirrorConfig{Topic: name,
		Old: []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, New: []kgo.Opt{kgo.SeedBrokers(newSeeds...)}})
	require.NoError(t, err)
	var wg sync.WaitGroup
	mctx, mstop := context.WithCancel(ctx)
	wg.Go(func() { assert.NoError(t, mirror.Run(mctx)) })

	stage := newStage(flags.Shadow)
	l := newLedger()
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "totals",
		Old: []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, New: []kgo.Opt{kgo.SeedBrokers(newSeeds...)},
		Source: stage, Handler: l.handle, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	cctx, cstop := context.WithCancel(ctx)
	wg.Go(func() { assert.NoError(t, c.Run(cctx)) })

	eventually(t, 30*time.Second, "consumer on old processed some", func() bool { return l.n.Load() >= 200 })
	w.produce(t, ctx, 300)
	stage.set(flags.Live)
	eventually(t, 30*time.Second, "consumer moved to new", func() bool { return c.Stats().Cutovers >= 1 })
	w.produce(t, ctx, 300)
	eventually(t, 30*time.Second, "consumer on new processed more", func() bool { return l.n.Load() >= 1000 })
	stage.set(flags.Shadow)
	w.produce(t, ctx, 300)
	eventually(t, 30*time.Second, "consumer back on old", func() bool { return c.Stats().Cutovers >= 2 })
	w.produce(t, ctx, 200)
	stage.set(flags.Live)
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
	st := c.Stats()
	assert.EqualValues(t, len(want), st.Processed)
	assert.GreaterOrEqual(t, st.Cutovers, int64(3))
	assert.Positive(t, st.Duplicates, "the move skips what the other cluster already processed")
	t.Logf("stats %+v mirror %+v", st, mirror.Stats())
}
