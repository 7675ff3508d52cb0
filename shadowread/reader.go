package shadowread

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cespare/xxhash/v2"
	"go.opentelemetry.io/otel/metric/noop"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/internal/workpool"
)

// StageSource evaluates a migration's stage for one entity key;
// [*flags.Source] is the usual one. On an evaluation problem it returns the
// stage to use anyway with an error; the reader uses the stage and counts it.
type StageSource interface {
	Stage(ctx context.Context, migration, entityKey string) (flags.Stage, error)
}

// StageFunc adapts a function to StageSource.
type StageFunc = flags.StageFunc

var _ StageSource = (*flags.Source)(nil)

// Func reads one input from one side.
type Func[In, Out any] func(ctx context.Context, in In) (Out, error)

var (
	// ErrPanic: a user read function or the comparator panicked; recovered.
	ErrPanic = errors.New("shadowread: user function panicked")
	// ErrComparatorType: WithComparator was given a comparator for another
	// result type.
	ErrComparatorType = errors.New("shadowread: comparator type does not match the reader's result type")
)

// PanicError is a recovered panic of a read function.
type PanicError struct {
	Migration string
	Side      flags.Side
	Value     any
	Stack     []byte
}

func (e *PanicError) Error() string {
	return fmt.Sprintf("shadowread: %s: %s read panicked: %v", e.Migration, e.Side, e.Value)
}

func (e *PanicError) Unwrap() error { return ErrPanic }

// Reader serves reads by the stage of its migration and compares the other
// side in the background. See the package documentation.
type Reader[In, Out any] struct {
	migration string
	source    StageSource
	fns       [3]Func[In, Out]
	key       func(In) string
	compare   Comparator[Out]
	cfg       config
	pool      *workpool.Pool
	m         *metrics
	seed      uint64
	lastRep   sync.Mutex
	lastAt    time.Time
	stop      chan struct{} // closed by Shutdown: cuts recheck delays short
	stopOnce  sync.Once
	rechecks  struct {
		mu      sync.Mutex
		pending int
		closed  bool // set by Shutdown once the pool drained: no new re-reads
		wg      sync.WaitGroup
	}
}

// New returns a Reader for migration. old and new read one input from each
// store; key returns the input's entity key (the stage's targeting key and
// the sampling key).
func New[In, Out any](migration string, source StageSource, old, new Func[In, Out], key func(In) string, opts ...Option) (*Reader[In, Out], error) {
	if err := flags.ValidateName(migration); err != nil {
		return nil, fmt.Errorf("shadowread.New: migration: %w", err)
	}
	switch {
	case source == nil:
		return nil, errors.New("shadowread.New: source is nil")
	case old == nil:
		return nil, errors.New("shadowread.New: old read function is nil")
	case new == nil:
		return nil, errors.New("shadowread.New: new read function is nil")
	case key == nil:
		return nil, errors.New("shadowread.New: key function is nil")
	}
	cfg := defaultConfig()
	for _, o := range opts {
		if err := o(&cfg); err != nil {
			return nil, fmt.Errorf("shadowread.New: %w", err)
		}
	}
	r := &Reader[In, Out]{migration: migration, source: source, key: key, cfg: cfg,
		seed: xxhash.Sum64String("dimmer/shadowread/" + migration), stop: make(chan struct{})}
	r.fns[flags.Old], r.fns[flags.New] = old, new
	if cfg.compare == nil {
		r.compare = DeepCompare[Out]()
	} else if c, ok := cfg.compare.(Comparator[Out]); ok {
		r.compare = c
	} else if c, ok := cfg.compare.(func(Out, Out) Diff); ok {
		r.compare = c
	} else {
		var zero Out
		return nil, fmt.Errorf("shadowread.New: WithComparator: %w: got %T, want shadowread.Comparator[%T]", ErrComparatorType, cfg.compare, zero)
	}
	mp := cfg.meterProvider
	if mp == nil {
		mp = noop.NewMeterProvider()
	}
	var err error
	if r.m, err = newMetrics(mp, migration); err != nil {
		return nil, fmt.Errorf("shadowread.New: metrics: %w", err)
	}
	if !cfg.wait {
		// Batched: handing a shadow read to an idle worker directly would
		// make the caller wake an OS thread right before its own read;
		// measured on 2 cores that alone cost the caller ~10% at p99.
		if r.pool, err = workpool.NewBatched(cfg.workers, cfg.queue, handoffInterval); err != nil {
			return nil, fmt.Errorf("shadowread.New: %w", err)
		}
	}
	return r, nil
}

