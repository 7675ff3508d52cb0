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

// Translate names, per partition, the offset on new of the first record
// the group (consuming old) has not processed: the copy of old's next one.
func TestTranslate(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("translate")
	topic(t, oldSeeds, name, 2)
	topic(t, newSeeds, name, 2)
	var opts [3][]kgo.Opt
	opts[flags.Old], opts[flags.New] = []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}
	w := newWriter(t, oldSeeds, name, 4)
	w.produce(t, ctx, 30)

	l := newLedger()
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "g", Old: opts[flags.Old], New: opts[flags.New],
		Source: newStage(flags.Shadow), Handler: l.handle, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	var wg sync.WaitGroup
	cstop := goRun(t, &wg, ctx, c.Run)
	eventually(t, 30*time.Second, "consumed", func() bool { return l.n.Load() >= 30 })
	cstop()
	wg.Wait()
	w.produce(t, ctx, 10) // produced after the group stopped: unprocessed

	m, err := streams.NewMirror(streams.MirrorConfig{Topic: name, Old: opts[flags.Old], New: opts[flags.New]})
	require.NoError(t, err)
	mstop := goRun(t, &wg, ctx, m.Run)
	eventually(t, 30*time.Second, "mirrored", func() bool { return m.Stats().Copied >= 40 })
	mstop()
	wg.Wait()

	trs, err := streams.Translate(ctx, opts, name, "g", flags.New)
	require.NoError(t, err)
	require.Len(t, trs, 2)
	olds := readAll(t, oldSeeds, name)
	news := readAll(t, newSeeds, name)
	for _, tr := range trs {
		assert.Equal(t, flags.Old, tr.From)
		// The first copy on new whose origin is at or past the group's
		// position on old.
		want := int64(-1)
		for _, r := range news {
			o, err := streams.OriginOf(r, flags.New)
			require.NoError(t, err)
			if r.Partition == tr.Partition && o.Offset >= tr.At && want < 0 {
				want = r.Offset
			}
		}
		assert.Equal(t, want, tr.Next, "partition %d", tr.Partition)
	}
	assert.Len(t, olds, 40)

	_, err = streams.Translate(ctx, opts, name, "nobody", flags.New)
	require.ErrorIs(t, err, streams.ErrUnknownGroup)
}
