package backfill

import (
	"errors"
	"fmt"
)

var (
	// ErrSchemaMismatch: the backfill tables were installed by newer code.
	ErrSchemaMismatch = errors.New("backfill: schema mismatch")
	// ErrNotInstalled: the schema holds no backfill tables, or older ones
	// ([Backfiller.Check]; [Backfiller.Install] creates or upgrades them).
	ErrNotInstalled = errors.New("backfill: tables not installed")
	// ErrDefinitionChanged: a job resumed with another definition than the one
	// its checkpoints were made with. Details are in a *DefinitionChangedError.
	ErrDefinitionChanged = errors.New("backfill: job definition changed")
	// ErrInvalidJob: the job definition is incomplete or names something that
	// does not exist.
	ErrInvalidJob = errors.New("backfill: invalid job")
	// ErrUnknownJob: no job of that name is stored.
	ErrUnknownJob = errors.New("backfill: unknown job")
	// ErrStageNotReady: the migration is in a stage where a backfill would
	// lose rows (off: nothing dual-writes the rows created after the upper
	// bound) or is pointless (complete).
	ErrStageNotReady = errors.New("backfill: migration stage does not allow a backfill")
	// ErrJobNotFinished: a verification was asked to repair a job that is
	// still copying (or stopped before the end) at the current epoch.
	ErrJobNotFinished = errors.New("backfill: job not finished")
	// ErrEpochChanged: the migration went back to off while the job ran; the
	// new side is stale and the job must start again.
	ErrEpochChanged = errors.New("backfill: migration epoch changed")
	// ErrLeaseLost: another worker took over a range this worker held
	// (it was presumed dead). The worker's uncommitted chunk was rolled back.
	ErrLeaseLost = errors.New("backfill: range lease lost")
	// ErrNotVerifiable: the job's sink cannot be read back for verification
	// (Postgres tables and RedisSink hashes can), or a business check was
	// asked of a target that has no SQL.
	ErrNotVerifiable = errors.New("backfill: sink cannot be verified")
)

// DefinitionChangedError says what changed between the stored job and the
// one asked to resume.
type DefinitionChangedError struct {
	Job           string
	Stored, Given string // definition fingerprints
	StoredSpec    string
	GivenSpec     string
}

func (e *DefinitionChangedError) Error() string {
	return fmt.Sprintf("backfill: job %q was started with another definition (stored %s, given %s); its checkpoints do not apply: "+
		"finish it with the stored definition, or give the new definition another job name\n  stored: %s\n  given:  %s",
		e.Job, e.Stored, e.Given, e.StoredSpec, e.GivenSpec)
}

func (e *DefinitionChangedError) Unwrap() error { return ErrDefinitionChanged }

// FieldError names an invalid field of a job or configuration.
type FieldError struct {
	Field  string
	Reason string
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("backfill: invalid %s: %s", e.Field, e.Reason)
}
func (e *FieldError) Unwrap() error { return ErrInvalidJob }

func fieldErr(field, format string, args ...any) error {
	return &FieldError{Field: field, Reason: fmt.Sprintf(format, args...)}
}
