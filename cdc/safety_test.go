package cdc_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
)

// A slot without a reader keeps the WAL written after it: the gauges show
// it, and the guard refuses transitions past the bound.
func TestSlotMetricsAndGuard(t *testing.T) {
	t.Parallel()
	_, pool := logicalDB(t)
	ctx := tctx(t, time.Minute)
	name := slot(t, pool, cdc.SlotSpec{Purpose: "relay"})
	_, err := pool.Exec(ctx, `CREATE TABLE filler AS SELECT i, repeat('x', 200) AS pad FROM generate_series(1, 20000) i`)
	require.NoError(t, err)

	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	stop, err := cdc.ObserveSlots(pool, "", mp)
	require.NoError(t, err)
	defer stop()
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(ctx, &rm))
	got := map[string]int64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			g, ok := m.Data.(metricdata.Gauge[int64])
			require.True(t, ok, m.Name)
			for _, p := range g.DataPoints {
				s, _ := p.Attributes.Value("slot")
				require.Equal(t, name, s.AsString())
				got[m.Name] = p.Value
			}
		}
	}
	assert.Greater(t, got["dimmer.cdc.slot.retained"], int64(1<<20), "20k rows of WAL retained")
	assert.Greater(t, got["dimmer.cdc.slot.lag"], int64(1<<20))
	assert.Equal(t, int64(0), got["dimmer.cdc.slot.active"])

	g := cdc.SlotGuard{Pool: pool, MaxRetained: 1 << 20}
	err = g.Check(ctx, flags.Transition{})
	require.ErrorIs(t, err, cdc.ErrRetainedWAL)
	assert.Contains(t, err.Error(), name)
	require.NoError(t, cdc.SlotGuard{Pool: pool, MaxRetained: 1 << 40}.Check(ctx, flags.Transition{}))
}

// A connection string that does not parse is refused without quoting it:
// pgx's own mask stops at an escaped or quoted space, so the rest of the
// password would show.
func TestUnparsableConnStringNotQuoted(t *testing.T) {
	for _, s := range []string{`host=127.0.0.1 password=Cut\ S3cretPw port=notaport`, `host=127.0.0.1 password='Cut S3cretPw`} {
		_, err := cdc.NewSync(s, nil, cdc.SyncConfig{Name: "s", Source: backfill.Table{Name: "a"}, Target: backfill.Table{Name: "b"}})
		require.ErrorIs(t, err, cdc.ErrInvalidConfig)
		assert.NotContains(t, err.Error(), "S3cretPw")
		_, err = cdc.NewRelay(s, outbox.PublisherFunc(func(context.Context, []outbox.Record) []error { return nil }), cdc.RelayConfig{})
		require.ErrorIs(t, err, cdc.ErrInvalidConfig)
		assert.NotContains(t, err.Error(), "S3cretPw")
	}
}
