package dualwrite

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/metric/noop"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/internal/workpool"
)

// StageSource evaluates a migration's stage for one entity key.
// [*flags.Source] is the usual implementation. On an evaluation problem it
// returns the stage to use anyway (the fallback) together with an error; the
// writer proceeds with that stage and counts the error.
type StageSource interface {
	Stage(ctx context.Context, migration, entityKey string) (flags.Stage, error)
}

// StageFunc adapts a function to StageSource.
type StageFunc = flags.StageFunc

var _ StageSource = (*flags.Source)(nil)

// Func writes In to one side and returns what the store returned.
type Func[In, Out any] func(ctx context.Context, in In) (Out, error)

// Writer routes writes by the stage of its migration. See the package
// documentation for the rules.
type Writer[In, Out any] struct {
	migration string
	source    StageSource
	fns       [3]Func[In, Out] // indexed by flags.Side
	key       func(In) string
	breakers  [3]*gobreaker.CircuitBreaker[Out]
	pool      *workpool.Keyed
	cfg       config
	m         *metrics
	txlog     TxRepairLog
}

// New returns a Writer for migration. old and new write one input to each
// store; key returns the input's entity key, the targeting key of the stage
// evaluation and the key of any repair. A repair log is required
// ([WithRepairLog]): without one a failed secondary write would be lost.
func New[In, Out any](migration string, source StageSource, old, new Func[In, Out], key func(In) string, opts ...Option) (*Writer[In, Out], error) {
	if err := flags.ValidateName(migration); err != nil {
		return nil, fmt.Errorf("dualwrite.New: migration: %w", err)
	}
	switch {
	case source == nil:
		return nil, errors.New("dualwrite.New: source is nil")
	case old == nil:
		return nil, errors.New("dualwrite.New: old write function is nil")
	case new == nil:
		return nil, errors.New("dualwrite.New: new write function is nil")
	case key == nil:
		return nil, errors.New("dualwrite.New: key function is nil")
	}
	cfg := defaultConfig()
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, fmt.Errorf("dualwrite.New: %w", err)
		}
	}
	if cfg.log == nil {
		return nil, errors.New("dualwrite.New: no repair log (WithRepairLog): failed secondary writes would be lost")
	}
	if cfg.meterProvider == nil {
		cfg.meterProvider = noop.NewMeterProvider()
	}
	m, err := newMetrics(cfg.meterProvider, migration)
	if err != nil {
		return nil, fmt.Errorf("dualwrite.New: metrics: %w", err)
	}
	w := &Writer[In, Out]{migration: migration, source: source, key: key, cfg: cfg, m: m}
	w.fns[flags.Old], w.fns[flags.New] = old, new
	w.txlog, _ = cfg.log.(TxRepairLog)
	for _, side := range []flags.Side{flags.Old, flags.New} {
		st := cfg.breaker
		st.Name = migration + "/" + side.String()
		if st.ReadyToTrip == nil {
			n := cfg.tripAfter
			st.ReadyToTrip = func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= n }
		}
		if st.Timeout == 0 {
			st.Timeout = 10 * time.Second
		}
		w.breakers[side] = gobreaker.NewCircuitBreaker[Out](st)
	}
	if cfg.workers > 0 {
		// Keyed: a key's secondary writes run in the order of their
		// authoritative writes, so a blind upsert on the secondary never
		// ends with an older value than the authoritative side.
		if w.pool, err = workpool.NewKeyed(cfg.workers, cfg.queue); err != nil {
			return nil, fmt.Errorf("dualwrite.New: %w", err)
		}
	}
	return w, nil
}

// Migration is the migration's name.
func (w *Writer[In, Out]) Migration() string { return w.migration }

// BreakerState is the state of the circuit breaker guarding writes to side
// when it is the secondary.
func (w *Writer[In, Out]) BreakerState(side flags.Side) gobreaker.State {
	if side != flags.Old && side != flags.New {
		return gobreaker.StateClosed
	}
	return w.breakers[side].State()
}

