package streams_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/streams"
)

// repairLog installs an outbox in a fresh schema and returns a repair log
// on it.
func repairLog(t *testing.T, migration string) (*streams.OutboxRepairLog, *outbox.Outbox, *pgxpool.Pool) {
	t.Helper()
	pool, schema := dimmertest.Schema(t)
	ob, err := outbox.New(outbox.Config{Schema: schema, Buckets: 4})
	require.NoError(t, err)
	require.NoError(t, ob.Install(context.Background(), pool))
	log, err := streams.NewOutboxRepairLog(ob, pool, migration)
	require.NoError(t, err)
	return log, ob, pool
}

// readAll reads every record of topic on the cluster up to its current
// end offsets, in partition order.
func readAll(t *testing.T, seeds []string, topic string) []*kgo.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer cl.Close()
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, topic)
	require.NoError(t, err)
	want := int64(0)
	ends.Each(func(o kadm.ListedOffset) { want += o.Offset })
	var out []*kgo.Record
	for int64(len(out)) < want {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("read %d of %d records of %s", len(out), want, topic)
		}
		out = append(out, fs.Records()...)
	}
	return out
}

// checkCopies asserts that new holds a copy of every record of old, in the
// same partition, each partition's copies in origin order, and returns the
// number of duplicate copies.
func checkCopies(t *testing.T, olds, news []*kgo.Record) (dups int) {
	t.Helper()
	byOrigin := map[streams.Origin]*kgo.Record{}
	for _, r := range olds {
		byOrigin[streams.Origin{Side: flags.Old, Partition: r.Partition, Offset: r.Offset}] = r
	}
	seen := map[streams.Origin]bool{}
	last := map[int32]int64{}
	for _, r := range news {
		o, err := streams.OriginOf(r, flags.New)
		require.NoError(t, err)
		require.Equal(t, flags.Old, o.Side, "a copy names old as its origin")
		src, ok := byOrigin[o]
		require.True(t, ok, "copy of %v has no original", o)
		assert.Equal(t, src.Partition, r.Partition)
		assert.Equal(t, string(src.Key), string(r.Key))
		assert.Equal(t, string(src.Value), string(r.Value))
		if seen[o] {
			dups++
			continue
		}
		seen[o] = true
		if l, ok := last[r.Partition]; ok {
			assert.Greater(t, o.Offset, l, "partition %d copies in origin order", r.Partition)
		}
		last[r.Partition] = o.Offset
	}
	assert.Len(t, seen, len(olds), "every record of old has a copy on new")
	return dups
}

func TestDualProduceCopiesInOrder(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("dual")
	topic(t, oldSeeds, name, 3)
	topic(t, newSeeds, name, 3)
	log, _, _ := repairLog(t, "events")
	p, err := streams.NewProducer("events", name, newStage(flags.DualWrite),
		[]kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}, streams.WithRepairLog(log))
	require.NoError(t, err)
	const n = 300
	for i := range n {
		o, err := p.Produce(ctx, &kgo.Record{Key: fmt.Appendf(nil, "k%d", i%17), Value: fmt.Appendf(nil, "v%d", i)})
		require.NoError(t, err)
		assert.Equal(t, flags.Old, o.Side, "old acknowledges in dualwrite")
	}
	require.NoError(t, p.Flush(ctx))
	require.NoError(t, p.Close(ctx))
	st := p.Stats()
	assert.EqualValues(t, n, st.Produced)
	assert.EqualValues(t, n, st.Copied)
	assert.Zero(t, st.Repairs)
	assert.Zero(t, checkCopies(t, readAll(t, oldSeeds, name), readAll(t, newSeeds, name)))
}

func TestNewProducerNamesWhatIsMissing(t *testing.T) {
	t.Parallel()
	opts := []kgo.Opt{kgo.SeedBrokers("127.0.0.1:1")}
	_, err := streams.NewProducer("events", "t", newStage(flags.Off), opts, nil, streams.WithRepairLog(nilLog{}))
	require.ErrorIs(t, err, streams.ErrMissingCluster)
	assert.Contains(t, err.Error(), "new")
	_, err = streams.NewProducer("events", "t", newStage(flags.Off), opts, opts)
	require.ErrorContains(t, err, "WithRepairLog is required")
	_, err = streams.NewProducer("Bad Name", "t", newStage(flags.Off), opts, opts, streams.WithRepairLog(nilLog{}))
	require.ErrorIs(t, err, flags.ErrInvalidName)
}

