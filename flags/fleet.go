package flags

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"time"
)

// Heartbeater keeps an instance registered in the fleet registry: every
// interval it reports the flag revisions the instance evaluates (so
// [FleetGuard] knows every instance applied a change before the next step)
// and any attributes other packages publish. An instance that stops
// heartbeating expires after the TTL.
type Heartbeater struct {
	fleet     FleetStore
	inst      Instance
	revisions func() map[string]int64
	attrs     []func() map[string]string
	interval  time.Duration
	ttl       time.Duration
	logger    *slog.Logger

	mu   sync.Mutex
	stop context.CancelFunc
	done chan struct{}
}

// HeartbeatOption configures a [Heartbeater].
type HeartbeatOption func(*Heartbeater) error

// WithHeartbeatInterval sets how often the instance reports (default 2s).
func WithHeartbeatInterval(d time.Duration) HeartbeatOption {
	return func(h *Heartbeater) error {
		if d <= 0 {
			return fmt.Errorf("WithHeartbeatInterval %v: must be positive", d)
		}
		h.interval = d
		return nil
	}
}

// WithTTL sets how long a report stays valid (default 3 intervals).
func WithTTL(d time.Duration) HeartbeatOption {
	return func(h *Heartbeater) error {
		if d <= 0 {
			return fmt.Errorf("WithTTL %v: must be positive", d)
		}
		h.ttl = d
		return nil
	}
}

// WithAttributes adds a source of published attributes, read at every beat
// (for example [Watchdog.Attributes]).
func WithAttributes(f func() map[string]string) HeartbeatOption {
	return func(h *Heartbeater) error {
		if f == nil {
			return errors.New("WithAttributes: function is nil")
		}
		h.attrs = append(h.attrs, f)
		return nil
	}
}

// WithHeartbeatLogger sets the logger (default slog.Default()).
func WithHeartbeatLogger(l *slog.Logger) HeartbeatOption {
	return func(h *Heartbeater) error {
		if l == nil {
			return errors.New("WithHeartbeatLogger: logger is nil")
		}
		h.logger = l
		return nil
	}
}

// NewHeartbeater returns a heartbeater for the instance id running build.
// revisions reports the flag revisions the instance evaluates; the dimmer
// providers' Revisions method fits.
func NewHeartbeater(fleet FleetStore, id, build string, revisions func() map[string]int64, opts ...HeartbeatOption) (*Heartbeater, error) {
	switch {
	case fleet == nil:
		return nil, errors.New("flags.NewHeartbeater: fleet store is nil")
	case id == "":
		return nil, errors.New("flags.NewHeartbeater: instance id is empty")
	case revisions == nil:
		return nil, errors.New("flags.NewHeartbeater: revisions function is nil")
	}
	h := &Heartbeater{
		fleet: fleet, revisions: revisions, interval: 2 * time.Second, logger: slog.Default(),
		inst: Instance{ID: id, Build: build, StartedAt: time.Now().UTC()},
	}
	for _, o := range opts {
		if err := o(h); err != nil {
			return nil, fmt.Errorf("flags.NewHeartbeater: %w", err)
		}
	}
	if h.ttl == 0 {
		h.ttl = 3 * h.interval
	}
	if h.ttl <= h.interval {
		return nil, fmt.Errorf("flags.NewHeartbeater: TTL %v must exceed the interval %v", h.ttl, h.interval)
	}
	return h, nil
}

// Beat reports once, now.
func (h *Heartbeater) Beat(ctx context.Context) error {
	inst := h.inst
	inst.Applied = maps.Clone(h.revisions())
	if inst.Applied == nil {
		inst.Applied = map[string]int64{}
	}
	if len(h.attrs) > 0 {
		inst.Attributes = map[string]string{}
		for _, f := range h.attrs {
			maps.Copy(inst.Attributes, f())
		}
	}
	inst.SeenAt = time.Now().UTC()
	return h.fleet.Heartbeat(ctx, inst, h.ttl)
}

// Start registers the instance (the first beat's error is returned) and
// keeps beating until Close.
func (h *Heartbeater) Start(ctx context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stop != nil {
		return errors.New("heartbeater already started")
	}
	if err := h.Beat(ctx); err != nil {
		return fmt.Errorf("first heartbeat: %w", err)
	}
	loopCtx, cancel := context.WithCancel(context.Background())
	h.stop, h.done = cancel, make(chan struct{})
	go func() {
		defer close(h.done)
		t := time.NewTicker(h.interval)
		defer t.Stop()
		for {
			select {
			case <-loopCtx.Done():
				return
			case <-t.C:
				// A beat in flight is not cancelled by Close: a cancelled
				// write can still land on the server after Close's
				// deregistration and list the instance again until its TTL
				// runs out. Close waits for it instead (bounded by interval).
				c, cancel := context.WithTimeout(context.Background(), h.interval)
				if err := h.Beat(c); err != nil && loopCtx.Err() == nil {
					h.logger.Warn("heartbeat failed", "instance", h.inst.ID, "err", err)
				}
				cancel()
			}
		}
	}()
	return nil
}

// Close stops beating, waits for the loop and deregisters the instance.
func (h *Heartbeater) Close(ctx context.Context) error {
	h.mu.Lock()
	stop, done := h.stop, h.done
	h.mu.Unlock()
	if stop == nil {
		return nil
	}
	stop()
	select {
	case <-done:
	case <-ctx.Done():
		return ctx.Err()
	}
	return h.fleet.Deregister(ctx, h.inst.ID)
}
