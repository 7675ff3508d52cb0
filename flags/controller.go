package flags

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"time"
)

// Controller moves migrations between stages by the stage model's rules: one
// step forward at a time, any step back before complete, leaving complete only
// with proof that old was reconciled or by force with a reason. Forward steps
// run the guards; every change and every refusal is audited in the store.
// Changes use optimistic concurrency: of two operators racing, one wins and
// the other gets a *ConflictError.
type Controller struct {
	store     Store
	guards    []Guard
	reconcile Guard
	now       func() time.Time
	logger    *slog.Logger
}

// ControllerOption configures a [Controller].
type ControllerOption func(*Controller) error

// WithGuards adds go/no-go checks run before forward transitions.
func WithGuards(guards ...Guard) ControllerOption {
	return func(c *Controller) error {
		for i, g := range guards {
			if g == nil {
				return fmt.Errorf("WithGuards: guard %d is nil", i)
			}
		}
		c.guards = append(c.guards, guards...)
		return nil
	}
}

// WithFleet adds the [FleetGuard] over the fleet registry.
func WithFleet(fleet FleetStore) ControllerOption {
	return func(c *Controller) error {
		if fleet == nil {
			return errors.New("WithFleet: fleet store is nil")
		}
		c.guards = append(c.guards, FleetGuard(fleet))
		return nil
	}
}

// WithReconciliation sets the check that proves old was reconciled with new
// (a verified reverse backfill), which allows leaving complete without force.
func WithReconciliation(g Guard) ControllerOption {
	return func(c *Controller) error {
		if g == nil {
			return errors.New("WithReconciliation: guard is nil")
		}
		c.reconcile = g
		return nil
	}
}

// WithControllerLogger sets the logger (default slog.Default()).
func WithControllerLogger(l *slog.Logger) ControllerOption {
	return func(c *Controller) error {
		if l == nil {
			return errors.New("WithControllerLogger: logger is nil")
		}
		c.logger = l
		return nil
	}
}

// WithClock sets the time source for audit entries (tests).
func WithClock(now func() time.Time) ControllerOption {
	return func(c *Controller) error {
		if now == nil {
			return errors.New("WithClock: clock is nil")
		}
		c.now = now
		return nil
	}
}

// NewController returns a controller over store.
func NewController(store Store, opts ...ControllerOption) (*Controller, error) {
	if store == nil {
		return nil, errors.New("flags.NewController: store is nil")
	}
	c := &Controller{store: store, now: time.Now, logger: slog.Default()}
	for _, o := range opts {
		if err := o(c); err != nil {
			return nil, fmt.Errorf("flags.NewController: %w", err)
		}
	}
	return c, nil
}

// Store returns the controller's store.
func (c *Controller) Store() Store { return c.store }

// Request asks for a migration's new state.
type Request struct {
	Migration string
	// Stage is the target stage.
	Stage Stage
	// Percent of keys served Stage, the rest keeping the current base
	// stage; 0 (unset) and 100 both mean every key. See [Controller.Rollout]
	// for a percentage where 0 means nobody.
	Percent float64
	// Actor and Reason are required: they go to the audit log.
	Actor, Reason string
	// Force overrides failed guards and the leaving-complete rule (never
	// the one-step-forward rule). It is audited as forced.
	Force bool
}

func (r Request) validate() error {
	if err := ValidateName(r.Migration); err != nil {
		return err
	}
	if !r.Stage.Valid() {
		return &UnknownStageError{Value: r.Stage.String()}
	}
	if err := checkPercent(r.Migration, r.Percent); err != nil {
		return err
	}
	if strings.TrimSpace(r.Actor) == "" {
		return fmt.Errorf("%s: %w: actor is required (who asks for the change)", r.Migration, ErrInvalidRequest)
	}
	if strings.TrimSpace(r.Reason) == "" {
		return fmt.Errorf("%s: %w: reason is required (why the change is made)", r.Migration, ErrInvalidRequest)
	}
	return checkText(r.Migration, r.Actor, r.Reason)
}

