package expandcontract

import (
	"fmt"
	"maps"
	"slices"
	"strings"
)

// Stage is where a plan stands. The first four are ordered: a build declares
// the [Range] of them it can run with. [RolledBack] is outside the order: the
// expand was undone, so the schema has the pre-expand shape again and
// [Stage.Shape] reads it as [Pending].
type Stage uint8

const (
	// Pending: nothing applied; the schema has the old shape only.
	Pending Stage = iota
	// Expanded: the expand DDL ran; the old and the new shape both exist.
	Expanded
	// Migrating: the data move is under way (dual writes and the backfill of
	// the linked dimmer migration); both shapes still exist.
	Migrating
	// Contracted: the contract DDL ran; only the new shape is left.
	Contracted
	// RolledBack: the expand was undone before any contract step ran.
	RolledBack
)

var stageNames = [...]string{"pending", "expanded", "migrating", "contracted", "rolled back"}

// ValidStages lists the stage names, for messages.
var ValidStages = strings.Join(stageNames[:], ", ")

func (s Stage) String() string {
	if int(s) < len(stageNames) {
		return stageNames[s]
	}
	return fmt.Sprintf("Stage(%d)", uint8(s))
}

// Valid reports whether s is one of the five stages.
func (s Stage) Valid() bool { return int(s) < len(stageNames) }

// Shape is the ordered stage whose schema shape s has: RolledBack has the
// shape of Pending, every other stage its own.
func (s Stage) Shape() Stage {
	if s == RolledBack {
		return Pending
	}
	return s
}

// ParseStage parses a stage name ("rolled back" may also be written
// "rolled_back" or "rolledback").
func ParseStage(v string) (Stage, error) {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "rolled_back", "rolledback", "rolled-back":
		return RolledBack, nil
	}
	for i, n := range stageNames {
		if strings.EqualFold(strings.TrimSpace(v), n) {
			return Stage(i), nil
		}
	}
	return Pending, fmt.Errorf("%w %q (valid stages: %s)", ErrUnknownStage, v, ValidStages)
}

// Range is the span of a plan's stages a build can run with, both ends
// included: an old build that reads the old column declares
// {Pending, Migrating} ("cannot run once contracted"); the build that writes
// the new column declares {Expanded, Contracted} ("needs at least expanded").
type Range struct {
	Plan     string
	Min, Max Stage
}

// Validate names what is wrong with r.
func (r Range) Validate() error {
	if err := ValidateName(r.Plan); err != nil {
		return fmt.Errorf("range: %w", err)
	}
	if r.Min > Contracted || r.Max > Contracted {
		return fmt.Errorf("range of plan %s: %s..%s: the ends must be among pending, expanded, migrating, contracted", r.Plan, r.Min, r.Max)
	}
	if r.Min > r.Max {
		return fmt.Errorf("range of plan %s: %s..%s: min is after max", r.Plan, r.Min, r.Max)
	}
	return nil
}

// Contains reports whether the build can run with the schema shape of s.
func (r Range) Contains(s Stage) bool {
	sh := s.Shape()
	return sh >= r.Min && sh <= r.Max
}

// String is the published form, "expanded..contracted".
func (r Range) String() string { return r.Min.String() + ".." + r.Max.String() }

// ParseRange parses the published form "min..max" of plan's range.
func ParseRange(plan, v string) (Range, error) {
	lo, hi, ok := strings.Cut(v, "..")
	if !ok {
		return Range{}, fmt.Errorf("range %q of plan %s: want MIN..MAX, e.g. expanded..contracted", v, plan)
	}
	min, err := ParseStage(lo)
	if err != nil {
		return Range{}, fmt.Errorf("range %q of plan %s: %w", v, plan, err)
	}
	max, err := ParseStage(hi)
	if err != nil {
		return Range{}, fmt.Errorf("range %q of plan %s: %w", v, plan, err)
	}
	r := Range{Plan: plan, Min: min, Max: max}
	return r, r.Validate()
}

// AttributePrefix starts the fleet-registry attribute under which a build
// publishes its range for a plan: "dimmer.schema/<plan>" = "<min>..<max>".
const AttributePrefix = "dimmer.schema/"

// Attributes returns the fleet-registry attributes publishing the build's
// declared ranges; pass it to flags.WithAttributes on the service's
// Heartbeater so the contract and rollback guards see what every live
// instance needs. It panics on an invalid range: ranges are constants of a
// build, and [Registry.Check] at start-up reports them properly first.
func Attributes(ranges ...Range) func() map[string]string {
	m := make(map[string]string, len(ranges))
	for _, r := range ranges {
		if err := r.Validate(); err != nil {
			panic("expandcontract.Attributes: " + err.Error())
		}
		m[AttributePrefix+r.Plan] = r.String()
	}
	return func() map[string]string { return maps.Clone(m) }
}

// RangesFromAttributes reads back the ranges an instance published. An
// attribute under [AttributePrefix] that does not parse is returned as an
// error naming it, after the ranges that did.
func RangesFromAttributes(attrs map[string]string) (map[string]Range, error) {
	out := map[string]Range{}
	var bad []string
	for _, k := range slices.Sorted(maps.Keys(attrs)) {
		plan, ok := strings.CutPrefix(k, AttributePrefix)
		if !ok {
			continue
		}
		r, err := ParseRange(plan, attrs[k])
		if err != nil {
			bad = append(bad, err.Error())
			continue
		}
		out[plan] = r
	}
	if len(bad) > 0 {
		return out, fmt.Errorf("unreadable schema ranges: %s", strings.Join(bad, "; "))
	}
	return out, nil
}
