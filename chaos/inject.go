package chaos

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// ErrInjected matches every error an [Injector] makes up.
var ErrInjected = errors.New("chaos: injected fault")

// InjectedError is the error an [Injector] returns instead of calling the
// wrapped function. It matches [ErrInjected] and, when the injector was given
// one, the error it was told to return (a *pgconn.PgError, io.EOF...), so
// code under test that branches on that error sees it.
type InjectedError struct {
	Target string // the injector's name
	Err    error  // what the injector was told to return; nil for a bare ErrInjected
}

func (e *InjectedError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("chaos: injected fault in %s", e.Target)
	}
	return fmt.Sprintf("chaos: injected fault in %s: %v", e.Target, e.Err)
}

// Unwrap returns ErrInjected and the configured error.
func (e *InjectedError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrInjected}
	}
	return []error{ErrInjected, e.Err}
}

// InjectedPanic is the value an [Injector] panics with.
type InjectedPanic struct{ Target string }

func (p InjectedPanic) String() string { return "chaos: injected panic in " + p.Target }

// InjectorStats counts what an [Injector] did.
type InjectorStats struct {
	Calls  int64 // calls through the injector
	Errors int64 // calls answered with an injected error
	Hangs  int64 // calls held until their context ended
	Panics int64 // calls that panicked
	Passed int64 // calls that reached the wrapped function
}

// InjectorOption configures [NewInjector].
type InjectorOption func(*Injector) error

// WithSeed makes the injector's choices (which calls fail, how much jitter)
// a fixed sequence: a test that calls it in the same order sees the same
// faults on every run. Without it the seed is random.
func WithSeed(seed uint64) InjectorOption {
	return func(i *Injector) error {
		i.rng = rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
		return nil
	}
}

// Injector decides, call by call, whether a wrapped function fails, hangs,
// panics or runs late. Faults are switched at run time (a scenario or a
// test flips them while traffic flows) and it is safe for concurrent use.
// One Injector may wrap several functions: they share its faults and stats.
type Injector struct {
	name string

	mu        sync.Mutex
	rng       *rand.Rand
	errRate   float64
	err       error
	hangRate  float64
	panicRate float64
	latency   time.Duration
	jitter    time.Duration

	calls, errs, hangs, panics, passed atomic.Int64
}

// NewInjector returns a healthy injector named name (the name appears in
// its errors and panics).
func NewInjector(name string, opts ...InjectorOption) (*Injector, error) {
	if name == "" {
		return nil, errors.New("chaos: NewInjector: name is empty")
	}
	i := &Injector{name: name}
	for _, o := range opts {
		if err := o(i); err != nil {
			return nil, err
		}
	}
	if i.rng == nil {
		i.rng = rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	}
	return i, nil
}

// Name is the injector's name.
func (i *Injector) Name() string { return i.name }

func checkRate(what string, r float64) error {
	if !(r >= 0 && r <= 1) { // also refuses NaN
		return fmt.Errorf("chaos: %s %v is not in [0, 1]", what, r)
	}
	return nil
}

// FailRate makes a share rate (0..1) of calls return an [*InjectedError]
// wrapping err (nil: a bare [ErrInjected]) without calling the function.
func (i *Injector) FailRate(rate float64, err error) error {
	if e := checkRate("FailRate: rate", rate); e != nil {
		return e
	}
	i.mu.Lock()
	i.errRate, i.err = rate, err
	i.mu.Unlock()
	return nil
}

// HangRate makes a share rate of calls block until their context ends and
// return its error: a store that stopped answering, for testing timeouts.
func (i *Injector) HangRate(rate float64) error {
	if e := checkRate("HangRate: rate", rate); e != nil {
		return e
	}
	i.mu.Lock()
	i.hangRate = rate
	i.mu.Unlock()
	return nil
}

// PanicRate makes a share rate of calls panic with an [InjectedPanic].
func (i *Injector) PanicRate(rate float64) error {
	if e := checkRate("PanicRate: rate", rate); e != nil {
		return e
	}
	i.mu.Lock()
	i.panicRate = rate
	i.mu.Unlock()
	return nil
}

// SetLatency delays every call by d, give or take jitter (uniform in
// [d-jitter, d+jitter]), before it runs or fails. The delay ends early when
// the call's context does.
func (i *Injector) SetLatency(d, jitter time.Duration) error {
	if d < 0 || jitter < 0 || jitter > d {
		return fmt.Errorf("chaos: SetLatency(%v, %v): latency and jitter must be >= 0 and jitter <= latency", d, jitter)
	}
	i.mu.Lock()
	i.latency, i.jitter = d, jitter
	i.mu.Unlock()
	return nil
}

// Down(true) fails every call (FailRate(1, err)); Down(false) heals.
func (i *Injector) Down(on bool, err error) {
	if on {
		_ = i.FailRate(1, err)
	} else {
		i.Heal()
	}
}

// Heal switches every fault off.
func (i *Injector) Heal() {
	i.mu.Lock()
	i.errRate, i.err, i.hangRate, i.panicRate, i.latency, i.jitter = 0, nil, 0, 0, 0, 0
	i.mu.Unlock()
}

// Stats returns the counts so far.
func (i *Injector) Stats() InjectorStats {
	return InjectorStats{
		Calls: i.calls.Load(), Errors: i.errs.Load(), Hangs: i.hangs.Load(),
		Panics: i.panics.Load(), Passed: i.passed.Load(),
	}
}

type verdict uint8

const (
	pass verdict = iota
	fail
	hang
	crash
)

// decide draws this call's fate. Every call draws the same number of values
// in the same order whatever the faults, so a seeded sequence stays aligned
// when faults are switched between calls.
func (i *Injector) decide() (verdict, time.Duration, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	p, f, h, j := i.rng.Float64(), i.rng.Float64(), i.rng.Float64(), i.rng.Float64()
	delay := i.latency
	if i.jitter > 0 {
		delay += time.Duration((2*j - 1) * float64(i.jitter))
	}
	switch {
	case p < i.panicRate:
		return crash, delay, nil
	case h < i.hangRate:
		return hang, delay, nil
	case f < i.errRate:
		return fail, delay, i.err
	}
	return pass, delay, nil
}

// Before runs the injector's decision for one call: it waits out the
// latency, then returns nil (go on), an [*InjectedError], the context's
// error (a hang or a wait cut short), or panics. [Wrap] uses it; call it
// yourself to inject into code that is not a func(ctx, In) (Out, error).
func (i *Injector) Before(ctx context.Context) error {
	i.calls.Add(1)
	v, delay, err := i.decide()
	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
	switch v {
	case crash:
		i.panics.Add(1)
		panic(InjectedPanic{Target: i.name})
	case hang:
		i.hangs.Add(1)
		<-ctx.Done()
		return ctx.Err()
	case fail:
		i.errs.Add(1)
		return &InjectedError{Target: i.name, Err: err}
	}
	i.passed.Add(1)
	return nil
}

// Wrap returns f with inj's faults in front of it: the shape of dualwrite's
// and shadowread's user functions, so a store function is wrapped where it
// is handed to a Writer or Reader.
func Wrap[In, Out any](inj *Injector, f func(ctx context.Context, in In) (Out, error)) func(ctx context.Context, in In) (Out, error) {
	return func(ctx context.Context, in In) (Out, error) {
		if err := inj.Before(ctx); err != nil {
			var zero Out
			return zero, err
		}
		return f(ctx, in)
	}
}
