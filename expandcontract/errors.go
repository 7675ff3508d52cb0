package expandcontract

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dimmer-dev/dimmer/flags"
)

var (
	// ErrUnknownStage: a stage name is not one of the five.
	ErrUnknownStage = errors.New("expandcontract: unknown stage")
	// ErrInvalidName: a plan or step name is empty or has characters the
	// registry and the fleet attributes cannot carry.
	ErrInvalidName = errors.New("expandcontract: invalid name")
	// ErrInvalidPlan: a plan definition is incomplete or inconsistent.
	ErrInvalidPlan = errors.New("expandcontract: invalid plan")
	// ErrUnknownPlan: no plan of that name was registered.
	ErrUnknownPlan = errors.New("expandcontract: unknown plan")
	// ErrIncompatible: this build cannot run with the schema's current
	// stage of some plan (see [IncompatibleError]).
	ErrIncompatible = errors.New("expandcontract: schema stage incompatible with this build")
	// ErrBusy: another process is applying the plan right now.
	ErrBusy = errors.New("expandcontract: plan is being applied by another process")
	// ErrLockTimeout: a step could not take its locks within lock_timeout
	// on any attempt; nothing of that step was applied and the phase can be
	// resumed later.
	ErrLockTimeout = errors.New("expandcontract: lock timeout")
	// ErrPlanChanged: a registered plan's definition differs from the code's
	// in a phase that has already run.
	ErrPlanChanged = errors.New("expandcontract: plan definition changed after it ran")
	// ErrInvalidIndex: a concurrent step's index is missing or not valid
	// after its build (for example a unique index over duplicate values).
	ErrInvalidIndex = errors.New("expandcontract: index not valid after a concurrent build")
	// ErrWrongStage: the operation is not possible from the plan's stage
	// (for example contract before migrating, rollback after contract).
	ErrWrongStage = errors.New("expandcontract: operation not possible at this stage")
)

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,99}$`)

// ValidateName checks a plan or step name: 1-100 characters of a-z, 0-9,
// '_', '.', '-', starting with a letter or digit.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w %q: use 1-100 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
			ErrInvalidName, flags.Echo(name))
	}
	return nil
}

// Incompatibility is one plan whose current stage a build cannot run with.
type Incompatibility struct {
	Plan  string
	Stage Stage
	// Running names a phase in progress or interrupted ("expand",
	// "contract", "rollback"): the schema may then be anywhere between the
	// stage and the phase's target, and the build must cope with both.
	Running string
	Range   Range
}

func (i Incompatibility) String() string {
	at := i.Stage.String()
	if i.Running != "" {
		at += " with " + i.Running + " in progress"
	}
	return fmt.Sprintf("plan %s is %s; this build runs with %s", i.Plan, at, i.Range)
}

// IncompatibleError is [Registry.Check]'s refusal: every plan whose stage is
// outside the build's declared range.
type IncompatibleError struct{ Problems []Incompatibility }

func (e *IncompatibleError) Error() string {
	var b strings.Builder
	b.WriteString("schema stage incompatible with this build:")
	for _, p := range e.Problems {
		b.WriteString("\n  - " + p.String())
	}
	return b.String()
}

func (e *IncompatibleError) Unwrap() error { return ErrIncompatible }

// StepError is a step that failed: which plan, phase and step, after how
// many attempts and why. Steps before it stay applied; the phase resumes at
// this step when run again.
type StepError struct {
	Plan, Phase, Step string
	Attempts          int
	Elapsed           time.Duration
	Err               error
}

func (e *StepError) Error() string {
	return fmt.Sprintf("plan %s: %s step %s failed after %d attempt(s) in %v: %v%s (run %s again to resume at this step)",
		e.Plan, e.Phase, e.Step, e.Attempts, e.Elapsed.Round(time.Millisecond), e.Err, serverDetail(e.Err), e.Phase)
}

// serverDetail is the server's DETAIL and HINT of a failed statement, which
// PgError's own message leaves out: for a unique index that cannot be
// built, the duplicated key.
func serverDetail(err error) string {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return ""
	}
	var b strings.Builder
	if pgErr.Detail != "" {
		b.WriteString("; DETAIL: " + pgErr.Detail)
	}
	if pgErr.Hint != "" {
		b.WriteString("; HINT: " + pgErr.Hint)
	}
	return b.String()
}

func (e *StepError) Unwrap() error { return e.Err }