// checkPercent refuses a percentage a rollout cannot serve. A rollout's
// share is a whole number of [Bucket]'s buckets, so a percentage that
// rounds to none of them would be stored as a rollout moving no key, and
// one that rounds to all of them would move every key without the checks
// that finishing a rollout gets (100 %).
func checkPercent(migration string, pct float64) error {
	if math.IsNaN(pct) || pct < 0 || pct > 100 {
		return fmt.Errorf("%s: %w: percent %v: must be between 0 and 100", migration, ErrInvalidRequest, pct)
	}
	if pct == 0 || pct == 100 {
		return nil
	}
	switch n := math.Round(pct * BucketCount / 100); {
	case n < 1:
		return fmt.Errorf("%s: %w: percent %v rounds to no key (a rollout moves keys in steps of %v %%): use at least %[4]v, or 0 to end the rollout",
			migration, ErrInvalidRequest, pct, 100.0/BucketCount)
	case n >= BucketCount:
		return fmt.Errorf("%s: %w: percent %v rounds to every key (a rollout moves keys in steps of %v %%): use 100 to move every key, which is checked as finishing the rollout",
			migration, ErrInvalidRequest, pct, 100.0/BucketCount)
	}
	return nil
}

// checkText refuses an actor or reason longer than [MaxText]: the audit
// log is read by people, and a runaway value (a pasted file, a loop) must
// not be stored, not even for a refused step.
func checkText(migration, actor, reason string) error {
	if len(reason) > MaxText {
		return fmt.Errorf("%s: %w: reason is %d bytes, at most %d are kept in the audit log: shorten it", migration, ErrTextTooLong, len(reason), MaxText)
	}
	if len(actor) > MaxText {
		return fmt.Errorf("%s: %w: actor is %d bytes, at most %d: shorten it", migration, ErrTextTooLong, len(actor), MaxText)
	}
	return nil
}

// target computes the next state from the current one.
func (r Request) target(cur State) State {
	next := cur
	next.Rollout = nil
	if r.Percent == 0 || r.Percent == 100 || r.Stage == cur.Stage {
		next.Stage = r.Stage
	} else {
		next.Rollout = &Rollout{Stage: r.Stage, Percent: r.Percent}
	}
	return next
}

// Plan evaluates a request without applying it: the transition and every
// check with its verdict. The error is a *RefusedError when the request would
// be refused (forcing may still apply it, unless it skips a stage).
func (c *Controller) Plan(ctx context.Context, r Request) (Transition, []CheckResult, error) {
	if err := r.validate(); err != nil {
		return Transition{}, nil, err
	}
	cur, err := c.store.Load(ctx, r.Migration)
	if err != nil {
		return Transition{}, nil, fmt.Errorf("%s: load: %w", r.Migration, err)
	}
	t := Transition{Migration: r.Migration, From: cur, To: r.target(cur), Actor: r.Actor, Reason: r.Reason, Force: r.Force}
	checks, refused := c.judge(ctx, t)
	if refused != nil {
		return t, checks, refused
	}
	return t, checks, nil
}

// judge runs the rules and guards. refused is non-nil when some check failed
// that force does not (or may not) override.
func (c *Controller) judge(ctx context.Context, t Transition) (checks []CheckResult, refused *RefusedError) {
	if bad := t.skips(); len(bad) > 0 {
		for _, m := range bad {
			checks = append(checks, CheckResult{Name: "one-step-forward", Detail: "skips a stage: " + m.String()})
		}
	} else {
		checks = append(checks, CheckResult{Name: "one-step-forward", Passed: true, Detail: "no stage is skipped"})
	}
	if t.LeavingComplete() {
		res := CheckResult{Name: "leaving-complete"}
		switch {
		case c.reconcile != nil:
			if err := c.reconcile.Check(ctx, t); err != nil {
				res.Detail = fmt.Sprintf("old is not proven reconciled (%s: %v); force with a reason to override", c.reconcile.Name(), err)
			} else {
				res.Passed, res.Detail = true, "old reconciled: "+c.reconcile.Name()
			}
		default:
			res.Detail = "complete stopped writing old: prove it was reconciled (reverse backfill) or force with a reason"
		}
		checks = append(checks, res)
	}
	if t.Forward() {
		for _, g := range c.guards {
			if !g.Applies(t) {
				continue
			}
			res := CheckResult{Name: g.Name(), Passed: true, Detail: "ok"}
			if err := g.Check(ctx, t); err != nil {
				res.Passed, res.Detail = false, err.Error()
			}
			checks = append(checks, res)
		}
	}
	var failed []CheckResult
	for _, ch := range checks {
		if !ch.Passed {
			failed = append(failed, ch)
		}
	}
	if len(failed) > 0 {
		refused = &RefusedError{Migration: t.Migration, From: t.From.String(), To: t.To.String(), Failed: failed}
	}
	return checks, refused
}

