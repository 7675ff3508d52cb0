package shadowread

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/dimmer-dev/dimmer/flags"
)

const meterName = "github.com/dimmer-dev/dimmer/shadowread"

var latencyBounds = []float64{1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1e6, 2.5e6, 1e7}

type role uint8

const (
	roleServed role = iota
	roleShadow
	roleRecheck // re-reads: not counted as calls
)

func (r role) String() string {
	if r == roleServed {
		return "served"
	}
	return "shadow"
}

type result uint8

const (
	resMatch result = iota
	resMismatch
	resTransient
	resShadowError
	resShed
	resPanic
	numResults
)

var resultNames = [numResults]string{"match", "mismatch", "transient", "shadow_error", "shed", "panic"}

type metrics struct {
	calls          metric.Int64Counter
	latency        metric.Float64Histogram
	comparisons    metric.Int64Counter
	stageErrors    metric.Int64Counter
	reportsDropped metric.Int64Counter
	// rechecksSkipped counts mismatches left lasting because too many
	// re-reads were pending or the reader was shutting down.
	rechecksSkipped metric.Int64Counter
	callOpts        [3][2][2][]metric.AddOption
	latOpts         [3][2][]metric.RecordOption
	resOpts         [numResults][]metric.AddOption
	migOpts         []metric.AddOption
}

func newMetrics(mp metric.MeterProvider, migration string) (*metrics, error) {
	m := &metrics{}
	meter := mp.Meter(meterName)
	var err error
	if m.calls, err = meter.Int64Counter("dimmer.shadowread.calls",
		metric.WithDescription("reads per side, by role (served, shadow) and outcome")); err != nil {
		return nil, err
	}
	if m.latency, err = meter.Float64Histogram("dimmer.shadowread.latency", metric.WithUnit("us"),
		metric.WithDescription("latency of each side's read, in microseconds"),
		metric.WithExplicitBucketBoundaries(latencyBounds...)); err != nil {
		return nil, err
	}
	if m.comparisons, err = meter.Int64Counter("dimmer.shadowread.comparisons",
		metric.WithDescription("shadow comparisons by result: match, mismatch (lasting), transient, shadow_error, shed, panic")); err != nil {
		return nil, err
	}
	if m.stageErrors, err = meter.Int64Counter("dimmer.shadowread.stage_errors",
		metric.WithDescription("reads routed by the fallback stage because the flag was unavailable")); err != nil {
		return nil, err
	}
	if m.reportsDropped, err = meter.Int64Counter("dimmer.shadowread.reports_dropped",
		metric.WithDescription("mismatch reports not sent because of the report interval")); err != nil {
		return nil, err
	}
	if m.rechecksSkipped, err = meter.Int64Counter("dimmer.shadowread.rechecks_skipped",
		metric.WithDescription("mismatches counted lasting without a re-read: too many re-reads pending, or shutting down")); err != nil {
		return nil, err
	}
	mig := attribute.String("migration", migration)
	m.migOpts = []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(mig))}
	for i, name := range resultNames {
		m.resOpts[i] = []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(mig, attribute.String("result", name)))}
	}
	for _, side := range []flags.Side{flags.Old, flags.New} {
		for _, r := range []role{roleServed, roleShadow} {
			base := []attribute.KeyValue{mig, attribute.String("origin", side.String()), attribute.String("role", r.String())}
			m.latOpts[side][r] = []metric.RecordOption{metric.WithAttributeSet(attribute.NewSet(base...))}
			for f, outcome := range []string{"ok", "error"} {
				m.callOpts[side][r][f] = []metric.AddOption{metric.WithAttributeSet(attribute.NewSet(append(base[:3:3], attribute.String("outcome", outcome))...))}
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

func (m *metrics) compared(ctx context.Context, r result) { m.comparisons.Add(ctx, 1, m.resOpts[r]...) }
