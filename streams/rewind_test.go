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

// A group rewound on new (where it read copies) processes the range again
// exactly once when it restarts, and nothing outside it; a running group
// is not rewound.
func TestRewindRedoesRangeOnce(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("rewind")
	topic(t, oldSeeds, name, 1)
	topic(t, newSeeds, name, 1)
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}
	w := newWriter(t, oldSeeds, name, 3)
	w.produce(t, ctx, 20)
	m, err := streams.NewMirror(streams.MirrorConfig{Topic: name, Old: oldOpts, New: newOpts})
	require.NoError(t, err)
	var wg sync.WaitGroup
	mctx, mstop := context.WithCancel(ctx)
	defer func() { mstop(); wg.Wait() }()
	wg.Go(func() { assert.NoError(t, m.Run(mctx)) })
	eventually(t, 30*time.Second, "mirrored", func() bool { return m.Stats().Copied >= 20 })

	l := newLedger()
	consume := func(n int64, during func()) {
		c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "g", Old: oldOpts, New: newOpts,
			Source: newStage(flags.Live), Handler: l.handle, PollTimeout: 50 * time.Millisecond})
		require.NoError(t, err)
		defer c.Close()
		cctx, cstop := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- c.Run(cctx) }()
		eventually(t, 30*time.Second, "consumed", func() bool { return l.n.Load() >= n })
		if during != nil {
			during()
		}
		cstop()
		require.NoError(t, <-done)
	}
	consume(20, func() {
		_, err := streams.Rewind(ctx, streams.RewindConfig{Topic: name, Group: "g", Side: flags.New, Opts: newOpts, FromOffset: 12})
		require.ErrorIs(t, err, streams.ErrGroupActive)
	})
	res, err := streams.Rewind(ctx, streams.RewindConfig{Topic: name, Group: "g", Side: flags.New, Opts: newOpts, FromOffset: 12})
	require.NoError(t, err)
	require.Equal(t, []streams.RewindResult{{Partition: 0, From: 20, To: 12, Undone: 8}}, res)
	consume(28, nil)
	time.Sleep(200 * time.Millisecond)
	l.mu.Lock()
	defer l.mu.Unlock()
	all := w.all()
	for i, v := range all {
		want := 1
		if i >= 12 {
			want = 2 // the rewound range, once more
		}
		assert.Equal(t, want, l.times[v], "record %d %q", i, v)
	}
}