// Set applies a request: the rules and guards are checked, the change is
// stored if the migration did not change meanwhile, and the attempt is
// audited either way.
func (c *Controller) Set(ctx context.Context, r Request) (State, error) {
	if r.Force && r.Reason == "" {
		return State{}, fmt.Errorf("%s: force requires a reason", r.Migration)
	}
	t, checks, err := c.Plan(ctx, r)
	var refused *RefusedError
	var corrupt *CorruptFlagError
	switch {
	case (err == nil || errors.As(err, &refused)) && sameServing(t.From, t.To):
		// Nothing would change: no new revision for every instance to
		// acknowledge, no audit entry, whatever the checks say.
		return t.From, nil
	case errors.As(err, &corrupt):
		if !r.Force {
			return State{}, err
		}
		return c.overwriteCorrupt(ctx, r, corrupt)
	case errors.As(err, &refused):
		if !r.Force || !overridable(refused) {
			c.audit(ctx, t, checks, Refused)
			return t.From, refused
		}
	case err != nil:
		return State{}, err
	}
	next := t.To
	if moves := t.Moves(); returnsToOff(moves) {
		// New is stale from here: it must be backfilled again.
		next.Epoch++
	}
	next.UpdatedAt = c.now().UTC()
	next.UpdatedBy = r.Actor
	entry := c.entry(t, checks, Applied)
	stored, err := c.store.Swap(ctx, t.From.Revision, next, entry)
	if err != nil {
		return t.From, err
	}
	c.logger.Info("stage changed", "migration", t.Migration, "from", t.From.String(), "to", stored.String(),
		"revision", stored.Revision, "actor", r.Actor, "forced", r.Force, "reason", r.Reason)
	return stored, nil
}

// sameServing reports whether two states serve every key the same stage.
func sameServing(a, b State) bool {
	if a.Stage != b.Stage || (a.Rollout == nil) != (b.Rollout == nil) {
		return false
	}
	return a.Rollout == nil || *a.Rollout == *b.Rollout
}

// overwriteCorrupt replaces a stored document that does not decode, on a
// forced request: no rule or guard can judge a step from an unknown stage.
// The audit entry's From keeps the corrupt document (capped). The epoch
// goes one past what the document still says (0 if nothing), so the new
// side counts as stale until it is backfilled and verified again.
func (c *Controller) overwriteCorrupt(ctx context.Context, r Request, corrupt *CorruptFlagError) (State, error) {
	var lenient struct {
		Epoch int64 `json:"epoch"`
	}
	_ = json.Unmarshal(corrupt.Raw, &lenient)
	next := r.target(State{Migration: r.Migration, Stage: r.Stage})
	next.Epoch = lenient.Epoch + 1
	next.UpdatedAt, next.UpdatedBy = c.now().UTC(), r.Actor
	entry := AuditEntry{
		Migration: r.Migration, At: next.UpdatedAt, Actor: r.Actor,
		From: "corrupt " + CapText(string(corrupt.Raw)), To: next.String(), Reason: r.Reason,
		Forced: true, Outcome: Applied, Revision: corrupt.Revision,
		Checks: []CheckResult{{Name: "corrupt-flag", Detail: CapText(corrupt.Err.Error())}},
	}
	stored, err := c.store.Swap(ctx, corrupt.Revision, next, entry)
	if err != nil {
		return State{}, err
	}
	c.logger.Warn("corrupt stage flag overwritten", "migration", r.Migration, "to", stored.String(),
		"revision", stored.Revision, "actor", r.Actor, "reason", r.Reason, "corrupt", CapText(string(corrupt.Raw)))
	return stored, nil
}

func overridable(e *RefusedError) bool {
	for _, f := range e.Failed {
		if f.Name == "one-step-forward" {
			return false
		}
	}
	return true
}

func returnsToOff(moves []Move) bool {
	for _, m := range moves {
		if m.To == Off && m.From != Off {
			return true
		}
	}
	return false
}

func (c *Controller) entry(t Transition, checks []CheckResult, o Outcome) AuditEntry {
	return AuditEntry{
		Migration: t.Migration, At: c.now().UTC(), Actor: t.Actor,
		From: t.From.String(), To: t.To.String(), Reason: t.Reason,
		Forced: t.Force, Outcome: o, Revision: t.From.Revision, Checks: checks,
	}
}

func (c *Controller) audit(ctx context.Context, t Transition, checks []CheckResult, o Outcome) {
	if err := c.store.AppendAudit(ctx, c.entry(t, checks, o)); err != nil {
		c.logger.Error("audit append failed", "migration", t.Migration, "err", err)
	}
}

