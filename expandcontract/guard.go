package expandcontract

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/dimmer-dev/dimmer/flags"
)

// Names of the contract and rollback checks.
const (
	CheckOldShapeUnused   = "no-instance-needs-old-shape"
	CheckMigrationDone    = "migration-complete"
	CheckBackfillVerified = "backfill-verified"
	CheckNewShapeUnused   = "no-instance-needs-new-shape"
	CheckMigrationOff     = "migration-off"
)

// ContractChecks judges whether the plan may contract now, listing every
// check: (a) no live instance declares a range that needs the pre-contract
// shape (an instance that declares no range for the plan counts as needing
// it: a build older than the plan reads the old shape), (b) the linked
// migration is complete on every key, (c) the backfill is verified. An
// empty fleet fails (a): it is more often the wrong registry than intent.
func (r *Registry) ContractChecks(ctx context.Context, plan string) ([]flags.CheckResult, error) {
	st, err := r.Status(ctx, plan)
	if err != nil {
		return nil, err
	}
	return r.checks(ctx, PhaseContract, st.Plan)
}

// RollbackChecks judges whether the plan may roll back now: no live
// instance declares a range that needs the expanded shape, and the linked
// migration is off (nothing writes or reads the new shape).
func (r *Registry) RollbackChecks(ctx context.Context, plan string) ([]flags.CheckResult, error) {
	st, err := r.Status(ctx, plan)
	if err != nil {
		return nil, err
	}
	return r.checks(ctx, PhaseRollback, st.Plan)
}

func (r *Registry) checks(ctx context.Context, action string, p Plan) ([]flags.CheckResult, error) {
	if action == PhaseContract {
		return []flags.CheckResult{
			r.fleetCheck(ctx, p.Name, CheckOldShapeUnused, Contracted),
			r.migrationCheck(ctx, p, CheckMigrationDone, flags.Complete),
			r.backfillCheck(ctx, p),
		}, nil
	}
	return []flags.CheckResult{
		r.fleetCheck(ctx, p.Name, CheckNewShapeUnused, Pending),
		r.migrationCheck(ctx, p, CheckMigrationOff, flags.Off),
	}, nil
}

// fleetCheck passes when every live instance can run with the shape the
// phase leaves behind (next).
func (r *Registry) fleetCheck(ctx context.Context, plan, name string, next Stage) flags.CheckResult {
	res := flags.CheckResult{Name: name}
	if r.fleet == nil {
		res.Detail = "no fleet registry configured: nothing proves that no live instance needs the shape being removed"
		return res
	}
	insts, err := r.fleet.Instances(ctx)
	if err != nil {
		res.Detail = fmt.Sprintf("fleet registry unreachable: %v", err)
		return res
	}
	if len(insts) == 0 {
		// As flags.FleetGuard: an empty fleet is more often the wrong
		// registry or a service down than a fleet that needs nothing.
		res.Detail = "no live instance is registered: nothing proves what the running builds need (wrong fleet registry, or the service is down?)"
		return res
	}
	var blocking []string
	for _, in := range insts {
		ranges, err := RangesFromAttributes(in.Attributes)
		rg, ok := ranges[plan]
		switch {
		case ok && rg.Contains(next):
			continue
		case ok:
			blocking = append(blocking, fmt.Sprintf("%s (build %s) runs with %s", in.ID, in.Build, rg))
		case err != nil && strings.Contains(err.Error(), AttributePrefix+plan):
			blocking = append(blocking, fmt.Sprintf("%s (build %s) published an unreadable range: %v", in.ID, in.Build, err))
		case next == Contracted:
			blocking = append(blocking, fmt.Sprintf("%s (build %s) declares no range for this plan, so it may read the old shape", in.ID, in.Build))
		}
	}
	if len(blocking) > 0 {
		slices.Sort(blocking)
		res.Detail = fmt.Sprintf("%d of %d live instance(s) cannot run once %s is %s: %s",
			len(blocking), len(insts), plan, next, strings.Join(blocking, "; "))
		return res
	}
	res.Passed = true
	res.Detail = fmt.Sprintf("all %d live instance(s) can run with %s %s", len(insts), plan, next)
	return res
}

