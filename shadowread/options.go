package shadowread

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/open-feature/go-sdk/openfeature"
	"go.opentelemetry.io/otel/metric"

	"github.com/dimmer-dev/dimmer/flags"
)

// Verdict is what an [ErrorPolicy] makes of a comparison where a side failed.
type Verdict uint8

const (
	// Match: counted as a match.
	Match Verdict = iota + 1
	// Mismatch: counted (and re-checked, reported) as a mismatch.
	Mismatch
	// ShadowError: the shadow side failed; counted apart from mismatches, and
	// as an error of that side for the watchdog.
	ShadowError
	// Skip: not counted as a comparison.
	Skip
)

// ErrorPolicy judges a comparison where at least one side returned an error.
type ErrorPolicy func(servedErr, shadowErr error) Verdict

// DefaultErrorPolicy: only the shadow failed → [ShadowError]; only the
// served side failed → [Mismatch] (the shadow has data the served side does
// not, or the other way round); both failed → [Match]: stores seldom agree
// on error values, map them to domain errors and use [ErrorsEqual] to
// compare them.
func DefaultErrorPolicy(servedErr, shadowErr error) Verdict {
	switch {
	case servedErr == nil:
		return ShadowError
	case shadowErr == nil:
		return Mismatch
	}
	return Match
}

// ErrorsEqual is DefaultErrorPolicy, except that two errors match only when
// errors.Is(shadowErr, servedErr) holds (for example both are ErrNotFound).
func ErrorsEqual(servedErr, shadowErr error) Verdict {
	if servedErr != nil && shadowErr != nil && !errors.Is(shadowErr, servedErr) {
		return Mismatch
	}
	return DefaultErrorPolicy(servedErr, shadowErr)
}

type config struct {
	workers, queue int
	timeout        time.Duration
	recheck        time.Duration
	compare        any
	errPolicy      ErrorPolicy
	rate           func(ctx context.Context, key string) float64
	observer       flags.Observer
	meterProvider  metric.MeterProvider
	logger         *slog.Logger
	sink           ReportSink
	clean          func(Report) Report
	redact         func(Difference) Difference
	reportEvery    time.Duration
	onMismatch     func(Report)
	wait           bool
}

func defaultConfig() config {
	return config{
		workers:     16,
		queue:       256,
		timeout:     time.Second,
		recheck:     100 * time.Millisecond,
		errPolicy:   DefaultErrorPolicy,
		logger:      slog.Default(),
		sink:        SlogSink(slog.Default()),
		reportEvery: time.Second,
	}
}

// Option configures a [Reader].
type Option func(*config) error

// WithComparator sets how results are compared (default [DeepCompare] with
// no options). Its type must be Comparator[Out] of the reader's Out.
func WithComparator[Out any](c Comparator[Out]) Option {
	return func(cfg *config) error {
		if c == nil {
			return errors.New("WithComparator: comparator is nil")
		}
		cfg.compare = c
		return nil
	}
}

// WithErrorPolicy sets how a comparison where a side failed is judged
// (default [DefaultErrorPolicy]).
func WithErrorPolicy(p ErrorPolicy) Option {
	return func(cfg *config) error {
		if p == nil {
			return errors.New("WithErrorPolicy: policy is nil")
		}
		cfg.errPolicy = p
		return nil
	}
}

// WithPool sets the shadow pool: workers goroutines and queue waiting reads
// (default 16 and 256). A shadow read arriving at a full queue is shed and
// counted; the caller is not slowed.
func WithPool(workers, queue int) Option {
	return func(cfg *config) error {
		if workers < 1 {
			return fmt.Errorf("WithPool: workers must be at least 1, got %d", workers)
		}
		if queue < 0 {
			return fmt.Errorf("WithPool: queue must not be negative, got %d", queue)
		}
		cfg.workers, cfg.queue = workers, queue
		return nil
	}
}

// WithShadowTimeout bounds the shadow read and, separately, the re-read
// (default 1s). It starts when a worker picks the read up.
func WithShadowTimeout(d time.Duration) Option {
	return func(cfg *config) error {
		if d <= 0 {
			return fmt.Errorf("WithShadowTimeout: timeout must be positive, got %s", d)
		}
		cfg.timeout = d
		return nil
	}
}

