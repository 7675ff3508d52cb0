package streams_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/streams"
)

// A handler error stops Run without committing the failed record or the
// rest of its batch: the next run handles them, and nothing is lost.
func TestHandlerErrorLeavesItsBatchForTheNextRun(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("handlererr")
	topic(t, oldSeeds, name, 1)
	topic(t, newSeeds, name, 1)
	w := newWriter(t, oldSeeds, name, 5)
	w.produce(t, ctx, 100)
	l := newLedger()
	boom := errors.New("boom")
	calls := 0
	failing := func(ctx context.Context, rec *kgo.Record) error {
		if calls++; calls == 50 {
			return boom
		}
		return l.handle(ctx, rec)
	}
	run := func(h streams.Handler, until func() bool) error {
		c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "totals",
			Old: []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, New: []kgo.Opt{kgo.SeedBrokers(newSeeds...)},
			Source: newStage(flags.Shadow), Handler: h, PollTimeout: 50 * time.Millisecond})
		require.NoError(t, err)
		defer c.Close()
		rctx, stop := context.WithCancel(ctx)
		defer stop()
		done := make(chan error, 1)
		go func() { done <- c.Run(rctx) }()
		for {
			select {
			case err := <-done:
				return err
			case <-time.After(10 * time.Millisecond):
				if until() {
					stop()
					return <-done
				}
			}
		}
	}
	require.ErrorIs(t, run(failing, func() bool { return false }), boom)
	require.NoError(t, run(l.handle, func() bool { return l.n.Load() >= 100 }))
	skipped, twice, _ := l.check(t, w.all())
	assert.Zero(t, skipped, "skipped")
	assert.Zero(t, twice, "processed twice")
}
