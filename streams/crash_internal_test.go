package streams

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
)

// A consumer that dies in the middle of a move leaves one of two states:
// its position committed on the cluster it left (the move not begun on the
// other), or also the move committed on the other cluster, not yet read
// there. Whichever instance runs next, on whichever side the stage then
// says, finishes or undoes the move with nothing skipped or repeated.
func TestCrashMidCutover(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var seeds [3][]string
	var opts [3][]kgo.Opt
	const name = "crash"
	for _, side := range []flags.Side{flags.Old, flags.New} {
		c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(2, name))
		require.NoError(t, err)
		defer c.Close()
		seeds[side] = c.ListenAddrs()
		opts[side] = []kgo.Opt{kgo.SeedBrokers(seeds[side]...)}
	}
	m, err := NewMirror(MirrorConfig{Topic: name, Old: opts[flags.Old], New: opts[flags.New]})
	require.NoError(t, err)
	var wg sync.WaitGroup
	mctx, mstop := context.WithCancel(ctx)
	defer func() { mstop(); wg.Wait() }()
	wg.Go(func() { assert.NoError(t, m.Run(mctx)) })

	prod, err := kgo.NewClient(append(opts[flags.Old], kgo.DefaultProduceTopic(name))...)
	require.NoError(t, err)
	defer prod.Close()
	var values []string
	produce := func(n int) {
		for range n {
			v := fmt.Sprintf("v%05d", len(values))
			values = append(values, v)
			require.NoError(t, prod.ProduceSync(ctx, &kgo.Record{Key: []byte(v[len(v)-1:]), Value: []byte(v)}).FirstErr())
		}
	}
	var stage atomic.Int32
	src := flags.StageFunc(func(context.Context, string, string) (flags.Stage, error) { return flags.Stage(stage.Load()), nil })
	var mu sync.Mutex
	times := map[string]int{}
	var total atomic.Int64
	handler := func(_ context.Context, r *kgo.Record) error {
		mu.Lock()
		times[string(r.Value)]++
		mu.Unlock()
		total.Add(1)
		return nil
	}
	newConsumer := func() *Consumer {
		c, err := NewConsumer(ConsumerConfig{Migration: "events", Topic: name, Group: "g", Old: opts[flags.Old], New: opts[flags.New],
			Source: src, Handler: handler, PollTimeout: 50 * time.Millisecond})
		require.NoError(t, err)
		return c
	}
	// run consumes until n records were processed in all, then stops (its
	// last batch committed, as a crash right after a commit leaves it).
	run := func(n int64) {
		c := newConsumer()
		defer c.Close()
		rctx, stop := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- c.Run(rctx) }()
		for total.Load() < n {
			time.Sleep(5 * time.Millisecond)
		}
		stop()
		require.NoError(t, <-done)
	}
	copied := func(n int64) {
		for m.Stats().Copied < n {
			time.Sleep(5 * time.Millisecond)
		}
	}

	stage.Store(int32(flags.Shadow))
	produce(200)
	run(100)
	// Crash 1: committed on old, the stage moved to live, the move not
	// begun. The next instance makes it.
	stage.Store(int32(flags.Live))
	produce(100)
	copied(300)
	run(250)
	// Crash 2: on its way back to old (rollback to shadow), the instance
	// committed the move on old and died before reading there; then the
	// stage went forward again. The next instance, on new, takes the newer
	// state from old one epoch up.
	produce(100)
	copied(400)
	c := newConsumer()
	stage.Store(int32(flags.Shadow))
	require.NoError(t, c.prepare(ctx, flags.Old))
	c.Close()
	stage.Store(int32(flags.Live))
	run(350)
	// Crash 3: moved to old (committed there), died; the stage stays at
	// shadow: the next instance resumes on old.
	c = newConsumer()
	stage.Store(int32(flags.Shadow))
	require.NoError(t, c.prepare(ctx, flags.Old))
	c.Close()
	produce(100)
	run(int64(len(values)))

	mu.Lock()
	defer mu.Unlock()
	skipped, twice := 0, 0
	for _, v := range values {
		switch n := times[v]; {
		case n == 0:
			skipped++
		case n > 1:
			twice += n - 1
		}
	}
	assert.Zero(t, skipped, "skipped")
	assert.Zero(t, twice, "processed twice")
	assert.EqualValues(t, len(values), total.Load())

	cl, err := kgo.NewClient(opts[flags.Old]...)
	require.NoError(t, err)
	defer cl.Close()
	cs, err := committed(ctx, kadm.NewClient(cl), "g", name)
	require.NoError(t, err)
	st, ok, err := decodeState(cs[0].Metadata)
	require.NoError(t, err)
	require.True(t, ok)
	assert.EqualValues(t, 4, st.epoch, "four moves: to new, back to old (crash), to new again, back to old (crash)")
}