// WithRecheck sets the delay before a mismatch is re-read on both sides to
// tell a transient mismatch (the row changed between the two reads) from a
// lasting one (default 100ms). 0 disables the re-read: every mismatch is
// then lasting.
func WithRecheck(delay time.Duration) Option {
	return func(cfg *config) error {
		if delay < 0 {
			return fmt.Errorf("WithRecheck: delay must not be negative, got %s", delay)
		}
		cfg.recheck = delay
		return nil
	}
}

// WithSampleRate compares the share rate(ctx, key) of keys (0..1, default
// all), chosen by a sticky hash of migration and key.
func WithSampleRate(rate func(ctx context.Context, key string) float64) Option {
	return func(cfg *config) error {
		if rate == nil {
			return errors.New("WithSampleRate: rate function is nil")
		}
		cfg.rate = rate
		return nil
	}
}

// FlagSampleRate reads the sample rate from a float flag of an OpenFeature
// client, evaluated with the entity key as targeting key, so the rate can be
// changed (or targeted) at run time. A failed evaluation, NaN or a value out
// of 0..1 serves fallback.
func FlagSampleRate(client *openfeature.Client, flagKey string, fallback float64) func(context.Context, string) float64 {
	return func(ctx context.Context, key string) float64 {
		if client == nil {
			return fallback
		}
		v, err := client.FloatValue(ctx, flagKey, fallback, openfeature.NewEvaluationContext(key, nil))
		if err != nil || math.IsNaN(v) || v < 0 || v > 1 {
			return fallback
		}
		return v
	}
}

// WithObserver reports the served read and every shadow read (with its
// comparison verdict) to o, usually the [flags.Watchdog].
func WithObserver(o flags.Observer) Option {
	return func(cfg *config) error {
		if o == nil {
			return errors.New("WithObserver: observer is nil")
		}
		cfg.observer = o
		return nil
	}
}

// WithMeterProvider sets where metrics go (default no-op).
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(cfg *config) error {
		if mp == nil {
			return errors.New("WithMeterProvider: meter provider is nil")
		}
		cfg.meterProvider = mp
		return nil
	}
}

// WithLogger sets the logger for comparator panics.
func WithLogger(l *slog.Logger) Option {
	return func(cfg *config) error {
		if l == nil {
			return errors.New("WithLogger: logger is nil")
		}
		cfg.logger = l
		return nil
	}
}

// WithReports sends mismatch reports to sink (default: [SlogSink] on
// slog.Default), at most one per every (0: all), each passed through clean
// first (nil: as is), for example to drop or hash the key. Reports carry
// field paths, not values, unless [WithReportValues] is given.
func WithReports(sink ReportSink, every time.Duration, clean func(Report) Report) Option {
	return func(cfg *config) error {
		if sink == nil {
			return errors.New("WithReports: sink is nil")
		}
		if every < 0 {
			return fmt.Errorf("WithReports: interval must not be negative, got %s", every)
		}
		cfg.sink, cfg.reportEvery, cfg.clean = sink, every, clean
		return nil
	}
}

// WithReportValues puts the differing values into mismatch reports, each
// [Difference] passed through redact first, which masks what must not leave
// the service (e-mail addresses, names, tokens) and may look at the path to
// decide. Without this option reports name the differing field paths only:
// the values are the service's data, often personal. Pass a redact that
// returns its argument only when no result field can hold personal data.
func WithReportValues(redact func(Difference) Difference) Option {
	return func(cfg *config) error {
		if redact == nil {
			return errors.New("WithReportValues: redact function is nil (pass one that returns its argument to keep values as they are)")
		}
		cfg.redact = redact
		return nil
	}
}

// WithMismatchHandler calls f for every mismatch (not sampled, not
// cleaned, values included) and every comparator panic. For tests: see the shadowtest package.
func WithMismatchHandler(f func(Report)) Option {
	return func(cfg *config) error {
		if f == nil {
			return errors.New("WithMismatchHandler: handler is nil")
		}
		cfg.onMismatch = f
		return nil
	}
}

// WithWait makes Read run the shadow read and the comparison in the call,
// after the served read, and return only then. Only for tests, where a
// mismatch must be known when Read returns; it puts the shadow on the
// caller's path.
func WithWait() Option {
	return func(cfg *config) error { cfg.wait = true; return nil }
}
