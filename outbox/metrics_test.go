package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/dimmer-dev/dimmer/outbox"
)

// collected flattens one collection: counters and gauges by name (their
// single data point, checked to carry the outbox attribute), and the
// commit-to-ack histogram.
type collected struct {
	ints   map[string]int64
	floats map[string]float64
	ack    metricdata.HistogramDataPoint[float64]
}

func collect(t *testing.T, reader *sdkmetric.ManualReader, outboxName string) collected {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(context.Background(), &rm))
	c := collected{ints: map[string]int64{}, floats: map[string]float64{}}
	want := attribute.NewSet(attribute.String("outbox", outboxName))
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				require.Len(t, d.DataPoints, 1, m.Name)
				assert.Equal(t, want, d.DataPoints[0].Attributes, m.Name)
				c.ints[m.Name] = d.DataPoints[0].Value
			case metricdata.Gauge[int64]:
				require.Len(t, d.DataPoints, 1, m.Name)
				assert.Equal(t, want, d.DataPoints[0].Attributes, m.Name)
				c.ints[m.Name] = d.DataPoints[0].Value
			case metricdata.Gauge[float64]:
				require.Len(t, d.DataPoints, 1, m.Name)
				c.floats[m.Name] = d.DataPoints[0].Value
			case metricdata.Histogram[float64]:
				require.Len(t, d.DataPoints, 1, m.Name)
				assert.Equal(t, want, d.DataPoints[0].Attributes, m.Name)
				c.ack = d.DataPoints[0]
			}
		}
	}
	return c
}

// TestMetrics: published, publish errors, retries, dead letters,
// commit-to-ack latency, and the backlog / oldest-age / dead gauges, read
// through an OpenTelemetry ManualReader while a relay meets a flaky
// message (fails once, then goes through) and a poison one (dies after
// MaxAttempts, holding back two messages of its key).
func TestMetrics(t *testing.T) {
	t.Parallel()
	pool, o := setup(t, outbox.Config{Buckets: 2})
	ctx := tctx(t, 30*time.Second)
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer mp.Shutdown(context.Background())

	var mu sync.Mutex
	flakyFailed := false
	pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
		mu.Lock()
		defer mu.Unlock()
		errs := make([]error, len(b))
		for i, r := range b {
			switch {
			case r.Key == "poison":
				errs[i] = errors.New("rejected")
			case r.Key == "flaky" && !flakyFailed:
				flakyFailed = true
				errs[i] = errors.New("leader moved")
			}
		}
		return errs
	})
	for i := range 5 {
		_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: fmt.Sprint("good", i)})
		require.NoError(t, err)
	}
	for _, k := range []string{"flaky", "poison", "poison", "poison"} {
		_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: k})
		require.NoError(t, err)
	}
	time.Sleep(20 * time.Millisecond) // the oldest message has an age to report

	r, err := o.NewRelay(pool, pub, outbox.RelayConfig{MeterProvider: mp, MaxAttempts: 2, PollInterval: 10 * time.Millisecond,
		BackoffMin: 5 * time.Millisecond, BackoffMax: 10 * time.Millisecond, StatsInterval: 10 * time.Millisecond, Logger: quiet(t)})
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	defer func() { require.NoError(t, r.Shutdown(ctx)); <-done }()

	name := o.Config().Schema + ".outbox"
	var c collected
	require.Eventually(t, func() bool {
		c = collect(t, reader, name)
		return c.ints["dimmer.outbox.dead_letters"] == 1 && c.ints["dimmer.outbox.dead"] == 1 && c.ints["dimmer.outbox.backlog"] == 3
	}, 10*time.Second, 10*time.Millisecond, "the poison message dies and the gauges catch up")

	assert.Equal(t, int64(6), c.ints["dimmer.outbox.published"], "5 good + the flaky one")
	assert.Equal(t, int64(3), c.ints["dimmer.outbox.publish_errors"], "flaky once, poison twice")
	assert.Equal(t, int64(2), c.ints["dimmer.outbox.retries"], "flaky and the poison's first failure were rescheduled")
	assert.Equal(t, int64(1), c.ints["dimmer.outbox.dead_letters"])
	assert.Equal(t, int64(3), c.ints["dimmer.outbox.backlog"], "the dead letter and the two it holds back")
	assert.Equal(t, int64(1), c.ints["dimmer.outbox.dead"])
	assert.Greater(t, c.floats["dimmer.outbox.oldest_age"], 0.02, "the poison message has waited since before the relay started")
	assert.Equal(t, uint64(6), c.ack.Count, "one commit-to-ack sample per published message")
	assert.Greater(t, c.ack.Sum, 6*0.02, "each waited at least the 20ms before the relay started")
	assert.Less(t, c.ack.Sum, 6*10.0)
}
