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

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/streams"
)

// In shadow, every dual-produced record matches its copy; a record old
// holds that never reached new is missing, a record only new holds is
// extra, a copy with another value differs, and a key's copies out of
// origin order are out of order. Each verdict reaches the observer (the
// watchdog's input) as a compared read of new.
func TestShadowComparesPerKey(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("shadow")
	topic(t, oldSeeds, name, 1)
	topic(t, newSeeds, name, 1)
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}
	stage := newStage(flags.Shadow)

	var mu sync.Mutex
	var obs []flags.Observation
	sh, err := streams.NewShadow(streams.ShadowConfig{Migration: "events", Topic: name, Old: oldOpts, New: newOpts, Source: stage,
		Grace: 2 * time.Second, Observer: flags.ObserverFunc(func(o flags.Observation) {
			mu.Lock()
			obs = append(obs, o)
			mu.Unlock()
		})})
	require.NoError(t, err)
	var wg sync.WaitGroup
	sstop := goRun(t, &wg, ctx, sh.Run)
	eventually(t, 20*time.Second, "a session started", func() bool { return sh.Stats().Sessions == 1 })

	p, err := streams.NewProducer("events", name, stage, oldOpts, newOpts, streams.WithRepairLog(nilLog{}))
	require.NoError(t, err)
	for i := range 30 {
		_, err := p.Produce(ctx, &kgo.Record{Key: fmt.Appendf(nil, "k%d", i%3), Value: fmt.Appendf(nil, "v%d", i)})
		require.NoError(t, err)
	}
	require.NoError(t, p.Close(ctx))
	eventually(t, 20*time.Second, "30 matches", func() bool {
		st := sh.Stats()
		if st.Compared > st.Verdicts[streams.Match] {
			t.Fatalf("a dual-produced record did not match: %+v", st)
		}
		return st.Verdicts[streams.Match] == 30
	})

	oldCl, err := kgo.NewClient(append(oldOpts, kgo.DefaultProduceTopic(name))...)
	require.NoError(t, err)
	defer oldCl.Close()
	newCl, err := kgo.NewClient(append(newOpts, kgo.DefaultProduceTopic(name))...)
	require.NoError(t, err)
	defer newCl.Close()
	produced := func(cl *kgo.Client, r *kgo.Record) *kgo.Record {
		out, err := cl.ProduceSync(ctx, r).First()
		require.NoError(t, err)
		return out
	}
	copyOf := func(r *kgo.Record, value string) *kgo.Record {
		return &kgo.Record{Key: r.Key, Value: []byte(value), Headers: []kgo.RecordHeader{
			{Key: streams.HeaderOrigin, Value: []byte(streams.Origin{Side: flags.Old, Partition: r.Partition, Offset: r.Offset}.String())}}}
	}
	produced(oldCl, &kgo.Record{Key: []byte("lost"), Value: []byte("never copied")})    // missing
	produced(newCl, &kgo.Record{Key: []byte("stray"), Value: []byte("only on new")})    // extra
	forged := produced(oldCl, &kgo.Record{Key: []byte("x"), Value: []byte("original")}) // payload
	produced(newCl, copyOf(forged, "altered"))
	a := produced(oldCl, &kgo.Record{Key: []byte("y"), Value: []byte("first")}) // out of order
	b := produced(oldCl, &kgo.Record{Key: []byte("y"), Value: []byte("second")})
	produced(newCl, copyOf(b, "second"))
	produced(newCl, copyOf(a, "first"))

	want := [5]int64{streams.Match: 31, streams.Missing: 1, streams.Extra: 1, streams.Payload: 1, streams.OutOfOrder: 1}
	eventually(t, 20*time.Second, fmt.Sprintf("verdicts %v", want), func() bool { return sh.Stats().Verdicts == want })
	time.Sleep(2500 * time.Millisecond) // past the grace: nothing else is judged
	sstop()
	wg.Wait()
	assert.Equal(t, want, sh.Stats().Verdicts)
	mu.Lock()
	defer mu.Unlock()
	var mismatches int
	for _, o := range obs {
		assert.Equal(t, flags.New, o.Side, "new is the compared side in shadow")
		assert.True(t, o.Compared)
		if o.Mismatch {
			mismatches++
		}
	}
	assert.Len(t, obs, 35)
	assert.Equal(t, 4, mismatches)
}