func (r *Registry) migrationCheck(ctx context.Context, p Plan, name string, want flags.Stage) flags.CheckResult {
	res := flags.CheckResult{Name: name}
	if p.Migration == "" {
		res.Passed, res.Detail = true, "the plan moves no data (no linked migration)"
		return res
	}
	if r.flags == nil {
		res.Detail = fmt.Sprintf("no flag store configured: the stage of migration %s is unknown", p.Migration)
		return res
	}
	s, err := r.flags.Load(ctx, p.Migration)
	if err != nil {
		res.Detail = fmt.Sprintf("migration %s: flag store unreachable: %v", p.Migration, err)
		return res
	}
	if s.Stage != want || (s.Rollout != nil && s.Rollout.Percent > 0 && s.Rollout.Stage != want) {
		res.Detail = fmt.Sprintf("migration %s is %s, not %s on every key", p.Migration, s, want)
		return res
	}
	res.Passed, res.Detail = true, fmt.Sprintf("migration %s is %s (revision %d)", p.Migration, want, s.Revision)
	return res
}

// backfillCheck passes when the plan's data is verified either way it may
// have been moved: a recorded verification of its Transform, or the
// verifier's word on its backfill jobs.
func (r *Registry) backfillCheck(ctx context.Context, p Plan) flags.CheckResult {
	res := flags.CheckResult{Name: CheckBackfillVerified}
	if !p.Backfill {
		res.Passed, res.Detail = true, "the plan has no backfill"
		return res
	}
	var transform string
	if p.Transform != nil {
		ok, detail := r.transformVerified(ctx, p)
		if ok {
			res.Passed, res.Detail = true, detail
			return res
		}
		transform = "; " + detail
	}
	if r.verifier == nil {
		res.Detail = fmt.Sprintf("no verifier configured: nothing says the backfill of %s was verified%s", p.Migration, transform)
		return res
	}
	ok, detail, err := r.verifier.Verified(ctx, p.Migration)
	switch {
	case err != nil:
		res.Detail = fmt.Sprintf("backfill of %s: verification unknown: %v%s", p.Migration, err, transform)
	case !ok:
		res.Detail = fmt.Sprintf("backfill of %s is not verified: %s%s", p.Migration, detail, transform)
	default:
		res.Passed, res.Detail = true, fmt.Sprintf("backfill of %s verified: %s", p.Migration, detail)
	}
	return res
}

// Check is the start-up guard: it refuses, with an [*IncompatibleError]
// naming each plan, its stage and the build's range, when the schema's
// stage of any declared plan is outside the range this build can run with.
// A plan not registered yet counts as pending. While a phase is in progress
// or was interrupted, the schema may be anywhere between the stage and the
// phase's target, so the range must cover both.
func (r *Registry) Check(ctx context.Context, ranges ...Range) error {
	var problems []Incompatibility
	for _, rg := range ranges {
		if err := rg.Validate(); err != nil {
			return fmt.Errorf("expandcontract: check: %w", err)
		}
		st, err := r.Status(ctx, rg.Plan)
		switch {
		case err == nil:
		case isUnknownPlan(err):
			st = Status{Plan: Plan{Name: rg.Plan}, Stage: Pending}
		default:
			return fmt.Errorf("expandcontract: check: %w", err)
		}
		lo, hi := st.Shapes()
		if !rg.Contains(lo) || !rg.Contains(hi) {
			problems = append(problems, Incompatibility{Plan: rg.Plan, Stage: st.Stage, Running: st.Running, Range: rg})
		}
	}
	if len(problems) > 0 {
		return &IncompatibleError{Problems: problems}
	}
	return nil
}

func isUnknownPlan(err error) bool { return errors.Is(err, ErrUnknownPlan) }
