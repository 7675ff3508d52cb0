package streams_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/streams"
)

// A topic in live through the real Postgres flag provider: consumers read
// new. The new cluster then takes produce requests and answers none, so
// records stop reaching it. The shadow comparison's verdicts feed the
// watchdog, which steps the flag back to shadow; the consumer group moves
// back to old and processes what new never got: every record exactly once.
func TestWatchdogRollsBackTopicOnShadowMismatches(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	pool, schema := dimmertest.Schema(t)
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, store.Install(ctx))
	ctrl, err := flags.NewController(store)
	require.NoError(t, err)
	for range 3 {
		_, err := ctrl.Advance(ctx, "events", "alice", "up")
		require.NoError(t, err)
	}
	provider, err := pgflags.NewProvider(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	_, client := flagstest.Client(t, provider)
	source, err := flags.NewSource(client, flags.Off)
	require.NoError(t, err)
	eventually(t, 10*time.Second, "the provider serves live", func() bool {
		st, _ := source.Stage(ctx, "events", "events")
		return st == flags.Live
	})
	wd, err := flags.NewWatchdog(ctrl, flags.WatchdogConfig{Window: time.Minute, MinSamples: 50, MaxMismatchRate: 0.05})
	require.NoError(t, err)

	oldC, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(2, "events"))
	require.NoError(t, err)
	defer oldC.Close()
	newC, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(2, "events"))
	require.NoError(t, err)
	defer newC.Close()
	var down atomic.Bool
	healed := make(chan struct{})
	defer close(healed)
	newC.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		newC.KeepControl()
		if down.Load() {
			newC.SleepControl(func() { <-healed })
		}
		return nil, nil, false
	})
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldC.ListenAddrs()...)}, []kgo.Opt{kgo.SeedBrokers(newC.ListenAddrs()...)}

	p, err := streams.NewProducer("events", "events", source, oldOpts, newOpts, streams.WithRepairLog(pendingLog(0)),
		streams.WithCopyTimeout(3*time.Second))
	require.NoError(t, err)
	sh, err := streams.NewShadow(streams.ShadowConfig{Migration: "events", Topic: "events", Old: oldOpts, New: newOpts,
		Source: source, Grace: time.Second, Observer: wd})
	require.NoError(t, err)
	l := newLedger()
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: "events", Group: "totals",
		Old: oldOpts, New: newOpts, Source: source, Handler: l.handle, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	var wg sync.WaitGroup
	rctx, stop := context.WithCancel(ctx)
	wg.Go(func() { assert.NoError(t, sh.Run(rctx)) })
	wg.Go(func() { assert.NoError(t, c.Run(rctx)) })
	eventually(t, 20*time.Second, "the comparison started", func() bool { return sh.Stats().Sessions >= 1 })

	w := &writer{keys: 10, seq: map[string]int{}}
	produce := func(n int) {
		for i := range n {
			k, v := w.next(i)
			_, err := p.Produce(ctx, &kgo.Record{Key: []byte(k), Value: []byte(v)})
			require.NoError(t, err)
		}
	}
	produce(100)
	eventually(t, 20*time.Second, "consumed on new", func() bool { return l.n.Load() >= 100 })
	down.Store(true)
	produce(100)
	eventually(t, 20*time.Second, "mismatches judged", func() bool {
		h := wd.Health("events", flags.Live)
		return h.Lasting >= 50 && h.Compared >= 150
	})
	trips := wd.Judge(ctx)
	require.Len(t, trips, 1)
	require.NoError(t, trips[0].Err)
	assert.Equal(t, flags.Shadow, trips[0].State.Stage)

	want := w.all()
	eventually(t, 30*time.Second, "every record processed after the rollback", func() bool { return l.n.Load() >= int64(len(want)) })
	time.Sleep(200 * time.Millisecond)
	stop()
	wg.Wait()
	require.NoError(t, p.Close(ctx))
	l.assertExact(t, want)
	assert.EqualValues(t, 1, c.Stats().Cutovers, "back to old once")
	t.Logf("shadow %+v, consumer %+v", sh.Stats(), c.Stats())
}
