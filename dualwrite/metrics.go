package dualwrite

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/dimmer-dev/dimmer/flags"
)

const meterName = "github.com/dimmer-dev/dimmer/dualwrite"

// latencyBounds are in microseconds: from 1 µs (in-memory stores) to 10 s.
var latencyBounds = []float64{1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1e6, 2.5e6, 1e7}

type role uint8

const (
	roleAuthoritative role = iota
	roleSecondary
)

func (r role) String() string {
	if r == roleAuthoritative {
		return "authoritative"
	}
	return "secondary"
}

// metrics holds the instruments and, for the hot path, option slices built
// once per (side, role, outcome) so a call records without allocating.
type metrics struct {
	migration   string
	calls       metric.Int64Counter
	latency     metric.Float64Histogram
	repairs     metric.Int64Counter
	stageErrors metric.Int64Counter
	callOpts    [3][2][2][]metric.AddOption // side, role, failed
	latOpts     [3][2][]metric.RecordOption
	migOpts     []metric.AddOption
}

func newMetrics(mp metric.MeterProvider, migration string) (*metrics, error) {
	m := &metrics{migration: migration}
	meter := mp.Meter(meterName)
	var err error
	if m.calls, err = meter.Int64Counter("dimmer.dualwrite.calls",
		metric.WithDescription("writes per side, by role (authoritative, secondary) and outcome")); err != nil {
		return nil, err
	}
	if m.latency, err = meter.Float64Histogram("dimmer.dualwrite.latency", metric.WithUnit("us"),
		metric.WithDescription("latency of each side's write, in microseconds"),
		metric.WithExplicitBucketBoundaries(latencyBounds...)); err != nil {
		return nil, err
	}
	if m.repairs, err = meter.Int64Counter("dimmer.dualwrite.repairs",
		metric.WithDescription("repairs by outcome (queued, record_failed, replayed, skipped, failed) and reason")); err != nil {
		return nil, err
	}
	if m.stageErrors, err = meter.Int64Counter("dimmer.dualwrite.stage_errors",
		metric.WithDescription("writes routed by the fallback stage because the flag was unavailable")); err != nil {
		return nil, err
	}
	mig := attribute.String("migration", migration)
	m.migOpts = []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(mig))}
	for _, side := range []flags.Side{flags.Old, flags.New} {
		for _, r := range []role{roleAuthoritative, roleSecondary} {
			base := []attribute.KeyValue{mig, attribute.String("origin", side.String()), attribute.String("role", r.String())}
			m.latOpts[side][r] = []metric.RecordOption{metric.WithAttributeSet(attribute.NewSet(base...))}
			for f, outcome := range []string{"ok", "error"} {
				set := attribute.NewSet(append(base[:3:3], attribute.String("outcome", outcome))...)
				m.callOpts[side][r][f] = []metric.AddOption{metric.WithAttributeSet(set)}
			}
		}
	}
	return m, nil
}

func (m *metrics) call(ctx context.Context, side flags.Side, r role, lat time.Duration, failed bool) {
	f := 0
	if failed {
		f = 1
	}
	m.calls.Add(ctx, 1, m.callOpts[side][r][f]...)
	m.latency.Record(ctx, float64(lat)/float64(time.Microsecond), m.latOpts[side][r]...)
}

// repair counts a repair event; repairs are rare, so the attribute set is
// built per event.
func (m *metrics) repair(ctx context.Context, outcome string, reason Reason) {
	m.repairs.Add(ctx, 1, metric.WithAttributes(attribute.String("migration", m.migration),
		attribute.String("outcome", outcome), attribute.String("reason", string(reason))))
}
