package dualwrite

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/metric/noop"

	"github.com/dimmer-dev/dimmer/flags"
)

// LoadFunc reads the current state of key on side; found is false when the
// key does not exist there.
type LoadFunc[S any] func(ctx context.Context, side flags.Side, key string) (state S, found bool, err error)

// StoreFunc writes state for key to side. It must be idempotent (an upsert)
// and must not overwrite a newer version of the key (compare a version or
// updated_at column), because a live dual write may land between the
// repairer's read and its write.
type StoreFunc[S any] func(ctx context.Context, side flags.Side, key string, state S) error

// DeleteFunc removes key from side; removing a missing key is not an error.
type DeleteFunc func(ctx context.Context, side flags.Side, key string) error

// Outcome is what [Repairer.Repair] did with one repair.
type Outcome string

const (
	// Repaired: the secondary side now holds the authoritative state.
	Repaired Outcome = "repaired"
	// Skipped: the key's stage writes one side only (off: new is stale and
	// is backfilled before shadow; complete: old is retired), so there is no
	// second side to bring in line.
	Skipped Outcome = "skipped"
	// Failed: the repair could not be done; it must be retried.
	Failed Outcome = "failed"
)

// Repairer brings the secondary side of a key in line with the authoritative
// side. It never replays the failed operation: it re-reads the key's current
// authoritative state (by the stage in force now, not the stage of the
// failed write) and writes that, so replaying a repair twice, late or out of
// order is harmless.
type Repairer[S any] struct {
	migration string
	source    StageSource
	load      LoadFunc[S]
	store     StoreFunc[S]
	del       DeleteFunc
	timeout   time.Duration
	m         *metrics
	logger    *slog.Logger
	// While the flag store cannot answer every repair fails the same way:
	// that is logged at most once a minute, with the count held back.
	unavailLast       atomic.Int64 // unix nanos
	unavailSuppressed atomic.Int64
}

// RepairerOption configures a [Repairer].
type RepairerOption func(*repairerConfig) error

type repairerConfig struct {
	del           DeleteFunc
	timeout       time.Duration
	meterProvider meterProvider
	logger        *slog.Logger
}

// WithDelete lets the repairer remove a key from the secondary side when the
// authoritative side no longer has it. Without it such a repair fails.
func WithDelete(f DeleteFunc) RepairerOption {
	return func(c *repairerConfig) error {
		if f == nil {
			return errors.New("WithDelete: delete function is nil")
		}
		c.del = f
		return nil
	}
}

// WithRepairerTimeout bounds each repair (default 10s).
func WithRepairerTimeout(d time.Duration) RepairerOption {
	return func(c *repairerConfig) error {
		if d <= 0 {
			return fmt.Errorf("WithRepairerTimeout: timeout must be positive, got %s", d)
		}
		c.timeout = d
		return nil
	}
}

// WithRepairerMeterProvider sets where repair metrics go (default no-op).
func WithRepairerMeterProvider(mp meterProvider) RepairerOption {
	return func(c *repairerConfig) error {
		if mp == nil {
			return errors.New("WithRepairerMeterProvider: meter provider is nil")
		}
		c.meterProvider = mp
		return nil
	}
}

// WithRepairerLogger sets the logger for failed repairs.
func WithRepairerLogger(l *slog.Logger) RepairerOption {
	return func(c *repairerConfig) error {
		if l == nil {
			return errors.New("WithRepairerLogger: logger is nil")
		}
		c.logger = l
		return nil
	}
}

// NewRepairer returns a Repairer for migration.
func NewRepairer[S any](migration string, source StageSource, load LoadFunc[S], store StoreFunc[S], opts ...RepairerOption) (*Repairer[S], error) {
	if err := flags.ValidateName(migration); err != nil {
		return nil, fmt.Errorf("dualwrite.NewRepairer: migration: %w", err)
	}
	switch {
	case source == nil:
		return nil, errors.New("dualwrite.NewRepairer: source is nil")
	case load == nil:
		return nil, errors.New("dualwrite.NewRepairer: load function is nil")
	case store == nil:
		return nil, errors.New("dualwrite.NewRepairer: store function is nil")
	}
	cfg := repairerConfig{timeout: 10 * time.Second, meterProvider: noop.NewMeterProvider(), logger: slog.Default()}
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, fmt.Errorf("dualwrite.NewRepairer: %w", err)
		}
	}
	m, err := newMetrics(cfg.meterProvider, migration)
	if err != nil {
		return nil, fmt.Errorf("dualwrite.NewRepairer: metrics: %w", err)
	}
	return &Repairer[S]{migration: migration, source: source, load: load, store: store, del: cfg.del,
		timeout: cfg.timeout, m: m, logger: cfg.logger}, nil
}