// handoffInterval is how often queued shadow reads are handed to the
// workers: how late at most a shadow read starts after its served read.
const handoffInterval = time.Millisecond

// Migration is the migration's name.
func (r *Reader[In, Out]) Migration() string { return r.migration }

// Sampled reports whether key's reads are compared at rate: a sticky,
// instance-independent decision (a hash of migration and key), so a key is
// either always or never compared at a given rate, and raising the rate only
// adds keys.
func (r *Reader[In, Out]) Sampled(key string, rate float64) bool {
	switch {
	case rate >= 1:
		return true
	case rate <= 0:
		return false
	}
	h := xxhash.Sum64String(key) ^ r.seed
	// splitmix64 finaliser: spreads the seed into every bit.
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	return float64(h>>11)/(1<<53) < rate
}

// shadowTask hands the served result to the comparison running on a worker.
type shadowTask[Out any] struct {
	stage     flags.Stage
	key       string
	served    flags.Side
	shadow    flags.Side
	ready     handoff // published once out and err are set
	out       Out
	err       error
	servedLat time.Duration
}

// Read returns the served side's result for in. When the stage compares
// and the key is sampled, the other side is read concurrently on the pool
// and compared after the caller has its answer; nothing of the shadow side
// reaches the caller, neither its errors, nor its panics, nor its latency.
func (r *Reader[In, Out]) Read(ctx context.Context, in In) (Out, error) {
	key := r.key(in)
	stage, serr := r.source.Stage(ctx, r.migration, key)
	if serr != nil {
		r.m.stageErrors.Add(ctx, 1, r.m.migOpts...)
	}
	served, shadow := stage.Reads(), stage.Compared()
	if shadow == flags.NoSide || !r.Sampled(key, r.rate(ctx, key)) {
		out, _, err := r.call(ctx, stage, served, roleServed, in)
		return out, err
	}
	t := &shadowTask[Out]{stage: stage, key: key, served: served, shadow: shadow}
	if r.cfg.wait {
		out, lat, err := r.call(ctx, stage, served, roleServed, in)
		t.out, t.err, t.servedLat = out, err, lat
		t.ready.publish()
		r.runShadow(context.WithoutCancel(ctx), t, in)
		return out, err
	}
	// Detached on the worker: the caller's path pays one closure, not also
	// the context wrapper.
	ok, perr := r.pool.TrySubmit(func() { r.runShadow(context.WithoutCancel(ctx), t, in) })
	if !ok {
		// Shed (full queue) or closed: either way this read is not compared.
		_ = perr
		r.m.compared(ctx, resShed)
	}
	out, lat, err := r.call(ctx, stage, served, roleServed, in)
	if ok {
		t.out, t.err, t.servedLat = out, err, lat
		t.ready.publish()
	}
	return out, err
}

// handoff tells the comparison that the served result is set. The caller
// only flips a flag; a channel is made, by the worker, only when the worker
// has to wait for the served read, so the caller's path allocates nothing
// for it.
type handoff struct {
	state atomic.Uint32 // handoffPending, handoffReady or handoffWaiting
	wait  chan struct{} // set by the worker before it announces handoffWaiting
}

const (
	handoffPending uint32 = iota
	handoffReady
	handoffWaiting
)

// publish marks the served result set (and wakes a waiting worker).
func (h *handoff) publish() {
	if !h.state.CompareAndSwap(handoffPending, handoffReady) {
		close(h.wait) // the worker is waiting: state is handoffWaiting
	}
}

// await reports whether the served result is set, waiting for it until ctx
// ends.
func (h *handoff) await(ctx context.Context) bool {
	if h.state.Load() == handoffReady {
		return true
	}
	h.wait = make(chan struct{})
	if !h.state.CompareAndSwap(handoffPending, handoffWaiting) {
		return true // published meanwhile
	}
	select {
	case <-h.wait:
		return true
	case <-ctx.Done():
		return false
	}
}

func (r *Reader[In, Out]) rate(ctx context.Context, key string) float64 {
	if r.cfg.rate == nil {
		return 1
	}
	return r.cfg.rate(ctx, key)
}

