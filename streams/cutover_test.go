package streams_test

import (
	"context"
	"sync"
	"sync/atomic"
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
	mstop := goRun(t, &wg, ctx, mirror.Run)

	stage := newStage(flags.Shadow)
	l := newLedger()
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "totals",
		Old: []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, New: []kgo.Opt{kgo.SeedBrokers(newSeeds...)},
		Source: stage, Handler: l.handle, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	cstop := goRun(t, &wg, ctx, c.Run)

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

	l.assertExact(t, want)
	st := c.Stats()
	assert.EqualValues(t, len(want), st.Processed)
	assert.GreaterOrEqual(t, st.Cutovers, int64(3))
	assert.Positive(t, st.Duplicates, "the move skips what the other cluster already processed")
	t.Logf("stats %+v mirror %+v", st, mirror.Stats())
}

// A topic filled on new by dual producing services: producers keep writing
// through the Producer while the consumer moves to new at live, back on a
// rollback to shadow, and forward again. Exactly once, each key in order.
func TestDualProducedCutoverUnderLoad(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("dualcut")
	topic(t, oldSeeds, name, 3)
	topic(t, newSeeds, name, 3)
	log, _, _ := repairLog(t, "events")
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}

	// The producers' flag is per key and stays at a stage that writes both;
	// the consumer group's flag moves.
	producers := make([]*streams.Producer, 2)
	for i := range producers {
		p, err := streams.NewProducer("events", name, newStage(flags.Shadow), oldOpts, newOpts, streams.WithRepairLog(log))
		require.NoError(t, err)
		producers[i] = p
	}
	w := &writer{keys: 12, seq: map[string]int{}}
	var produced atomic.Int64
	var one sync.Mutex // one producer at a time, so "key seq" is each key's produce order
	pctx, pstop := context.WithCancel(ctx)
	var pwg sync.WaitGroup
	for i, p := range producers {
		pwg.Go(func() {
			for j := i; pctx.Err() == nil; j += 2 {
				one.Lock()
				k, v := w.next(j)
				_, err := p.Produce(ctx, &kgo.Record{Key: []byte(k), Value: []byte(v)})
				one.Unlock()
				if !assert.NoError(t, err) {
					return
				}
				produced.Add(1)
			}
		})
	}

	stage := newStage(flags.Shadow)
	l := newLedger()
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "totals",
		Old: oldOpts, New: newOpts, Source: stage, Handler: l.handle, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	var wg sync.WaitGroup
	cstop := goRun(t, &wg, ctx, c.Run)

	for i, s := range []flags.Stage{flags.Live, flags.Shadow, flags.Live} {
		eventually(t, 30*time.Second, "consumer progresses", func() bool { return l.n.Load() >= int64(150*(i+1)) })
		stage.set(s)
		eventually(t, 30*time.Second, "consumer moved", func() bool { return c.Stats().Cutovers >= int64(i+1) })
	}
	eventually(t, 30*time.Second, "more records after the last move", func() bool { return l.n.Load() >= 600 })
	pstop()
	pwg.Wait()
	for _, p := range producers {
		require.NoError(t, p.Close(ctx))
	}
	want := w.all()
	eventually(t, 60*time.Second, "every record processed", func() bool { return l.n.Load() >= int64(len(want)) })
	time.Sleep(200 * time.Millisecond)
	cstop()
	wg.Wait()

	l.assertExact(t, want)
	st := c.Stats()
	assert.EqualValues(t, len(want), st.Processed)
	assert.EqualValues(t, 3, st.Cutovers)
	t.Logf("records %d, consumer %+v", len(want), st)
}
