package console_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/dimmer-dev/dimmer/flags"
)

func TestMetricsReadTheStoreAtCollection(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	walk(t, e)
	e.beat(t, "api-1", "orders", 2, health("orders", flags.Shadow, flags.Health{Ops: 400, Errors: 4, Compared: 400, Mismatches: 10, Lasting: 2}))
	e.beat(t, "api-2", "orders", 1, nil)
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	reg, err := e.srv.RegisterMetrics(mp.Meter("console-test"))
	require.NoError(t, err)
	defer reg.Unregister()

	collect := func() map[string]map[string]float64 {
		var rm metricdata.ResourceMetrics
		require.NoError(t, reader.Collect(ctx(t), &rm))
		out := map[string]map[string]float64{}
		for _, sm := range rm.ScopeMetrics {
			for _, m := range sm.Metrics {
				out[m.Name] = map[string]float64{}
				key := func(s attribute.Set) string { return s.Encoded(attribute.DefaultEncoder()) }
				switch d := m.Data.(type) {
				case metricdata.Gauge[int64]:
					for _, p := range d.DataPoints {
						out[m.Name][key(p.Attributes)] = float64(p.Value)
					}
				case metricdata.Gauge[float64]:
					for _, p := range d.DataPoints {
						out[m.Name][key(p.Attributes)] = p.Value
					}
				}
			}
		}
		return out
	}
	got := collect()
	assert.Equal(t, map[string]float64{"migration=orders": 2}, got["dimmer.migration.stage"])
	assert.Equal(t, map[string]float64{"migration=orders": 2}, got["dimmer.migration.revision"])
	assert.Equal(t, map[string]float64{"migration=orders": 1}, got["dimmer.migration.instances_behind"])
	assert.Equal(t, map[string]float64{"": 2}, got["dimmer.fleet.instances"])
	assert.Equal(t, map[string]float64{"migration=orders,stage=shadow": 8}, got["dimmer.window.transient"])
	assert.InDelta(t, 0.01, got["dimmer.window.error_rate"]["migration=orders,stage=shadow"], 1e-9)
	assert.InDelta(t, 0.005, got["dimmer.window.mismatch_rate"]["migration=orders,stage=shadow"], 1e-9)

	_, err = e.ctrl.Rollout(ctx(t), "orders", flags.Live, 5, "alice", "canary")
	require.Error(t, err, "guards still fail: api-2 is behind")
	_, err = e.ctrl.Set(ctx(t), flags.Request{Migration: "orders", Stage: flags.Live, Percent: 5, Actor: "alice", Reason: "canary", Force: true})
	require.NoError(t, err)
	got = collect()
	assert.Equal(t, map[string]float64{"migration=orders": 3}, got["dimmer.migration.revision"], "read at collection, not cached")
	assert.Equal(t, map[string]float64{"migration=orders,stage=live": 5}, got["dimmer.migration.rollout"])
}
