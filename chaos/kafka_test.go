package chaos_test

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
)

// A Kafka broker unreachable for a while through kgo's dial seam: records
// produced meanwhile wait in the client, and after healing every one is
// delivered, in order per key.
func TestKafkaBlackholedThenHealed(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, "events"))
	require.NoError(t, err)
	defer cluster.Close()
	broker := cluster.ListenAddrs()[0]
	link := newLink(t, broker)

	prod, err := kgo.NewClient(kgo.SeedBrokers(broker), kgo.Dialer(link.Dial),
		kgo.DefaultProduceTopic("events"), kgo.RecordPartitioner(kgo.StickyKeyPartitioner(nil)),
		kgo.RequestTimeoutOverhead(500*time.Millisecond), kgo.RecordDeliveryTimeout(30*time.Second))
	require.NoError(t, err)
	defer prod.Close()

	const keys, perKey = 4, 25
	var failed atomic.Int64
	produce := func(from, to int) {
		for n := from; n < to; n++ {
			for k := range keys {
				prod.Produce(ctx, &kgo.Record{Key: []byte(fmt.Sprintf("k%d", k)), Value: []byte(strconv.Itoa(n))},
					func(_ *kgo.Record, err error) {
						if err != nil {
							failed.Add(1)
						}
					})
			}
		}
	}
	produce(0, 5)
	require.NoError(t, prod.Flush(ctx))

	require.NoError(t, link.Blackhole(true))
	produce(5, perKey)
	flushCtx, flushCancel := context.WithTimeout(ctx, 700*time.Millisecond)
	require.Error(t, prod.Flush(flushCtx), "records must wait while the broker is unreachable")
	flushCancel()
	require.Positive(t, prod.BufferedProduceRecords(), "records accumulate in the client")

	require.NoError(t, link.Heal())
	require.NoError(t, prod.Flush(ctx), "every buffered record is delivered after healing")
	require.Zero(t, failed.Load(), "no record failed")

	cons, err := kgo.NewClient(kgo.SeedBrokers(broker), kgo.ConsumeTopics("events"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer cons.Close()
	next := map[string]int{}
	for got := 0; got < keys*perKey; {
		fs := cons.PollFetches(ctx)
		require.NoError(t, fs.Err0())
		fs.EachRecord(func(r *kgo.Record) {
			v, err := strconv.Atoi(string(r.Value))
			require.NoError(t, err)
			require.Equal(t, next[string(r.Key)], v, "key %s out of order or duplicated", r.Key)
			next[string(r.Key)]++
			got++
		})
	}
	for k := range keys {
		require.Equal(t, perKey, next[fmt.Sprintf("k%d", k)])
	}
}