type nilLog struct{}

func (nilLog) Record(context.Context, streams.Repair) error { return errors.New("no log") }
func (nilLog) Pending(context.Context) (int64, error)       { return 0, nil }

// The new cluster refuses every produce request (its connections are
// closed) while the producer dual-writes: callers keep their results from
// old, the copies become repairs in the outbox, and after the cluster heals
// the repair relay replays them, each partition in origin order.
func TestDualProduceRepairsAfterOutage(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	oldC, err := kfake.NewCluster(kfake.NumBrokers(1))
	require.NoError(t, err)
	defer oldC.Close()
	newC, err := kfake.NewCluster(kfake.NumBrokers(1))
	require.NoError(t, err)
	defer newC.Close()
	oldSeeds, newSeeds := oldC.ListenAddrs(), newC.ListenAddrs()
	name := uniqueTopic("outage")
	topic(t, oldSeeds, name, 3)
	topic(t, newSeeds, name, 3)

	// A blackhole: while down, the new cluster takes produce requests and
	// answers none of them (until healed).
	var down atomic.Bool
	var healMu sync.Mutex
	healed := make(chan struct{})
	newC.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		newC.KeepControl()
		if down.Load() {
			healMu.Lock()
			h := healed
			healMu.Unlock()
			newC.SleepControl(func() { <-h })
		}
		return nil, nil, false
	})
	heal := func() {
		healMu.Lock()
		down.Store(false)
		close(healed)
		healed = make(chan struct{})
		healMu.Unlock()
	}

	log, ob, pool := repairLog(t, "events")
	p, err := streams.NewProducer("events", name, newStage(flags.DualWrite),
		[]kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)},
		streams.WithRepairLog(log), streams.WithCopyTimeout(time.Second), streams.WithHealCheck(50*time.Millisecond))
	require.NoError(t, err)
	produce := func(from, to int) (p99 time.Duration) {
		var lat []time.Duration
		for i := from; i < to; i++ {
			start := time.Now()
			_, err := p.Produce(ctx, &kgo.Record{Key: fmt.Appendf(nil, "k%d", i%11), Value: fmt.Appendf(nil, "v%d", i)})
			lat = append(lat, time.Since(start))
			require.NoError(t, err, "the caller's result is old's")
		}
		slices.Sort(lat)
		return lat[len(lat)*99/100]
	}
	before := produce(0, 100)
	require.NoError(t, p.Flush(ctx))
	down.Store(true)
	during := produce(100, 300)
	t.Logf("caller p99 before the blackhole %s, during %s", before, during)
	assert.Less(t, during, time.Second, "the caller never waits for the blackholed cluster (copy timeout 1s)")
	require.NoError(t, p.Flush(ctx))
	st := p.Stats()
	assert.Positive(t, st.Repairs, "copies that could not reach new are repairs")
	pending, err := log.Pending(ctx)
	require.NoError(t, err)
	assert.Equal(t, st.Repairs, pending, "every repair is in the outbox")

	heal()
	produce(300, 400) // still behind the repairs: they go to the log too
	oldCl, err := kgo.NewClient(kgo.SeedBrokers(oldSeeds...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	require.NoError(t, err)
	defer oldCl.Close()
	newCl, err := kgo.NewClient(kgo.SeedBrokers(newSeeds...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	require.NoError(t, err)
	defer newCl.Close()
	relay, err := streams.NewRepairRelay(ob, pool, outbox.RelayConfig{PollInterval: 20 * time.Millisecond}, oldCl, newCl)
	require.NoError(t, err)
	rctx, rstop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- relay.Run(rctx) }()
	eventually(t, 30*time.Second, "repairs replayed", func() bool {
		_ = p.Flush(ctx)
		n, err := log.Pending(ctx)
		return err == nil && n == 0 && p.Stats().RepairingPartitions == 0
	})
	copied := p.Stats().Copied
	produce(400, 500) // healed: copied directly again
	require.NoError(t, p.Close(ctx))
	rstop()
	if err := <-done; !errors.Is(err, context.Canceled) {
		require.NoError(t, err)
	}
	st = p.Stats()
	assert.EqualValues(t, copied+100, st.Copied, "after the heal copies go directly")
	dups := checkCopies(t, readAll(t, oldSeeds, name), readAll(t, newSeeds, name))
	t.Logf("producer %+v, duplicate copies %d", st, dups)
}
