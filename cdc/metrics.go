package cdc

import (
	"context"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

const meterName = "github.com/dimmer-dev/dimmer/cdc"

type relayMetrics struct {
	attrs                    metric.MeasurementOption
	published, failed        metric.Int64Counter
	undecodable              metric.Int64Counter
	activeCount              metric.Int64UpDownCounter
	commitToAck, publishTime metric.Float64Histogram
}

func newRelayMetrics(mp metric.MeterProvider, slot string) (*relayMetrics, error) {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	m := mp.Meter(meterName)
	rm := &relayMetrics{attrs: metric.WithAttributes(attribute.String("slot", slot))}
	var err error
	ok := func(e error) {
		if err == nil {
			err = e
		}
	}
	rm.published, err = m.Int64Counter("dimmer.cdc.relay.published", metric.WithDescription("messages acknowledged by the publisher"))
	var e error
	rm.failed, e = m.Int64Counter("dimmer.cdc.relay.publish_failures", metric.WithDescription("records whose publish failed (retried)"))
	ok(e)
	rm.undecodable, e = m.Int64Counter("dimmer.cdc.relay.undecodable", metric.WithDescription("messages with the relay's prefix that could not be decoded (skipped)"))
	ok(e)
	rm.activeCount, e = m.Int64UpDownCounter("dimmer.cdc.relay.active", metric.WithDescription("1 while this process owns the slot"))
	ok(e)
	rm.commitToAck, e = m.Float64Histogram("dimmer.cdc.relay.commit_to_ack", metric.WithUnit("s"), metric.WithDescription("from the transaction's commit to the publisher's acknowledgement"))
	ok(e)
	rm.publishTime, e = m.Float64Histogram("dimmer.cdc.relay.publish_duration", metric.WithUnit("s"))
	ok(e)
	if err != nil {
		return nil, err
	}
	return rm, nil
}

func (m *relayMetrics) active(ctx context.Context, on bool) {
	d := int64(-1)
	if on {
		d = 1
	}
	m.activeCount.Add(ctx, d, m.attrs)
}
