package flags

import (
	"context"
	"fmt"
	"slices"
	"strings"
)

// Guard is one go/no-go check the controller runs before a forward
// transition. Guards never judge a step back.
type Guard interface {
	// Name identifies the check in refusals, the audit log and status.
	Name() string
	// Applies reports whether the check has a say in t (for example only
	// when keys enter shadow).
	Applies(t Transition) bool
	// Check returns nil when the transition may go ahead, or an error whose
	// text says what is missing.
	Check(ctx context.Context, t Transition) error
}

// NewGuard builds a Guard from functions. applies may be nil (always).
func NewGuard(name string, applies func(Transition) bool, check func(context.Context, Transition) error) Guard {
	return &funcGuard{name: name, applies: applies, check: check}
}

type funcGuard struct {
	name    string
	applies func(Transition) bool
	check   func(context.Context, Transition) error
}

func (g *funcGuard) Name() string { return g.name }
func (g *funcGuard) Applies(t Transition) bool {
	return g.applies == nil || g.applies(t)
}
func (g *funcGuard) Check(ctx context.Context, t Transition) error { return g.check(ctx, t) }

// Entering returns an applies-function for guards that judge keys moving
// into any of the given stages.
func Entering(stages ...Stage) func(Transition) bool {
	return func(t Transition) bool {
		return slices.ContainsFunc(stages, t.Entering)
	}
}

// FleetGuard refuses a forward transition until every live instance has
// applied the migration's current revision (the fleet barrier): otherwise
// some instance could still route by a stage two steps behind the new one.
// With no live instance at all it refuses too: nothing would have seen the
// stage, which is more often a mistake (wrong store, service down) than intent.
func FleetGuard(fleet FleetStore) Guard {
	return NewGuard("fleet-acknowledged", Transition.Forward, func(ctx context.Context, t Transition) error {
		insts, err := fleet.Instances(ctx)
		if err != nil {
			return fmt.Errorf("fleet registry unreachable: %v", err)
		}
		if len(insts) == 0 {
			return fmt.Errorf("no live instance is registered: nothing has acknowledged revision %d", t.From.Revision)
		}
		var behind []string
		for _, in := range insts {
			if rev := in.Applied[t.Migration]; rev < t.From.Revision {
				behind = append(behind, fmt.Sprintf("%s at revision %d", in.ID, rev))
			}
		}
		if len(behind) > 0 {
			slices.Sort(behind)
			return fmt.Errorf("%d of %d instances have not applied revision %d: %s",
				len(behind), len(insts), t.From.Revision, strings.Join(behind, ", "))
		}
		return nil
	})
}
