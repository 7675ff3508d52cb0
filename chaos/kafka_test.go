package chaos_test

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
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

// metricsOf reads the outbox counters and gauges of one collection, by name.
func metricsOf(t *testing.T, reader *sdkmetric.ManualReader) map[string]int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(context.Background(), &rm))
	out := map[string]int64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					out[m.Name] += p.Value
				}
			case metricdata.Gauge[int64]:
				for _, p := range d.DataPoints {
					out[m.Name] += p.Value
				}
			}
		}
	}
	return out
}

// TestRelayBehindBlackholedKafka: the outbox relay publishes through a
// franz-go client whose every broker connection goes through a chaos link
// (kgo.Dialer), and the link is blackholed for a few seconds while writers
// commit. Either way the client is set up, the messages committed meanwhile
// stay in the outbox (the backlog grows, nothing is delivered, nothing is
// dead-lettered: the outage is shorter than MaxAttempts attempts allow),
// and once healed every one is delivered, per key in commit order, a
// message repeated only if one of its failed attempts reached the broker
// after all.
//
// Either way the relay lives through the outage: kafkasink's Publish
// returns at the relay's PublishTimeout, so failed attempts are counted
// (publish_errors) and rescheduled with backoff (retries), and the relay
// keeps its leases and gauges fresh.
//
//   - With kafkasink.ClientOptions alone (the idempotent producer's
//     defaults), franz-go keeps a record it has sent without an answer and
//     delivers it once the broker is back: a retry of it is then a repeat.
//   - With kgo.AllowIdempotentProduceCancellation and a short
//     RequestTimeoutOverhead, the client gives such records up itself.
func TestRelayBehindBlackholedKafka(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		opts []kgo.Opt
	}{
		{name: "idempotent producer keeps sent records", opts: nil},
		{name: "produce cancellation",
			opts: []kgo.Opt{kgo.AllowIdempotentProduceCancellation(), kgo.RequestTimeoutOverhead(500 * time.Millisecond)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			relayThroughKafkaOutage(t, tc.opts)
		})
	}
}

func relayThroughKafkaOutage(t *testing.T, opts []kgo.Opt) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	led := newLedger(t, ctx, 4, 12)
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, led.topic))
	require.NoError(t, err)
	defer cluster.Close()
	broker := cluster.ListenAddrs()[0]
	link := newLink(t, broker)

	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer mp.Shutdown(context.Background())
	pub := kafkaPublisher(t, append(append(kafkasink.ClientOptions(broker), kgo.Dialer(link.Dial)), opts...)...)
	const maxAttempts = 10
	relay, err := led.o.NewRelay(led.pool, pub, outbox.RelayConfig{
		LeaseTTL: 4 * time.Second, PublishTimeout: time.Second, PollInterval: 50 * time.Millisecond,
		MaxAttempts: maxAttempts, BackoffMin: 100 * time.Millisecond, BackoffMax: 400 * time.Millisecond,
		StatsInterval: 100 * time.Millisecond, MeterProvider: mp, Logger: relayLogger(t, new(atomic.Int64)),
	})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- relay.Run(ctx) }()

	written := 0
	writeRound := func() {
		for _, k := range led.keys {
			_, err := led.write(ctx, k)
			require.NoError(t, err)
			written++
		}
	}
	writeRound()
	// The relay counts a message as published after its acknowledgement is
	// committed, so the outbox can be empty a moment before the counter
	// shows it: wait for both before the outage starts.
	var publishedBefore int64
	require.Eventually(t, func() bool {
		publishedBefore = metricsOf(t, reader)["dimmer.outbox.published"]
		return led.pending(t, ctx).Pending == 0 && publishedBefore == int64(written)
	}, 20*time.Second, 20*time.Millisecond, "delivered while Kafka is reachable")

	require.NoError(t, link.Blackhole(true))
	outage := time.Now()
	before := written
	for range 5 {
		writeRound()
		time.Sleep(100 * time.Millisecond)
	}
	var m map[string]int64
	if !assert.Eventually(t, func() bool {
		m = metricsOf(t, reader)
		return m["dimmer.outbox.publish_errors"] >= int64(2*len(led.keys)) && m["dimmer.outbox.backlog"] == int64(written-before)
	}, 20*time.Second, 20*time.Millisecond, "failed attempts are counted and retried; the backlog gauge shows what waits") {
		t.Fatalf("metrics: %v", m)
	}
	for time.Since(outage) < 3*time.Second {
		time.Sleep(50 * time.Millisecond)
	}
	st := led.pending(t, ctx)
	during := metricsOf(t, reader)
	assert.Equal(t, int64(written-before), st.Pending, "nothing written during the outage was delivered or lost")
	assert.Zero(t, st.Dead, "an outage shorter than the attempts allow makes no dead letter")
	assert.Equal(t, publishedBefore, during["dimmer.outbox.published"], "nothing acknowledged while Kafka is unreachable")
	require.NoError(t, link.Heal())
	t.Logf("Kafka blackholed for %v: %d messages waiting, %d failed attempts, %d retries scheduled",
		time.Since(outage).Round(time.Millisecond), st.Pending, during["dimmer.outbox.publish_errors"], during["dimmer.outbox.retries"])

	writeRound()
	require.Eventually(t, func() bool { return led.pending(t, ctx).Pending == 0 }, 30*time.Second, 20*time.Millisecond,
		"the backlog drains once Kafka is reachable")
	require.NoError(t, relay.Shutdown(ctx))
	require.NoError(t, <-done)

	m = metricsOf(t, reader)
	assert.Zero(t, m["dimmer.outbox.dead_letters"])
	assert.Equal(t, m["dimmer.outbox.publish_errors"], m["dimmer.outbox.retries"], "every failed attempt was rescheduled")
	assert.Equal(t, int64(written), m["dimmer.outbox.published"], "each message acknowledged once")
	dups, records := checkStream(t, ctx, []string{broker}, led.topic, led.committed(t, ctx))
	repeats := 0
	for _, c := range dups {
		repeats += c
	}
	t.Logf("%d messages, %d records consumed, %d repeats, %d failed attempts", written, records, repeats, m["dimmer.outbox.publish_errors"])
	assert.Equal(t, written+repeats, records)
	assert.LessOrEqual(t, int64(repeats), m["dimmer.outbox.publish_errors"], "a repeat needs a failed attempt that reached the broker")
}
