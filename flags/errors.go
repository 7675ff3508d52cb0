package flags

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

var (
	// ErrUnknownStage: a flag value or argument is not one of the six stages.
	ErrUnknownStage = errors.New("flags: unknown stage")
	// ErrRefused: a transition was refused by the transition rules or a guard.
	ErrRefused = errors.New("flags: transition refused")
	// ErrConflict: the migration changed between read and write (another
	// operator won the race).
	ErrConflict = errors.New("flags: concurrent change")
	// ErrInvalidName: a migration name is empty or has characters the stores
	// cannot carry.
	ErrInvalidName = errors.New("flags: invalid migration name")
	// ErrFlagUnavailable: the stage could not be evaluated (wrong type,
	// unknown stage, provider not ready or failing) and the fallback was
	// used. A flag never set is not unavailable: it reads as Off.
	ErrFlagUnavailable = errors.New("flags: stage flag unavailable")
	// ErrCorruptFlag: a stored flag document does not decode (invalid JSON,
	// an unknown stage, a bad rollout). Nothing reads or changes it until it
	// is overwritten by a forced change.
	ErrCorruptFlag = errors.New("flags: corrupt stored flag")
	// ErrTextTooLong: a reason or actor is longer than MaxText.
	ErrTextTooLong = errors.New("flags: text too long")
	// ErrInvalidRequest: a change asked of the controller is malformed (no
	// actor or reason, a percentage out of range or finer than a rollout
	// can serve), so it was neither checked nor applied.
	ErrInvalidRequest = errors.New("flags: invalid request")
)

// Echo returns s as it may be quoted back in an error: at most 64 bytes,
// with its length when cut, so a runaway argument does not flood a terminal
// or a log.
func Echo(s string) string {
	const n = 64
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return fmt.Sprintf("%s… (%d bytes)", s[:cut], len(s))
}

// CorruptFlagError is a stored flag document that does not decode: which
// migration, the store's revision of it, the raw document and why.
type CorruptFlagError struct {
	Migration string
	// Revision is the store's revision of the document, which a forced
	// overwrite swaps against.
	Revision int64
	Raw      []byte
	Err      error
}

func (e *CorruptFlagError) Error() string {
	return fmt.Sprintf("flag %s is corrupt in the store (revision %d): %v: overwrite it with a forced change and a reason",
		e.Migration, e.Revision, e.Err)
}

// Unwrap returns ErrCorruptFlag and the decoding error.
func (e *CorruptFlagError) Unwrap() []error { return []error{ErrCorruptFlag, e.Err} }

// SplitCorrupt separates the corrupt flags in an error of
// [Store.Migrations] (which joins one *CorruptFlagError per corrupt flag
// and still returns the others) from any other error, so a caller can
// show the good migrations and name the corrupt ones.
func SplitCorrupt(err error) (corrupt []*CorruptFlagError, rest error) {
	if err == nil {
		return nil, nil
	}
	errs := []error{err}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	}
	var others []error
	for _, e := range errs {
		var ce *CorruptFlagError
		if errors.As(e, &ce) {
			corrupt = append(corrupt, ce)
			continue
		}
		others = append(others, e)
	}
	return corrupt, errors.Join(others...)
}

// UnknownStageError names the value that is not a stage.
type UnknownStageError struct{ Value string }

func (e *UnknownStageError) Error() string {
	return fmt.Sprintf("unknown stage %q (valid stages: %s)", Echo(e.Value), ValidStages)
}

func (e *UnknownStageError) Unwrap() error { return ErrUnknownStage }

// RefusedError is a refused transition with every check that failed.
type RefusedError struct {
	Migration string
	From, To  string
	Failed    []CheckResult
}

func (e *RefusedError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s: transition %s -> %s refused:", e.Migration, e.From, e.To)
	for _, c := range e.Failed {
		fmt.Fprintf(&b, "\n  - %s: %s", c.Name, c.Detail)
	}
	return b.String()
}

func (e *RefusedError) Unwrap() error { return ErrRefused }

// ConflictError says which revision the caller expected and which it found.
type ConflictError struct {
	Migration         string
	Expected, Current int64
}

func (e *ConflictError) Error() string {
	return fmt.Sprintf("%s: changed concurrently (expected revision %d, found %d): reload and retry",
		e.Migration, e.Expected, e.Current)
}

func (e *ConflictError) Unwrap() error { return ErrConflict }