// call runs one side, recovering a panic, and reports it unless it is a
// re-read (re-reads are not operations of the service).
func (r *Reader[In, Out]) call(ctx context.Context, stage flags.Stage, side flags.Side, ro role, in In) (out Out, lat time.Duration, err error) {
	start := time.Now()
	defer func() {
		if p := recover(); p != nil {
			err = &PanicError{Migration: r.migration, Side: side, Value: p, Stack: debug.Stack()}
			if ro != roleServed {
				r.m.compared(ctx, resPanic)
			}
		}
		lat = time.Since(start)
		if ro == roleRecheck {
			return
		}
		r.m.call(ctx, side, ro, lat, err != nil)
		if ro == roleServed && r.cfg.observer != nil {
			r.cfg.observer.Observe(flags.Observation{Migration: r.migration, Stage: stage, Op: flags.Read,
				Side: side, Latency: lat, Err: err != nil})
		}
	}()
	out, err = r.fns[side](ctx, in)
	return out, 0, err
}

// runShadow reads the shadow side, waits for the served result, compares,
// and on a mismatch re-reads both sides once after the recheck delay.
func (r *Reader[In, Out]) runShadow(ctx context.Context, t *shadowTask[Out], in In) {
	sctx, cancel := context.WithTimeout(ctx, r.cfg.timeout)
	defer cancel()
	sOut, sLat, sErr := r.call(sctx, t.stage, t.shadow, roleShadow, in)
	obs := flags.Observation{Migration: r.migration, Stage: t.stage, Op: flags.Read, Side: t.shadow, Latency: sLat, Err: sErr != nil}
	scheduled := false
	defer func() {
		if !scheduled {
			r.observe(obs)
		}
	}()
	if !t.ready.await(sctx) {
		// The served read outlived the shadow deadline: nothing to compare.
		r.m.compared(ctx, resShadowError)
		return
	}
	if errors.Is(sErr, ErrPanic) {
		return // counted in call
	}
	v, diff, ok := r.verdict(ctx, t.out, t.err, sOut, sErr)
	if !ok {
		return
	}
	switch v {
	case ShadowError:
		r.m.compared(ctx, resShadowError)
		return
	case Skip:
		return
	case Match:
		obs.Compared = true
		r.m.compared(ctx, resMatch)
		return
	}
	obs.Compared, obs.Mismatch, obs.Lasting = true, true, true
	if r.cfg.recheck > 0 && !r.cfg.wait {
		// The re-read waits on a timer, not on this worker: a worker held
		// for the delay would leave a busy pool shedding comparisons.
		scheduled = true
		r.scheduleRecheck(ctx, t, in, func(lasting bool) {
			obs.Lasting = lasting
			r.mismatch(ctx, t, diff, obs)
			r.observe(obs)
		})
		return
	}
	if r.cfg.recheck > 0 {
		obs.Lasting = r.recheck(ctx, t, in)
	}
	r.mismatch(ctx, t, diff, obs)
}

// mismatch counts and reports a decided mismatch.
func (r *Reader[In, Out]) mismatch(ctx context.Context, t *shadowTask[Out], diff Diff, obs flags.Observation) {
	if obs.Lasting {
		r.m.compared(ctx, resMismatch)
	} else {
		r.m.compared(ctx, resTransient)
	}
	r.report(ctx, Report{Migration: r.migration, Key: t.key, Stage: t.stage, Served: t.served, Shadow: t.shadow,
		Diff: diff, Lasting: obs.Lasting, At: time.Now().UTC()})
}

// scheduleRecheck re-reads both sides after the recheck delay on a goroutine
// of its own and hands the verdict to decide. Pending re-reads are bounded
// (workers + queue of the pool): past the bound, or once the reader shuts
// down, the mismatch cannot be shown transient and stays lasting, the
// conservative verdict for the watchdog. The re-read keeps the stage of the
// first read, so a verdict that lands after a stage change is still counted
// under the stage that produced it.
func (r *Reader[In, Out]) scheduleRecheck(ctx context.Context, t *shadowTask[Out], in In, decide func(lasting bool)) {
	r.rechecks.mu.Lock()
	if r.rechecks.closed || r.rechecks.pending >= r.cfg.workers+r.cfg.queue {
		r.rechecks.mu.Unlock()
		r.m.rechecksSkipped.Add(ctx, 1, r.m.migOpts...)
		decide(true)
		return
	}
	r.rechecks.pending++
	r.rechecks.wg.Add(1)
	r.rechecks.mu.Unlock()
	go func() {
		defer func() {
			r.rechecks.mu.Lock()
			r.rechecks.pending--
			r.rechecks.mu.Unlock()
			r.rechecks.wg.Done()
		}()
		decide(r.recheck(ctx, t, in))
	}()
}

