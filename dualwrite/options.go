package dualwrite

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/sony/gobreaker/v2"

	"github.com/dimmer-dev/dimmer/flags"
)

type config struct {
	log           RepairLog
	workers       int
	queue         int
	timeout       time.Duration
	repairTimeout time.Duration
	breaker       gobreaker.Settings
	tripAfter     uint32
	observer      flags.Observer
	meterProvider meterProvider
	logger        *slog.Logger
}

func defaultConfig() config {
	return config{
		workers:       8,
		queue:         1024,
		timeout:       5 * time.Second,
		repairTimeout: 5 * time.Second,
		tripAfter:     5,
		logger:        slog.Default(),
	}
}

// Option configures a [Writer].
type Option func(*config) error

// WithRepairLog sets where failed secondary writes go. Required. Give a
// [TxRepairLog] (such as [OutboxRepairLog]) to use [Writer.WriteTx].
func WithRepairLog(l RepairLog) Option {
	return func(c *config) error {
		if l == nil {
			return errors.New("WithRepairLog: repair log is nil")
		}
		c.log = l
		return nil
	}
}

// WithAsync runs secondary writes on workers goroutines behind a queue of
// queue writes (the default: 8 workers, 1024 queued). A key always goes to
// the same worker, whose queue holds queue/workers writes, so the writes of
// one key reach the secondary in the order of their authoritative writes
// (a slow write holds back the keys sharing its worker, up to the secondary
// timeout). A write arriving at a full queue is shed and becomes a repair.
func WithAsync(workers, queue int) Option {
	return func(c *config) error {
		if workers < 1 {
			return fmt.Errorf("WithAsync: workers must be at least 1, got %d", workers)
		}
		if queue < 0 {
			return fmt.Errorf("WithAsync: queue must not be negative, got %d", queue)
		}
		c.workers, c.queue = workers, queue
		return nil
	}
}

// WithSync runs the secondary write in the caller's call, after the
// authoritative one, under the caller's context and the secondary timeout.
func WithSync() Option {
	return func(c *config) error { c.workers, c.queue = 0, 0; return nil }
}

// WithSecondaryTimeout bounds each secondary write (default 5s). For async
// writes it starts when a worker picks the write up.
func WithSecondaryTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("WithSecondaryTimeout: timeout must be positive, got %s", d)
		}
		c.timeout = d
		return nil
	}
}

// WithRepairTimeout bounds each write to the repair log (default 5s).
func WithRepairTimeout(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("WithRepairTimeout: timeout must be positive, got %s", d)
		}
		c.repairTimeout = d
		return nil
	}
}

// WithBreakerTrip opens a side's breaker after n consecutive failed secondary
// writes (default 5) for open (default 10s) before a probe is let through.
func WithBreakerTrip(n uint32, open time.Duration) Option {
	return func(c *config) error {
		if n < 1 {
			return fmt.Errorf("WithBreakerTrip: n must be at least 1, got %d", n)
		}
		if open <= 0 {
			return fmt.Errorf("WithBreakerTrip: open duration must be positive, got %s", open)
		}
		c.tripAfter, c.breaker.Timeout = n, open
		return nil
	}
}

// WithBreakerSettings gives full control of the gobreaker settings used for
// each side (Name is set by the writer: "<migration>/<side>").
func WithBreakerSettings(s gobreaker.Settings) Option {
	return func(c *config) error { c.breaker = s; return nil }
}

// WithObserver reports every side's write (stage, side, latency, error) to o,
// usually the [flags.Watchdog].
func WithObserver(o flags.Observer) Option {
	return func(c *config) error {
		if o == nil {
			return errors.New("WithObserver: observer is nil")
		}
		c.observer = o
		return nil
	}
}

// WithMeterProvider sets where metrics go (default: no-op).
func WithMeterProvider(mp meterProvider) Option {
	return func(c *config) error {
		if mp == nil {
			return errors.New("WithMeterProvider: meter provider is nil")
		}
		c.meterProvider = mp
		return nil
	}
}

// WithLogger sets the logger for repairs that could not be recorded.
func WithLogger(l *slog.Logger) Option {
	return func(c *config) error {
		if l == nil {
			return errors.New("WithLogger: logger is nil")
		}
		c.logger = l
		return nil
	}
}
