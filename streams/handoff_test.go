package streams_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/streams"
)

// Two instances of one group whose flag providers see each change at
// different times: the first to see it waits until the other left the
// cluster it leaves, and meanwhile the other consumes every partition
// there, so no record is processed on both clusters. Forward to live and
// back to shadow: exactly once, each key in order.
func TestGroupMovesAsAWholeWhenInstancesSeeTheFlipApart(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("handoff")
	topic(t, oldSeeds, name, 3)
	topic(t, newSeeds, name, 3)
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}
	w := newWriter(t, oldSeeds, name, 20)
	mirror, err := streams.NewMirror(streams.MirrorConfig{Topic: name, Old: oldOpts, New: newOpts})
	require.NoError(t, err)
	var wg sync.WaitGroup
	mstop := goRun(t, &wg, ctx, mirror.Run)

	l := newLedger()
	stages := []*stageVar{newStage(flags.Shadow), newStage(flags.Shadow)}
	cs := make([]*streams.Consumer, 2)
	cctx, cstop := context.WithCancel(ctx)
	for i := range cs {
		c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "totals",
			Old: oldOpts, New: newOpts, Source: stages[i], Handler: l.handle, PollTimeout: 50 * time.Millisecond})
		require.NoError(t, err)
		defer c.Close()
		cs[i] = c
		wg.Go(func() { assert.NoError(t, c.Run(cctx)) })
	}
	produced := func(n int) func() bool {
		return func() bool { return l.n.Load() >= int64(n) }
	}
	w.produce(t, ctx, 600)
	eventually(t, 30*time.Second, "both on old processed", produced(600))

	for i, s := range []flags.Stage{flags.Live, flags.Shadow} {
		stages[0].set(s)
		eventually(t, 30*time.Second, "the first to see the change left", func() bool { return cs[0].Stats().Cutovers > int64(i) })
		w.produce(t, ctx, 300)
		n := len(w.all())
		eventually(t, 30*time.Second, "the other instance processes everything meanwhile", produced(n))
		stages[1].set(s)
		w.produce(t, ctx, 300)
		n = len(w.all())
		// Processed by either: the second instance must have moved too, or
		// the next step (and the stop) finds it in the middle of its move.
		eventually(t, 30*time.Second, "both moved", func() bool { return cs[1].Stats().Cutovers > int64(i) && produced(n)() })
	}
	want := w.all()
	time.Sleep(300 * time.Millisecond) // a record processed twice would show up now
	cstop()
	mstop()
	wg.Wait()
	l.assertExact(t, want)
	for i, c := range cs {
		st := c.Stats()
		assert.EqualValues(t, 2, st.Cutovers, "instance %d moved forward and back", i)
		if i == 0 {
			assert.Positive(t, st.Fenced, "the first instance waited for the other")
		}
		t.Logf("instance %d: processed %d, duplicates %d, fenced %d, cutovers %d", i, st.Processed, st.Duplicates, st.Fenced, st.Cutovers)
	}
}

// Run returns nil when its context ends, also while it asks the other
// cluster whether the group still has members there (before joining,
// after every move): the request it cancels is no failure. Held here by the
// new cluster not answering until the consumer stopped.
func TestRunStoppedWhileCheckingTheOtherClusterReturnsNil(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	oldC, newC, name := twoClustersWithTopic(t, "stopask")
	held := holdRequests(t, newC, kmsg.DescribeGroups)

	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "totals",
		Old: []kgo.Opt{kgo.SeedBrokers(oldC.ListenAddrs()...)}, New: []kgo.Opt{kgo.SeedBrokers(newC.ListenAddrs()...)},
		Source: newStage(flags.Shadow), Handler: func(context.Context, *kgo.Record) error { return nil }, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	stopWhileHeld(t, ctx, c.Run, held, "the consumer never asked the new cluster for the group's members")
}

