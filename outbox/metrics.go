package outbox

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

const meterName = "github.com/dimmer-dev/dimmer/outbox"

type metrics struct {
	attrs         metric.MeasurementOption
	published     metric.Int64Counter
	publishErrors metric.Int64Counter
	retries       metric.Int64Counter
	deadLetters   metric.Int64Counter
	commitToAck   metric.Float64Histogram

	backlog   atomic.Int64
	oldestAge atomic.Int64 // nanoseconds
	dead      atomic.Int64
}

func newMetrics(mp metric.MeterProvider, o *Outbox) (*metrics, error) {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	meter := mp.Meter(meterName)
	m := &metrics{attrs: metric.WithAttributes(attribute.String("outbox", o.cfg.Schema+"."+o.cfg.Table))}
	var err error
	wrap := func(e error) {
		if e != nil && err == nil {
			err = fmt.Errorf("outbox: metrics: %w", e)
		}
	}
	m.published, err = meter.Int64Counter("dimmer.outbox.published", metric.WithDescription("Messages published and acknowledged by the broker."), metric.WithUnit("{message}"))
	var e error
	m.publishErrors, e = meter.Int64Counter("dimmer.outbox.publish_errors", metric.WithDescription("Failed publish attempts."), metric.WithUnit("{message}"))
	wrap(e)
	m.retries, e = meter.Int64Counter("dimmer.outbox.retries", metric.WithDescription("Messages scheduled for another attempt after a failure."), metric.WithUnit("{message}"))
	wrap(e)
	m.deadLetters, e = meter.Int64Counter("dimmer.outbox.dead_letters", metric.WithDescription("Messages that became dead letters."), metric.WithUnit("{message}"))
	wrap(e)
	m.commitToAck, e = meter.Float64Histogram("dimmer.outbox.commit_to_ack", metric.WithDescription("Time from the outbox row's insert to the broker's acknowledgement."), metric.WithUnit("s"),
		metric.WithExplicitBucketBoundaries(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
	wrap(e)
	_, e = meter.Int64ObservableGauge("dimmer.outbox.backlog", metric.WithDescription("Undelivered messages in the buckets this relay leases (dead letters included)."), metric.WithUnit("{message}"),
		metric.WithInt64Callback(func(_ context.Context, obs metric.Int64Observer) error {
			obs.Observe(m.backlog.Load(), m.attrs.(metric.ObserveOption))
			return nil
		}))
	wrap(e)
	_, e = meter.Float64ObservableGauge("dimmer.outbox.oldest_age", metric.WithDescription("Age of the oldest undelivered message in the buckets this relay leases."), metric.WithUnit("s"),
		metric.WithFloat64Callback(func(_ context.Context, obs metric.Float64Observer) error {
			obs.Observe(time.Duration(m.oldestAge.Load()).Seconds(), m.attrs.(metric.ObserveOption))
			return nil
		}))
	wrap(e)
	_, e = meter.Int64ObservableGauge("dimmer.outbox.dead", metric.WithDescription("Dead letters in the buckets this relay leases."), metric.WithUnit("{message}"),
		metric.WithInt64Callback(func(_ context.Context, obs metric.Int64Observer) error {
			obs.Observe(m.dead.Load(), m.attrs.(metric.ObserveOption))
			return nil
		}))
	wrap(e)
	if err != nil {
		return nil, err
	}
	return m, nil
}

// refreshStatsEvery refreshes the gauges every interval until ctx ends.
// The first refresh waits an interval too: a relay just started holds no
// buckets yet, and counting then would only add a query on a cold
// connection to its start.
func (r *Relay) refreshStatsEvery(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.refreshStats(ctx)
	}
}

// refreshStats updates the gauges for the buckets this relay leases, so the
// sum over relays is the whole outbox.
func (r *Relay) refreshStats(ctx context.Context) {
	bs := toInt32(r.Buckets())
	var n, dead int64
	var age float64
	err := r.pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE dead_at IS NOT NULL),
	coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8
FROM `+r.o.table+` WHERE bucket = ANY($1::int4[])`, bs).Scan(&n, &dead, &age)
	if err != nil {
		if ctx.Err() == nil {
			r.log.Warn("outbox stats refresh failed", "err", err)
		}
		return
	}
	r.m.backlog.Store(n)
	r.m.dead.Store(dead)
	r.m.oldestAge.Store(int64(age * float64(time.Second)))
}
