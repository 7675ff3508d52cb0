package streams_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/streams"
)

// copies produces to new one copy per origin offset of old partition 0,
// in the order given, as copies arriving out of origin order would.
func copies(t *testing.T, ctx context.Context, seeds []string, topic string, offsets []int64) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.DefaultProduceTopic(topic), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	require.NoError(t, err)
	defer cl.Close()
	recs := make([]*kgo.Record, len(offsets))
	for i, off := range offsets {
		recs[i] = &kgo.Record{Partition: 0, Key: fmt.Appendf(nil, "o%d", off), Value: fmt.Appendf(nil, "o%d 1", off),
			Headers: []kgo.RecordHeader{{Key: streams.HeaderOrigin, Value: fmt.Appendf(nil, "old/0/%d", off)}}}
	}
	require.NoError(t, cl.ProduceSync(ctx, recs...).FirstErr())
}

// A consumer on new meets the copies of every odd origin offset before any
// even one: 200 holes, more than a commit carries. With an Overflow it
// spills the smallest spans and commits; a successor loads the state, and
// of the odd copies sent again and the even ones arriving late processes
// exactly the even ones, asking the overflow about the spilled region.
// Without one the same set stops the consumer with ErrStateTooLarge.
func TestFragmentedSetSpillsToTheOverflow(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("frag")
	topic(t, oldSeeds, name, 1)
	topic(t, newSeeds, name, 1)
	pool, schema := dimmertest.Schema(t)
	of, err := streams.NewPostgresOverflow(pool, schema)
	require.NoError(t, err)
	require.NoError(t, of.Install(ctx))

	var odd, even []int64
	for i := range int64(200) {
		odd, even = append(odd, 2*i+1), append(even, 2*i)
	}
	copies(t, ctx, newSeeds, name, odd)
	l := newLedger()
	consumer := func(group string, overflow streams.Overflow) *streams.Consumer {
		c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: group,
			Old: []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, New: []kgo.Opt{kgo.SeedBrokers(newSeeds...)},
			Source: newStage(flags.Live), Handler: l.handle, Overflow: overflow, PollTimeout: 50 * time.Millisecond})
		require.NoError(t, err)
		t.Cleanup(c.Close)
		return c
	}
	run := func(c *streams.Consumer, until func() bool) error {
		cctx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		var err error
		wg.Go(func() { err = c.Run(cctx) })
		eventually(t, 30*time.Second, "consumer progress", func() bool { return until() || !waiting(&wg) })
		time.Sleep(200 * time.Millisecond) // a record processed twice would show up now
		stop()
		wg.Wait()
		return err
	}

	bare := consumer("bare", nil)
	assert.ErrorIs(t, run(bare, func() bool { return false }), streams.ErrStateTooLarge, "without an overflow")
	l = newLedger()

	first := consumer("totals", of)
	require.NoError(t, run(first, func() bool { return l.n.Load() >= 200 }))
	assert.Positive(t, first.Stats().Spilled, "spans spilled")

	copies(t, ctx, newSeeds, name, append(odd, even...))
	second := consumer("totals", of)
	require.NoError(t, run(second, func() bool { return l.n.Load() >= 400 }))
	st := second.Stats()
	assert.EqualValues(t, 200, st.Processed, "the late even copies")
	assert.EqualValues(t, 200, st.Duplicates, "the odd copies sent again")
	assert.Positive(t, st.Lookups, "the spilled region asked of the overflow")
	want := make([]string, 0, 400)
	for off := range int64(400) {
		want = append(want, fmt.Sprintf("o%d 1", off))
	}
	skipped, twice, _ := l.check(t, want)
	assert.Zero(t, skipped, "skipped")
	assert.Zero(t, twice, "processed twice")
}

// waiting reports whether wg has not finished.
func waiting(wg *sync.WaitGroup) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return false
	case <-time.After(time.Millisecond):
		return true
	}
}