// The mirror's first step asks both clusters for the topic; stopped while
// the new cluster has not answered, it returns nil as it does when stopped
// while copying.
func TestMirrorStoppedWhileCheckingTheTopicReturnsNil(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	oldC, newC, name := twoClustersWithTopic(t, "stopmirror")
	held := holdRequests(t, newC, kmsg.Metadata)

	m, err := streams.NewMirror(streams.MirrorConfig{Topic: name,
		Old: []kgo.Opt{kgo.SeedBrokers(oldC.ListenAddrs()...)}, New: []kgo.Opt{kgo.SeedBrokers(newC.ListenAddrs()...)}})
	require.NoError(t, err)
	stopWhileHeld(t, ctx, m.Run, held, "the mirror never asked the new cluster for the topic")
}

// holdRequests leaves every request of key to c unanswered until the test
// ends; held is closed at the first.
func holdRequests(t *testing.T, c *kfake.Cluster, key kmsg.Key) (held <-chan struct{}) {
	h, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	t.Cleanup(func() { close(release) }) // before the topic's deletion and the cluster's close
	c.ControlKey(int16(key), func(kmsg.Request) (kmsg.Response, error, bool) {
		once.Do(func() { close(h) })
		c.SleepControl(func() { <-release })
		return nil, nil, false
	})
	return h
}

// stopWhileHeld runs run until held is closed, stops it there and expects
// it to return nil, as it does when stopped anywhere else.
func stopWhileHeld(t *testing.T, ctx context.Context, run func(context.Context) error, held <-chan struct{}, never string) {
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- run(rctx) }()
	select {
	case <-held:
	case <-ctx.Done():
		t.Fatal(never)
	}
	stop()
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-ctx.Done():
		t.Fatal("Run did not return once stopped")
	}
}

// twoClustersWithTopic starts an old and a new cluster whose control hooks
// a test can use, each with a two-partition topic of the same name.
func twoClustersWithTopic(t *testing.T, prefix string) (oldC, newC *kfake.Cluster, name string) {
	t.Helper()
	var err error
	oldC, err = kfake.NewCluster(kfake.NumBrokers(1))
	require.NoError(t, err)
	t.Cleanup(oldC.Close)
	newC, err = kfake.NewCluster(kfake.NumBrokers(1))
	require.NoError(t, err)
	t.Cleanup(newC.Close)
	name = uniqueTopic(prefix)
	topic(t, oldC.ListenAddrs(), name, 2)
	topic(t, newC.ListenAddrs(), name, 2)
	return oldC, newC, name
}

// A stop while the cluster copied to has stopped answering (a round's
// produce in flight) and the group's coordinator too (leaving the group)
// takes about StopTimeout, not the round's and the leave's own timeouts:
// it must fit in a termination grace period.
func TestMirrorStopIsBoundedWhenClustersGoMute(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldC, newC, name := twoClustersWithTopic(t, "mutestop")
	holdRequests(t, oldC, kmsg.LeaveGroup)
	held := holdRequests(t, newC, kmsg.Produce)
	m, err := streams.NewMirror(streams.MirrorConfig{Topic: name, StopTimeout: time.Second,
		Old: []kgo.Opt{kgo.SeedBrokers(oldC.ListenAddrs()...)}, New: []kgo.Opt{kgo.SeedBrokers(newC.ListenAddrs()...)}})
	require.NoError(t, err)
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- m.Run(rctx) }()

	prod, err := kgo.NewClient(kgo.SeedBrokers(oldC.ListenAddrs()...), kgo.DefaultProduceTopic(name))
	require.NoError(t, err)
	defer prod.Close()
	require.NoError(t, prod.ProduceSync(ctx, &kgo.Record{Value: []byte("x")}).FirstErr())
	select {
	case <-held:
	case <-ctx.Done():
		t.Fatal("the mirror never produced to the new cluster")
	}
	start := time.Now()
	stop()
	select {
	case err := <-done:
		assert.NoError(t, err, "a stop is not a failure")
	case <-ctx.Done():
		t.Fatal("the mirror did not stop")
	}
	assert.Less(t, time.Since(start), 5*time.Second, "two StopTimeouts of 1s, and slack")
}
