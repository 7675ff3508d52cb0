package chaos

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"
)

// Clock is the time a [Scenario] runs against. The default is the wall
// clock; tests pass one they advance by hand.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type wallClock struct{}

func (wallClock) Now() time.Time                         { return time.Now() }
func (wallClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Step is one action of a [Scenario], run At after the scenario starts.
type Step struct {
	At   time.Duration
	Name string
	Do   func(ctx context.Context) error
}

// At is shorthand for a [Step].
func At(offset time.Duration, name string, do func(ctx context.Context) error) Step {
	return Step{At: offset, Name: name, Do: do}
}

// StepResult is what became of one step.
type StepResult struct {
	Name string
	At   time.Duration // planned offset
	Ran  time.Duration // offset it actually started at
	Took time.Duration
	Err  error // the step's error; context.Canceled for a step skipped by Stop
}

// ScenarioOption configures [NewScenario].
type ScenarioOption func(*Scenario) error

// WithClock runs the scenario against c.
func WithClock(c Clock) ScenarioOption {
	return func(s *Scenario) error {
		if c == nil {
			return errors.New("chaos: WithClock: clock is nil")
		}
		s.clock = c
		return nil
	}
}

// WithScenarioLogger logs each step as it starts and ends (default: discard).
func WithScenarioLogger(l *slog.Logger) ScenarioOption {
	return func(s *Scenario) error {
		if l == nil {
			return errors.New("chaos: WithScenarioLogger: logger is nil")
		}
		s.log = l
		return nil
	}
}

// OnStep calls f after every step, in the scenario's goroutine: a game
// day's timeline, or a test's probe.
func OnStep(f func(StepResult)) ScenarioOption {
	return func(s *Scenario) error {
		if f == nil {
			return errors.New("chaos: OnStep: func is nil")
		}
		s.onStep = f
		return nil
	}
}

// Scenario runs a list of steps on a schedule, one after the other, each at
// its offset from [Scenario.Start] (a step that overruns delays the next
// ones, never overlaps them). A failing step is recorded and the schedule
// goes on: a game day does not stop at the first surprise.
type Scenario struct {
	name   string
	steps  []Step
	clock  Clock
	log    *slog.Logger
	onStep func(StepResult)

	mu      sync.Mutex
	started bool
	cancel  context.CancelFunc
	done    chan struct{}
	results []StepResult
}

// NewScenario validates the steps (a name, an action, an offset >= 0 each)
// and orders them by offset, keeping the given order for equal offsets.
func NewScenario(name string, steps []Step, opts ...ScenarioOption) (*Scenario, error) {
	if name == "" {
		return nil, errors.New("chaos: NewScenario: name is empty")
	}
	if len(steps) == 0 {
		return nil, fmt.Errorf("chaos: scenario %s: no steps", name)
	}
	for n, st := range steps {
		switch {
		case st.Name == "":
			return nil, fmt.Errorf("chaos: scenario %s: step %d has no name", name, n)
		case st.Do == nil:
			return nil, fmt.Errorf("chaos: scenario %s: step %d (%s) has no action (Do is nil)", name, n, st.Name)
		case st.At < 0:
			return nil, fmt.Errorf("chaos: scenario %s: step %d (%s) has a negative offset %v", name, n, st.Name, st.At)
		}
	}
	s := &Scenario{
		name:  name,
		steps: slices.Clone(steps),
		clock: wallClock{},
		log:   slog.New(slog.DiscardHandler),
	}
	slices.SortStableFunc(s.steps, func(a, b Step) int { return cmp.Compare(a.At, b.At) })
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Start runs the scenario in a goroutine of its own until every step ran,
// ctx ends, or [Scenario.Stop]. A scenario starts once.
func (s *Scenario) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		return fmt.Errorf("chaos: scenario %s already started", s.name)
	}
	s.started = true
	ctx, s.cancel = context.WithCancel(ctx)
	s.done = make(chan struct{})
	go s.run(ctx, s.clock.Now())
	return nil
}

func (s *Scenario) run(ctx context.Context, t0 time.Time) {
	defer close(s.done)
	for n, st := range s.steps {
		if wait := t0.Add(st.At).Sub(s.clock.Now()); wait > 0 {
			select {
			case <-s.clock.After(wait):
			case <-ctx.Done():
			}
		}
		if ctx.Err() != nil {
			s.skip(n, ctx.Err())
			return
		}
		began := s.clock.Now()
		s.log.InfoContext(ctx, "chaos step", "scenario", s.name, "step", st.Name, "at", st.At)
		err := s.do(ctx, st)
		r := StepResult{Name: st.Name, At: st.At, Ran: began.Sub(t0), Took: s.clock.Now().Sub(began), Err: err}
		if err != nil {
			s.log.WarnContext(ctx, "chaos step failed", "scenario", s.name, "step", st.Name, "err", err)
		}
		s.mu.Lock()
		s.results = append(s.results, r)
		s.mu.Unlock()
		if s.onStep != nil {
			s.onStep(r)
		}
	}
}

// do runs a step, turning its panic into an error so one broken action does
// not kill the process of a game day.
func (s *Scenario) do(ctx context.Context, st Step) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("chaos: step %s panicked: %v", st.Name, p)
		}
	}()
	return st.Do(ctx)
}

func (s *Scenario) skip(from int, cause error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, st := range s.steps[from:] {
		s.results = append(s.results, StepResult{Name: st.Name, At: st.At, Err: cause})
	}
}

// Wait blocks until every step ran (or the scenario was stopped) and
// returns the results in schedule order with the steps' errors joined. It
// gives up with ctx's error when ctx ends first; the scenario goes on.
func (s *Scenario) Wait(ctx context.Context) ([]StepResult, error) {
	s.mu.Lock()
	done := s.done
	s.mu.Unlock()
	if done == nil {
		return nil, fmt.Errorf("chaos: scenario %s not started", s.name)
	}
	select {
	case <-done:
	case <-ctx.Done():
		return s.Results(), ctx.Err()
	}
	rs := s.Results()
	var errs []error
	for _, r := range rs {
		if r.Err != nil {
			errs = append(errs, fmt.Errorf("step %s: %w", r.Name, r.Err))
		}
	}
	return rs, errors.Join(errs...)
}

// Stop cancels the steps not yet run (the running one sees its context
// cancelled) and waits for the scenario's goroutine, or for ctx.
func (s *Scenario) Stop(ctx context.Context) error {
	s.mu.Lock()
	cancel, done := s.cancel, s.done
	s.mu.Unlock()
	if cancel == nil {
		return nil
	}
	cancel()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("chaos: stop scenario %s: %w", s.name, ctx.Err())
	}
}

// Results returns the results of the steps run so far.
func (s *Scenario) Results() []StepResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.results)
}
