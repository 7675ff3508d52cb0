package flags

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/open-feature/go-sdk/openfeature"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"
)

// Source evaluates stage flags through an OpenFeature client. The entity key
// of the operation is the evaluation's targeting key, so a provider can serve
// a stage to a share of keys, stickily.
//
// A flag the provider does not know (FLAG_NOT_FOUND) is a migration that
// was never set: it reads as [Off], with no error, as [Store] promises, so a
// fresh service neither repairs nor warns. Evaluation never fails the
// caller: a value of the wrong type, an unknown stage or a provider that
// cannot answer (not ready, failing) yields the fallback stage together with
// an error wrapping [ErrFlagUnavailable], and is counted (metric
// dimmer.flags.evaluation_errors, [Source.Errors]) and logged at most once a
// minute per migration, with the number of failures not logged meanwhile.
type Source struct {
	client    *openfeature.Client
	fallback  Stage
	overrides map[string]Stage
	logger    *slog.Logger
	errCount  metric.Int64Counter
	errors    atomic.Int64
	lastLog   sync.Map // migration -> *logGate
}

// logGate rate-limits the warning of one migration and counts what it held
// back.
type logGate struct {
	last       atomic.Int64 // unix nanos of the last line
	suppressed atomic.Int64
}

// SourceOption configures a [Source].
type SourceOption func(*Source) error

// WithMigrationFallback overrides the fallback stage for one migration (for
// example Complete for a migration whose old store is gone).
func WithMigrationFallback(migration string, stage Stage) SourceOption {
	return func(s *Source) error {
		if err := ValidateName(migration); err != nil {
			return fmt.Errorf("WithMigrationFallback: %w", err)
		}
		if !stage.Valid() {
			return fmt.Errorf("WithMigrationFallback(%s): %w", migration, &UnknownStageError{Value: stage.String()})
		}
		s.overrides[migration] = stage
		return nil
	}
}

// WithSourceLogger sets the logger for evaluation errors (default slog.Default()).
func WithSourceLogger(l *slog.Logger) SourceOption {
	return func(s *Source) error {
		if l == nil {
			return errors.New("WithSourceLogger: logger is nil")
		}
		s.logger = l
		return nil
	}
}

// WithSourceMeterProvider sets where the error counter goes (default no-op).
func WithSourceMeterProvider(mp metric.MeterProvider) SourceOption {
	return func(s *Source) error {
		if mp == nil {
			return errors.New("WithSourceMeterProvider: meter provider is nil")
		}
		c, err := mp.Meter("github.com/dimmer-dev/dimmer/flags").Int64Counter("dimmer.flags.evaluation_errors",
			metric.WithDescription("stage evaluations that fell back because the flag was unavailable"))
		if err != nil {
			return fmt.Errorf("WithSourceMeterProvider: %w", err)
		}
		s.errCount = c
		return nil
	}
}

// NewSource returns a Source over client. fallback is the stage served when a
// flag cannot be evaluated: choose the stage that is safe for the migration
// if its flag store vanished (usually the stage it is in).
func NewSource(client *openfeature.Client, fallback Stage, opts ...SourceOption) (*Source, error) {
	if client == nil {
		return nil, errors.New("flags.NewSource: client is nil")
	}
	if !fallback.Valid() {
		return nil, fmt.Errorf("flags.NewSource: fallback: %w", &UnknownStageError{Value: fallback.String()})
	}
	s := &Source{client: client, fallback: fallback, overrides: map[string]Stage{}, logger: slog.Default()}
	c, _ := noop.NewMeterProvider().Meter("").Int64Counter("")
	s.errCount = c
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Fallback is the stage served for migration when its flag is unavailable.
func (s *Source) Fallback(migration string) Stage {
	if st, ok := s.overrides[migration]; ok {
		return st
	}
	return s.fallback
}

// Errors is the number of evaluations that fell back so far.
func (s *Source) Errors() int64 { return s.errors.Load() }

// Stage evaluates the migration's stage for an entity key. A flag never set
// reads as [Off] without an error. On any other problem it returns the
// fallback stage and an error wrapping [ErrFlagUnavailable]; callers proceed
// with the stage either way.
func (s *Source) Stage(ctx context.Context, migration, entityKey string) (Stage, error) {
	fb := s.Fallback(migration)
	det, err := s.client.StringValueDetails(ctx, migration, fb.String(), openfeature.NewEvaluationContext(entityKey, nil))
	if err != nil {
		if det.ErrorCode == openfeature.FlagNotFoundCode {
			return Off, nil
		}
		return fb, s.fail(ctx, migration, fb, string(det.ErrorCode), err)
	}
	st, perr := ParseStage(det.Value)
	if perr != nil {
		return fb, s.fail(ctx, migration, fb, "UNKNOWN_STAGE", perr)
	}
	return st, nil
}

func (s *Source) fail(ctx context.Context, migration string, fb Stage, code string, cause error) error {
	s.errors.Add(1)
	if code == "" {
		code = "GENERAL"
	}
	s.errCount.Add(ctx, 1, metric.WithAttributes(attribute.String("migration", migration), attribute.String("code", code)))
	err := fmt.Errorf("%w: %s: serving fallback stage %s: %w", ErrFlagUnavailable, migration, fb, cause)
	now := time.Now().UnixNano()
	v, ok := s.lastLog.Load(migration)
	if !ok {
		v, _ = s.lastLog.LoadOrStore(migration, new(logGate))
	}
	g := v.(*logGate)
	if prev := g.last.Load(); now-prev > int64(time.Minute) && g.last.CompareAndSwap(prev, now) {
		s.logger.Warn("stage flag unavailable; serving fallback", "migration", migration, "fallback", fb.String(), "code", code,
			"err", cause, "not_logged_since_last", g.suppressed.Swap(0))
	} else {
		g.suppressed.Add(1)
	}
	return err
}

// StageFunc adapts a function to the stage-source interfaces the routing
// packages consume (a constant stage in tests, a custom resolver).
type StageFunc func(ctx context.Context, migration, entityKey string) (Stage, error)

// Stage calls f.
func (f StageFunc) Stage(ctx context.Context, migration, entityKey string) (Stage, error) {
	return f(ctx, migration, entityKey)
}