// Advance moves every key one stage forward from the base stage (finishing a
// rollout of the next stage, if one is under way).
func (c *Controller) Advance(ctx context.Context, migration, actor, reason string) (State, error) {
	cur, err := c.store.Load(ctx, migration)
	if err != nil {
		return State{}, err
	}
	if cur.Stage == Complete {
		return cur, fmt.Errorf("%s: already complete", migration)
	}
	return c.Set(ctx, Request{Migration: migration, Stage: cur.Stage + 1, Actor: actor, Reason: reason})
}

// Rollout serves stage to percent % of keys (chosen by [Bucket]) and the
// current base stage to the rest, guarded like an advance. 0 % ends a rollout
// (every key on the base stage), 100 % moves every key to stage.
func (c *Controller) Rollout(ctx context.Context, migration string, stage Stage, percent float64, actor, reason string) (State, error) {
	r, err := c.RolloutRequest(ctx, migration, stage, percent, actor, reason)
	if err != nil {
		return State{}, err
	}
	return c.Set(ctx, r)
}

// RolloutRequest is the request [Controller.Rollout] applies, for a caller
// that sets Force on it: a 0 % rollout asks for the current base stage.
func (c *Controller) RolloutRequest(ctx context.Context, migration string, stage Stage, percent float64, actor, reason string) (Request, error) {
	if err := checkPercent(migration, percent); err != nil {
		return Request{}, err
	}
	if percent == 0 {
		cur, err := c.store.Load(ctx, migration)
		if err != nil {
			return Request{}, err
		}
		stage = cur.Stage
	}
	return Request{Migration: migration, Stage: stage, Percent: percent, Actor: actor, Reason: reason}, nil
}

// StepBack moves every key served stage from to the stage before it, leaving
// other keys alone: the watchdog's rollback (live -> shadow, shadow ->
// dualwrite).
func (c *Controller) StepBack(ctx context.Context, migration string, from Stage, actor, reason string) (State, error) {
	if from == Off || !from.Valid() {
		return State{}, fmt.Errorf("%s: cannot step back from %s", migration, from)
	}
	if err := checkText(migration, actor, reason); err != nil {
		return State{}, err
	}
	cur, err := c.store.Load(ctx, migration)
	if err != nil {
		return State{}, err
	}
	next := cur
	if cur.Stage == from {
		next.Stage = from - 1
	}
	if cur.Rollout != nil {
		r := *cur.Rollout
		if r.Stage == from {
			r.Stage = from - 1
		}
		next.Rollout = &r
		if r.Stage == next.Stage {
			next.Rollout = nil
		}
	}
	t := Transition{Migration: migration, From: cur, To: next, Actor: actor, Reason: reason}
	if next.Stage == cur.Stage && sameRollout(next.Rollout, cur.Rollout) {
		return cur, fmt.Errorf("%s: no key is served %s (now %s)", migration, from, cur)
	}
	checks, refused := c.judge(ctx, t)
	if refused != nil {
		c.audit(ctx, t, checks, Refused)
		return cur, refused
	}
	if returnsToOff(t.Moves()) {
		next.Epoch++
	}
	next.UpdatedAt, next.UpdatedBy = c.now().UTC(), actor
	return c.store.Swap(ctx, cur.Revision, next, c.entry(t, checks, Applied))
}

func sameRollout(a, b *Rollout) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

// Status is a migration's go/no-go checklist.
type Status struct {
	State State
	// Next is the stage an Advance would move to (Complete: none).
	Next Stage
	// Checks are the verdicts an Advance would get now.
	Checks []CheckResult
	// Ready reports whether an Advance would be applied.
	Ready bool
	// Instances are the live instances and what they applied.
	Instances []Instance
	// FleetErr is set when the fleet registry could not be read.
	FleetErr error
}

// Status returns the migration's state and the checklist for its next step.
func (c *Controller) Status(ctx context.Context, migration string, fleet FleetStore) (Status, error) {
	if err := ValidateName(migration); err != nil {
		return Status{}, err
	}
	cur, err := c.store.Load(ctx, migration)
	if err != nil {
		return Status{}, err
	}
	st := Status{State: cur, Next: cur.Stage}
	if fleet != nil {
		st.Instances, st.FleetErr = fleet.Instances(ctx)
	}
	if cur.Stage == Complete {
		st.Checks = []CheckResult{{Name: "complete", Passed: true, Detail: "nothing left to advance"}}
		return st, nil
	}
	st.Next = cur.Stage + 1
	t := Transition{Migration: migration, From: cur, To: Request{Stage: st.Next}.target(cur)}
	var refused *RefusedError
	st.Checks, refused = c.judge(ctx, t)
	st.Ready = refused == nil
	return st, nil
}