// PendingRechecks is the number of mismatches waiting for their re-read.
func (r *Reader[In, Out]) PendingRechecks() int {
	r.rechecks.mu.Lock()
	defer r.rechecks.mu.Unlock()
	return r.rechecks.pending
}

func (r *Reader[In, Out]) observe(o flags.Observation) {
	if r.cfg.observer != nil {
		r.cfg.observer.Observe(o)
	}
}

// verdict applies the error policy, then the comparator; ok is false when
// the comparator panicked (counted, logged).
func (r *Reader[In, Out]) verdict(ctx context.Context, out Out, err error, sOut Out, sErr error) (v Verdict, diff Diff, ok bool) {
	if err != nil || sErr != nil {
		v = r.cfg.errPolicy(err, sErr)
		if v == Mismatch {
			diff = Diff{{Path: "<error>", Served: errString(err), Shadow: errString(sErr)}}
		}
		return v, diff, true
	}
	defer func() {
		if p := recover(); p != nil {
			r.m.compared(ctx, resPanic)
			r.cfg.logger.LogAttrs(ctx, slog.LevelError, "shadowread: comparator panicked",
				slog.String("migration", r.migration), slog.Any("panic", p), slog.String("stack", string(debug.Stack())))
			if r.cfg.onMismatch != nil {
				r.cfg.onMismatch(Report{Migration: r.migration, Diff: Diff{{Path: "<comparator panic>", Served: fmt.Sprint(p)}}, Lasting: true})
			}
			v, diff, ok = Skip, nil, false
		}
	}()
	diff = r.compare(out, sOut)
	if len(diff) == 0 {
		return Match, nil, true
	}
	return Mismatch, diff, true
}

// recheck waits the delay, reads both sides again and says whether they
// still differ. If the re-read cannot decide (an error, a timeout), the
// first verdict stands: a mismatch that cannot be shown transient is lasting.
func (r *Reader[In, Out]) recheck(ctx context.Context, t *shadowTask[Out], in In) bool {
	timer := time.NewTimer(r.cfg.recheck)
	select {
	case <-timer.C:
	case <-r.stop:
		timer.Stop()
		return true
	}
	rctx, cancel := context.WithTimeout(ctx, r.cfg.timeout)
	defer cancel()
	out, _, err := r.call(rctx, t.stage, t.served, roleRecheck, in)
	sOut, _, sErr := r.call(rctx, t.stage, t.shadow, roleRecheck, in)
	if errors.Is(err, ErrPanic) || errors.Is(sErr, ErrPanic) {
		return true
	}
	v, _, ok := r.verdict(ctx, out, err, sOut, sErr)
	return !ok || v != Match
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

// report hands a mismatch to the test hook (always) and to the sink (at
// most one per report interval, values removed or redacted, then cleaned).
func (r *Reader[In, Out]) report(ctx context.Context, rep Report) {
	if r.cfg.onMismatch != nil {
		r.cfg.onMismatch(rep)
	}
	if r.cfg.sink == nil {
		return
	}
	r.lastRep.Lock()
	now := time.Now()
	if !r.lastAt.IsZero() && now.Sub(r.lastAt) < r.cfg.reportEvery {
		r.lastRep.Unlock()
		r.m.reportsDropped.Add(ctx, 1, r.m.migOpts...)
		return
	}
	r.lastAt = now
	r.lastRep.Unlock()
	rep = rep.withValues(r.cfg.redact)
	if r.cfg.clean != nil {
		rep = r.cfg.clean(rep)
	}
	r.cfg.sink.Report(ctx, rep)
}

// Shutdown stops taking shadow reads (later ones are counted as shed),
// cuts the recheck delays short and waits for running comparisons and
// re-reads, until ctx ends.
func (r *Reader[In, Out]) Shutdown(ctx context.Context) error {
	r.stopOnce.Do(func() { close(r.stop) })
	if r.pool == nil {
		return nil
	}
	if err := r.pool.Shutdown(ctx); err != nil {
		return fmt.Errorf("shadowread: %s: %w", r.migration, err)
	}
	r.rechecks.mu.Lock()
	r.rechecks.closed = true
	r.rechecks.mu.Unlock()
	done := make(chan struct{})
	go func() { r.rechecks.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("shadowread: %s: waiting for re-reads: %w", r.migration, ctx.Err())
	}
}

// Close is Shutdown without a deadline.
func (r *Reader[In, Out]) Close() error { return r.Shutdown(context.Background()) }