// Write writes in by the stage of its key: the authoritative side first,
// whose result and error are the caller's; then, when the stage writes both
// sides, the secondary, in the call or on the pool. A secondary failure never
// reaches the caller: it becomes a [Repair] in the repair log.
func (w *Writer[In, Out]) Write(ctx context.Context, in In) (Out, error) {
	key, stage, guessed := w.route(ctx, in)
	out, err := w.call(ctx, stage, stage.Authoritative(), roleAuthoritative, in)
	if err != nil {
		// The secondary is not written: it would hold what the
		// authoritative side refused.
		return out, err
	}
	if sec := stage.Secondary(); sec != flags.NoSide {
		w.secondary(ctx, stage, sec, key, in)
	} else if guessed {
		w.repair(ctx, w.unrouted(key, stage))
	}
	return out, nil
}

// WriteTx is Write for a caller that writes the authoritative side inside its
// own PostgreSQL transaction. The user functions find tx with [TxFrom]. When
// the stage writes both sides, a repair intent for the secondary is recorded
// in tx itself ([TxRepairLog]), so it commits exactly when the authoritative
// write commits and vanishes with a rollback; the secondary side is then
// brought up to date from the committed state by the [Repairer] (the outbox
// relay delivers the intent). No secondary write runs before commit: it could
// not see the uncommitted row, and a rollback would leave it ahead.
//
// An error recording the intent is returned: the caller must roll back, as
// for any failed statement of its transaction.
func (w *Writer[In, Out]) WriteTx(ctx context.Context, tx pgx.Tx, in In) (Out, error) {
	var zero Out
	if tx == nil {
		return zero, errors.New("dualwrite.WriteTx: tx is nil")
	}
	if w.txlog == nil {
		return zero, fmt.Errorf("dualwrite.WriteTx: %s: %w", w.migration, ErrNoTxRepairLog)
	}
	ctx = context.WithValue(ctx, txKey{}, tx)
	key, stage, guessed := w.route(ctx, in)
	out, err := w.call(ctx, stage, stage.Authoritative(), roleAuthoritative, in)
	if err != nil {
		return out, err
	}
	sec := stage.Secondary()
	var r Repair
	switch {
	case sec != flags.NoSide:
		r = Repair{Migration: w.migration, Key: key, Stage: stage, Side: sec, Reason: ReasonTx}
	case guessed:
		r = w.unrouted(key, stage)
	default:
		return out, nil
	}
	r.At = time.Now().UTC()
	if err := w.txlog.RecordTx(ctx, tx, r); err != nil {
		w.m.repair(ctx, "record_failed", r.Reason)
		return out, fmt.Errorf("dualwrite: %s: record repair intent for %q in the transaction: %w", w.migration, key, err)
	}
	w.m.repair(ctx, "queued", r.Reason)
	return out, nil
}

type txKey struct{}

// TxFrom returns the transaction [Writer.WriteTx] was given, for the user
// write functions.
func TxFrom(ctx context.Context) (pgx.Tx, bool) {
	tx, ok := ctx.Value(txKey{}).(pgx.Tx)
	return tx, ok
}

// route evaluates the stage of in's key; guessed is true when the source
// could not and returned its fallback.
func (w *Writer[In, Out]) route(ctx context.Context, in In) (key string, stage flags.Stage, guessed bool) {
	key = w.key(in)
	stage, err := w.source.Stage(ctx, w.migration, key)
	if err != nil {
		w.m.stageErrors.Add(ctx, 1, w.m.migOpts...)
	}
	return key, stage, err != nil
}

// unrouted is the repair for a write routed by a fallback stage that
// writes one side: the other side may have needed it too.
func (w *Writer[In, Out]) unrouted(key string, stage flags.Stage) Repair {
	side := flags.New
	if stage.Authoritative() == flags.New {
		side = flags.Old
	}
	return Repair{Migration: w.migration, Key: key, Stage: stage, Side: side, Reason: ReasonStageUnavailable}
}

