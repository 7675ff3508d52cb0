package flags

import (
	"fmt"
	"strings"
)

// Stage is where a migration stands. Its string form is the flag's value; the
// six names are those of LaunchDarkly's migration flags, so such a flag works
// unchanged through any OpenFeature provider.
type Stage uint8

// The stages in their forward order.
const (
	Off Stage = iota
	DualWrite
	Shadow
	Live
	RampDown
	Complete
)

var stageNames = [...]string{"off", "dualwrite", "shadow", "live", "rampdown", "complete"}

// Stages returns every stage in forward order.
func Stages() []Stage { return []Stage{Off, DualWrite, Shadow, Live, RampDown, Complete} }

// ValidStages is the comma-separated list of stage names, for messages.
var ValidStages = strings.Join(stageNames[:], ", ")

// String returns the flag value of the stage.
func (s Stage) String() string {
	if s.Valid() {
		return stageNames[s]
	}
	return fmt.Sprintf("Stage(%d)", uint8(s))
}

// Valid reports whether s is one of the six stages.
func (s Stage) Valid() bool { return int(s) < len(stageNames) }

// ParseStage parses a flag value. An unknown value is an *UnknownStageError
// (matching [ErrUnknownStage]) whose message lists the valid stages.
func ParseStage(v string) (Stage, error) {
	for i, n := range stageNames {
		if v == n {
			return Stage(i), nil
		}
	}
	return Off, &UnknownStageError{Value: v}
}

// MarshalText implements encoding.TextMarshaler.
func (s Stage) MarshalText() ([]byte, error) {
	if !s.Valid() {
		return nil, &UnknownStageError{Value: s.String()}
	}
	return []byte(s.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Stage) UnmarshalText(b []byte) error {
	v, err := ParseStage(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// Side names one of the two stores of a migration.
type Side uint8

const (
	// NoSide is the zero Side: "none".
	NoSide Side = iota
	Old
	New
)

func (s Side) String() string {
	switch s {
	case Old:
		return "old"
	case New:
		return "new"
	}
	return "none"
}

// Other returns the opposite side.
func (s Side) Other() Side {
	switch s {
	case Old:
		return New
	case New:
		return Old
	}
	return NoSide
}

// The routing table (the README's stage model). It lives here and only here: dualwrite,
// shadowread and every other package ask these methods.
//
//	stage      writes     authoritative  reads  compared
//	off        old        old            old    -
//	dualwrite  old+new    old            old    -
//	shadow     old+new    old            old    new
//	live       old+new    new            new    old
//	rampdown   old+new    new            new    -
//	complete   new        new            new    -

// Writes reports whether writes go to side in this stage.
func (s Stage) Writes(side Side) bool {
	switch side {
	case Old:
		return s != Complete
	case New:
		return s != Off
	}
	return false
}

// Authoritative is the side whose write result is the caller's result: its
// failure fails the operation.
func (s Stage) Authoritative() Side {
	if s >= Live {
		return New
	}
	return Old
}

// Secondary is the non-authoritative write side, or NoSide when only one side
// is written. Its failures never fail the caller; they go to the repair log.
func (s Stage) Secondary() Side {
	other := s.Authoritative().Other()
	if s.Writes(other) {
		return other
	}
	return NoSide
}

// Reads is the side whose read result is returned to the caller.
func (s Stage) Reads() Side { return s.Authoritative() }

// Compared is the side read in the background and compared with [Stage.Reads],
// or NoSide when the stage runs no shadow read.
func (s Stage) Compared() Side {
	switch s {
	case Shadow:
		return New
	case Live:
		return Old
	}
	return NoSide
}

// The topic table (the README's streams section) differs in one cell: consumers move first, so
// in live producers still treat old as authoritative. Everything else is the
// table above read for a topic: producers write to the sides of
// [Stage.Writes], consumers read from [Stage.Reads], and the shadow group
// compares [Stage.Compared].
//
//	stage      produce to  produce ack from  consume from  compared
//	off        old         old               old           -
//	dualwrite  old+new     old               old           -
//	shadow     old+new     old               old           new
//	live       old+new     old               new           old
//	rampdown   old+new     new               new           -
//	complete   new         new               new           -

// ProduceAuthoritative is the cluster whose produce acknowledgement is a
// topic producer's result. It moves to new one stage after consumers do
// (rampdown, not live): a consumer switched to new must find every record
// there, which only holds while old is still acknowledged first and new is
// filled behind it with the order kept.
func (s Stage) ProduceAuthoritative() Side {
	if s >= RampDown {
		return New
	}
	return Old
}

// ProduceSecondary is the cluster a topic producer writes off the caller's
// path, or NoSide when it writes one cluster only.
func (s Stage) ProduceSecondary() Side {
	other := s.ProduceAuthoritative().Other()
	if s.Writes(other) {
		return other
	}
	return NoSide
}
