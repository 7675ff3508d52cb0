package streams_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kgo"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/inbox"
	"github.com/dimmer-dev/dimmer/streams"
)

// A record whose origin cannot be read is counted and de-duplicated
// through the inbox on its outbox message id: delivered twice, handled once.
func TestUnknownOriginFallsBackToInbox(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("unknown")
	topic(t, oldSeeds, name, 1)
	topic(t, newSeeds, name, 1)
	pool, schema := dimmertest.Schema(t)
	in, err := inbox.New(schema, "inbox")
	require.NoError(t, err)
	require.NoError(t, in.Install(ctx, pool))

	cl, err := kgo.NewClient(kgo.SeedBrokers(newSeeds...), kgo.DefaultProduceTopic(name))
	require.NoError(t, err)
	defer cl.Close()
	bad := func() *kgo.Record {
		return &kgo.Record{Value: []byte("x 1"), Headers: []kgo.RecordHeader{
			{Key: streams.HeaderOrigin, Value: []byte("somewhere/else")},
			{Key: outbox.HeaderMessageID, Value: []byte("0192f0c0-0000-7000-8000-000000000001")}}}
	}
	require.NoError(t, cl.ProduceSync(ctx, bad(), bad(), &kgo.Record{Value: []byte("y 1")}).FirstErr())

	reader := sdkmetric.NewManualReader()
	l := newLedger()
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "g",
		Old: []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, New: []kgo.Opt{kgo.SeedBrokers(newSeeds...)},
		Source: newStage(flags.Live), Handler: l.handle, PollTimeout: 50 * time.Millisecond,
		UnknownOrigin: streams.InboxDedup(in, pool, "totals"), MeterProvider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))})
	require.NoError(t, err)
	defer c.Close()
	var wg sync.WaitGroup
	stop := goRun(t, &wg, ctx, c.Run)
	eventually(t, 30*time.Second, "three records met", func() bool {
		s := c.Stats()
		return s.Processed == 2 && s.Unknown == 2
	})
	stop()
	wg.Wait()
	assert.Equal(t, 1, l.times["x 1"], "the twice-delivered message is handled once")
	assert.Equal(t, 1, l.times["y 1"])

	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(ctx, &rm))
	byOutcome := map[string]int64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != "dimmer.streams.consumer.records" {
				continue
			}
			for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
				o, _ := dp.Attributes.Value("outcome")
				byOutcome[o.AsString()] += dp.Value
			}
		}
	}
	assert.Equal(t, map[string]int64{"processed": 2, "unknown_origin": 2}, byOutcome)
}