// call runs one side's function, recovering a panic into a *PanicError, and
// reports the result.
func (w *Writer[In, Out]) call(ctx context.Context, stage flags.Stage, side flags.Side, r role, in In) (out Out, err error) {
	start := time.Now()
	defer func() {
		if p := recover(); p != nil {
			err = &PanicError{Migration: w.migration, Side: side, Value: p, Stack: debug.Stack()}
		}
		lat := time.Since(start)
		w.m.call(ctx, side, r, lat, err != nil)
		if w.cfg.observer != nil {
			w.cfg.observer.Observe(flags.Observation{Migration: w.migration, Stage: stage, Op: flags.Write,
				Side: side, Latency: lat, Err: err != nil})
		}
	}()
	return w.fns[side](ctx, in)
}

func (w *Writer[In, Out]) secondary(ctx context.Context, stage flags.Stage, side flags.Side, key string, in In) {
	if w.pool == nil {
		w.runSecondary(ctx, stage, side, key, in)
		return
	}
	// Detached: the caller returning (and cancelling) must not abort a
	// write the stores are already half way through agreeing on. Detached
	// on the worker: the caller's path pays one closure, not also the
	// context wrapper.
	ok, err := w.pool.TrySubmit(key, func() { w.runSecondary(context.WithoutCancel(ctx), stage, side, key, in) })
	switch {
	case err != nil:
		w.repair(ctx, Repair{Migration: w.migration, Key: key, Stage: stage, Side: side, Reason: ReasonClosed, Err: err.Error()})
	case !ok:
		w.repair(ctx, Repair{Migration: w.migration, Key: key, Stage: stage, Side: side, Reason: ReasonShed})
	}
}

func (w *Writer[In, Out]) runSecondary(ctx context.Context, stage flags.Stage, side flags.Side, key string, in In) {
	tctx, cancel := context.WithTimeout(ctx, w.cfg.timeout)
	defer cancel()
	_, err := w.breakers[side].Execute(func() (Out, error) {
		return w.call(tctx, stage, side, roleSecondary, in)
	})
	if err == nil {
		return
	}
	reason := ReasonError
	switch {
	case errors.Is(err, gobreaker.ErrOpenState), errors.Is(err, gobreaker.ErrTooManyRequests):
		reason = ReasonBreakerOpen
	case errors.Is(err, ErrPanic):
		reason = ReasonPanic
	case errors.Is(tctx.Err(), context.DeadlineExceeded):
		reason = ReasonTimeout
	}
	w.repair(ctx, Repair{Migration: w.migration, Key: key, Stage: stage, Side: side, Reason: reason, Err: err.Error()})
}

// repair records r. The record outlives the caller's cancellation but not
// the repair timeout. A repair that cannot be recorded is logged at error
// level with everything needed to redo it by hand, and counted.
func (w *Writer[In, Out]) repair(ctx context.Context, r Repair) {
	r.At = time.Now().UTC()
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), w.cfg.repairTimeout)
	defer cancel()
	if err := w.cfg.log.Record(rctx, r); err != nil {
		w.m.repair(ctx, "record_failed", r.Reason)
		w.cfg.logger.LogAttrs(ctx, slog.LevelError, "dualwrite: repair could not be recorded; sides may differ for this key",
			slog.String("migration", r.Migration), slog.String("key", r.Key), slog.String("side", r.Side.String()),
			slog.String("stage", r.Stage.String()), slog.String("reason", string(r.Reason)), slog.String("cause", r.Err),
			slog.Any("err", err))
		return
	}
	w.m.repair(ctx, "queued", r.Reason)
}

// Shutdown stops taking async secondary writes (later ones become repairs
// with [ReasonClosed]), waits for the queued ones to finish and their repairs
// to be recorded, until ctx ends.
func (w *Writer[In, Out]) Shutdown(ctx context.Context) error {
	if w.pool == nil {
		return nil
	}
	if err := w.pool.Shutdown(ctx); err != nil {
		return fmt.Errorf("dualwrite: %s: %w", w.migration, err)
	}
	return nil
}

// Close is Shutdown without a deadline.
func (w *Writer[In, Out]) Close() error { return w.Shutdown(context.Background()) }

// meterProvider is what WithMeterProvider takes.
type meterProvider = metric.MeterProvider
