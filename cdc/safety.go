package cdc

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/dimmer-dev/dimmer/flags"
)

// ErrRetainedWAL: a slot keeps more WAL than the bound set for it, or has
// lost WAL it needed (wal_status lost), or is registered but gone.
var ErrRetainedWAL = errors.New("cdc: replication slot over its WAL bound, lost or missing")

// CheckSlots returns an error wrapping [ErrRetainedWAL] naming every
// registered slot (in schema, default "dimmer") that retains more than
// maxRetained bytes of WAL, has lost WAL, or no longer exists. An idle
// reader's slot pins WAL until the disk fills: alarm on it, and drop slots
// that are not needed ([DropSlot], `dimmer cdc drop`).
func CheckSlots(ctx context.Context, pool *pgxpool.Pool, schema string, maxRetained int64) error {
	st, err := Slots(ctx, pool, schema)
	if err != nil {
		return err
	}
	var bad []string
	for _, s := range st {
		switch {
		case !s.Exists:
			bad = append(bad, fmt.Sprintf("%s is registered but does not exist", s.Slot))
		case s.WALStatus == "lost":
			bad = append(bad, fmt.Sprintf("%s has lost WAL it needed (wal_status lost): drop it and sync again", s.Slot))
		case maxRetained > 0 && s.RetainedBytes > maxRetained:
			bad = append(bad, fmt.Sprintf("%s retains %d bytes of WAL (bound %d; reader %s)", s.Slot, s.RetainedBytes, maxRetained, activity(s)))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("%w: %s", ErrRetainedWAL, strings.Join(bad, "; "))
	}
	return nil
}

func activity(s SlotStatus) string {
	if s.Active {
		return fmt.Sprintf("active, process %d", s.ActivePID)
	}
	return "not connected"
}

// SlotGuard is a [flags.Guard] refusing every stage transition while a
// registered slot retains more WAL than MaxRetained (or lost WAL): moving a
// migration on while its capture lags or leaks is how disks fill up.
type SlotGuard struct {
	Pool        *pgxpool.Pool
	Schema      string
	MaxRetained int64
}

var _ flags.Guard = SlotGuard{}

// Name implements flags.Guard.
func (SlotGuard) Name() string { return "cdc-slots" }

// Applies implements flags.Guard: every transition.
func (SlotGuard) Applies(flags.Transition) bool { return true }

// Check implements flags.Guard.
func (g SlotGuard) Check(ctx context.Context, _ flags.Transition) error {
	return CheckSlots(ctx, g.Pool, g.Schema, g.MaxRetained)
}

// ObserveSlots reports every registered slot's lag and retained WAL as
// OpenTelemetry gauges (dimmer.cdc.slot.lag, dimmer.cdc.slot.retained, in
// bytes, and dimmer.cdc.slot.active), read from the server at each
// collection. Call the returned function to stop.
func ObserveSlots(pool *pgxpool.Pool, schema string, mp metric.MeterProvider) (stop func() error, err error) {
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	m := mp.Meter(meterName)
	lag, err := m.Int64ObservableGauge("dimmer.cdc.slot.lag", metric.WithUnit("By"),
		metric.WithDescription("WAL written since the slot's confirmed position"))
	if err != nil {
		return nil, err
	}
	retained, err := m.Int64ObservableGauge("dimmer.cdc.slot.retained", metric.WithUnit("By"),
		metric.WithDescription("WAL the server keeps for the slot"))
	if err != nil {
		return nil, err
	}
	active, err := m.Int64ObservableGauge("dimmer.cdc.slot.active", metric.WithDescription("1 while a reader holds the slot"))
	if err != nil {
		return nil, err
	}
	reg, err := m.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		st, err := Slots(ctx, pool, schema)
		if err != nil {
			return err
		}
		for _, s := range st {
			attrs := metric.WithAttributes(attribute.String("slot", s.Slot), attribute.String("purpose", s.Purpose))
			o.ObserveInt64(lag, s.LagBytes, attrs)
			o.ObserveInt64(retained, s.RetainedBytes, attrs)
			a := int64(0)
			if s.Active {
				a = 1
			}
			o.ObserveInt64(active, a, attrs)
		}
		return nil
	}, lag, retained, active)
	if err != nil {
		return nil, err
	}
	return reg.Unregister, nil
}
