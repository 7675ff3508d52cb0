package console

import (
	"context"
	"errors"
	"net/http"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/dimmer-dev/dimmer/flags"
)

// WithMetrics serves h (for example a Prometheus handler over the meter
// provider [Server.RegisterMetrics] was given) at GET /metrics, behind the
// same token as every other request: a Prometheus scrape config sends it
// with `authorization: {credentials: ...}`.
func WithMetrics(h http.Handler) Option {
	return func(s *Server) error {
		if h == nil {
			return errors.New("WithMetrics: handler is nil")
		}
		s.metrics = h
		return nil
	}
}

// RegisterMetrics publishes what the pages show as observable gauges on
// meter, read from the flag store and the fleet registry when the meter is
// collected (a scrape), never on a service's hot path:
//
//	dimmer.migration.stage{migration}            stage index: 0 off ... 5 complete
//	dimmer.migration.rollout{migration,stage}    percent of keys served the rollout stage
//	dimmer.migration.revision{migration}
//	dimmer.migration.instances_behind{migration} live instances not on the current revision
//	dimmer.fleet.instances                       live instances
//	dimmer.window.ops|errors|compared|lasting|transient{migration,stage}
//	dimmer.window.error_rate|mismatch_rate{migration,stage}
//	dimmer.window.p99{migration,stage}           seconds
//
// The window figures are the sums of the rolling windows the fleet
// publishes with its heartbeats (the watchdog's), as the health guard and
// the page judge them. Unregister the returned registration to stop.
func (s *Server) RegisterMetrics(meter metric.Meter) (metric.Registration, error) {
	var gauges []metric.Observable
	fg := func(name, unit, desc string) metric.Float64ObservableGauge {
		g, err := meter.Float64ObservableGauge(name, metric.WithUnit(unit), metric.WithDescription(desc))
		if err != nil {
			s.logger.Warn("console metric not registered", "metric", name, "err", err)
		}
		gauges = append(gauges, g)
		return g
	}
	ig := func(name, unit, desc string) metric.Int64ObservableGauge {
		g, err := meter.Int64ObservableGauge(name, metric.WithUnit(unit), metric.WithDescription(desc))
		if err != nil {
			s.logger.Warn("console metric not registered", "metric", name, "err", err)
		}
		gauges = append(gauges, g)
		return g
	}
	stage := ig("dimmer.migration.stage", "{stage}", "stage index of the migration: 0 off, 1 dualwrite, 2 shadow, 3 live, 4 rampdown, 5 complete")
	rollout := fg("dimmer.migration.rollout", "%", "percent of keys served the rollout stage")
	revision := ig("dimmer.migration.revision", "{revision}", "flag revision of the migration")
	behind := ig("dimmer.migration.instances_behind", "{instance}", "live instances that have not applied the current revision")
	live := ig("dimmer.fleet.instances", "{instance}", "live instances in the fleet registry")
	ops := ig("dimmer.window.ops", "{operation}", "new-side operations in the fleet's watchdog windows")
	errs := ig("dimmer.window.errors", "{operation}", "failed new-side operations in the fleet's watchdog windows")
	compared := ig("dimmer.window.compared", "{comparison}", "shadow comparisons in the fleet's watchdog windows")
	lasting := ig("dimmer.window.lasting", "{comparison}", "lasting mismatches in the fleet's watchdog windows")
	transient := ig("dimmer.window.transient", "{comparison}", "transient mismatches in the fleet's watchdog windows")
	errRate := fg("dimmer.window.error_rate", "1", "new-side error rate of the fleet's watchdog windows")
	mmRate := fg("dimmer.window.mismatch_rate", "1", "lasting mismatch rate of the fleet's watchdog windows")
	p99 := fg("dimmer.window.p99", "s", "highest new-side p99 latency among the fleet's watchdog windows")
	for _, g := range gauges {
		if g == nil {
			return nil, errors.New("console.RegisterMetrics: a gauge could not be created")
		}
	}
	return meter.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		all, _, err := s.migrations(ctx)
		if err != nil {
			return err
		}
		insts, err := s.fleet.Instances(ctx)
		if err != nil {
			return err
		}
		o.ObserveInt64(live, int64(len(insts)))
		for _, st := range all {
			m := attribute.String("migration", st.Migration)
			o.ObserveInt64(stage, int64(st.Stage), metric.WithAttributes(m))
			o.ObserveInt64(revision, st.Revision, metric.WithAttributes(m))
			if st.Rollout != nil {
				o.ObserveFloat64(rollout, st.Rollout.Percent, metric.WithAttributes(m, attribute.String("stage", st.Rollout.Stage.String())))
			}
			n := 0
			for _, in := range insts {
				if in.Applied[st.Migration] < st.Revision {
					n++
				}
			}
			o.ObserveInt64(behind, int64(n), metric.WithAttributes(m))
			for _, sg := range flags.Stages() {
				h, reporting := flags.FleetHealth(insts, st.Migration, sg)
				if reporting == 0 {
					continue
				}
				a := metric.WithAttributes(m, attribute.String("stage", sg.String()))
				o.ObserveInt64(ops, h.Ops, a)
				o.ObserveInt64(errs, h.Errors, a)
				o.ObserveInt64(compared, h.Compared, a)
				o.ObserveInt64(lasting, h.Lasting, a)
				o.ObserveInt64(transient, h.Mismatches-h.Lasting, a)
				o.ObserveFloat64(errRate, h.ErrorRate(), a)
				o.ObserveFloat64(mmRate, h.MismatchRate(), a)
				o.ObserveFloat64(p99, h.P99.Seconds(), a)
			}
		}
		return nil
	}, gauges...)
}