// Migration is the migration whose repairs r handles.
func (r *Repairer[S]) Migration() string { return r.migration }

// RepairError says which repair failed and why.
type RepairError struct {
	Repair Repair
	Err    error
}

func (e *RepairError) Error() string { return fmt.Sprintf("dualwrite: repair %s: %v", e.Repair, e.Err) }
func (e *RepairError) Unwrap() error { return e.Err }

// Repair brings r's key in line. A Failed outcome comes with a *RepairError.
func (r *Repairer[S]) Repair(ctx context.Context, rep Repair) (Outcome, error) {
	out, err := r.repair(ctx, rep)
	switch out {
	case Repaired:
		r.m.repair(ctx, "replayed", rep.Reason)
	case Skipped:
		r.m.repair(ctx, "skipped", rep.Reason)
	default:
		r.m.repair(ctx, "failed", rep.Reason)
		err = &RepairError{Repair: rep, Err: err}
		if errors.Is(err, flags.ErrFlagUnavailable) {
			now := time.Now().UnixNano()
			prev := r.unavailLast.Load()
			if now-prev < int64(time.Minute) || !r.unavailLast.CompareAndSwap(prev, now) {
				r.unavailSuppressed.Add(1)
				break
			}
			r.logger.WarnContext(ctx, "dualwrite: repairs wait for the stage flag; retried later", "repair", rep.String(), "err", err,
				"not_logged_since_last", r.unavailSuppressed.Swap(0))
			break
		}
		r.logger.WarnContext(ctx, "dualwrite: repair failed", "repair", rep.String(), "err", err)
	}
	return out, err
}

func (r *Repairer[S]) repair(ctx context.Context, rep Repair) (Outcome, error) {
	if rep.Migration != r.migration {
		return Failed, fmt.Errorf("repair is for migration %q, this repairer handles %q", rep.Migration, r.migration)
	}
	if rep.Key == "" {
		return Failed, errors.New("repair has an empty key")
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	// The stage now, not the stage of the failed write: the flag may have
	// moved since, and the authoritative side now is the truth now.
	stage, err := r.source.Stage(ctx, r.migration, rep.Key)
	if err != nil {
		// The fallback stage is a guess: acting on it could skip (and so
		// drop) a repair that is still needed, or copy the wrong way.
		return Failed, fmt.Errorf("stage unavailable, repair deferred: %w", err)
	}
	from, to := stage.Authoritative(), stage.Secondary()
	if to == flags.NoSide {
		return Skipped, nil
	}
	state, found, err := r.load(ctx, from, rep.Key)
	if err != nil {
		return Failed, fmt.Errorf("read %s side: %w", from, err)
	}
	if !found {
		if r.del == nil {
			return Failed, fmt.Errorf("key is gone from the %s side and no delete function is configured (WithDelete)", from)
		}
		if err := r.del(ctx, to, rep.Key); err != nil {
			return Failed, fmt.Errorf("delete from %s side: %w", to, err)
		}
		return Repaired, nil
	}
	if err := r.store(ctx, to, rep.Key, state); err != nil {
		return Failed, fmt.Errorf("write %s side: %w", to, err)
	}
	return Repaired, nil
}

// Report sums up a batch of repairs.
type Report struct {
	Repaired, Skipped int
	// Failed lists every repair that could not be done, with its error.
	Failed []*RepairError
}

// RepairAll repairs every entry and reports what it could not repair. It
// stops early only when ctx ends; the repairs not attempted are listed as
// failed with ctx's error.
func (r *Repairer[S]) RepairAll(ctx context.Context, reps []Repair) Report {
	var rep Report
	for _, x := range reps {
		if err := ctx.Err(); err != nil {
			rep.Failed = append(rep.Failed, &RepairError{Repair: x, Err: err})
			continue
		}
		out, err := r.Repair(ctx, x)
		switch out {
		case Repaired:
			rep.Repaired++
		case Skipped:
			rep.Skipped++
		default:
			var re *RepairError
			if !errors.As(err, &re) {
				re = &RepairError{Repair: x, Err: err}
			}
			rep.Failed = append(rep.Failed, re)
		}
	}
	return rep
}
