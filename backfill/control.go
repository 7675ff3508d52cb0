package backfill

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// Pause holds every worker of the job, in every process, before its next
// chunk; each releases its range lease so a resume may start anywhere.
func (b *Backfiller) Pause(ctx context.Context, job, reason string) error {
	return b.setPaused(ctx, job, true, reason)
}

// Resume lets a paused job's workers go on from their checkpoints.
func (b *Backfiller) Resume(ctx context.Context, job string) error {
	return b.setPaused(ctx, job, false, "")
}

func (b *Backfiller) setPaused(ctx context.Context, job string, paused bool, reason string) error {
	tag, err := b.pool.Exec(ctx, `UPDATE `+b.t.jobs+` SET paused = $2, pause_reason = $3, updated_at = now() WHERE name = $1`, job, paused, reason)
	if err != nil {
		return fmt.Errorf("backfill: %s: %w", job, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("%w: %q (schema %s)", ErrUnknownJob, job, b.schema)
	}
	return nil
}

// JobStatus is a stored job as every process sees it.
type JobStatus struct {
	Name, Migration    string
	Epoch              int64
	Done, Paused       bool
	PauseReason        string
	RowsDone           int64
	EstimatedRows      int64
	Ranges, RangesDone int
	UpperBound         []string
	Spec               Spec
	StartedAt          time.Time
	FinishedAt         *time.Time
	UpdatedAt          time.Time
	RowsPerSecond      float64
	ETA                time.Duration
	Leases             []LeaseStatus
	LastVerification   *Verification
}

// LeaseStatus is a range currently held by a live worker (see
// [Backfiller.Status]).
type LeaseStatus struct {
	Range    int
	Owner    string
	Until    time.Time
	RowsDone int64
	Cursor   []string
}

// Jobs lists every stored job.
func (b *Backfiller) Jobs(ctx context.Context) ([]JobStatus, error) {
	rows, err := b.pool.Query(ctx, `SELECT name FROM `+b.t.jobs+` ORDER BY name`)
	if err != nil {
		return nil, fmt.Errorf("backfill: list jobs: %w", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("backfill: list jobs: %w", err)
	}
	var out []JobStatus
	for _, n := range names {
		s, err := b.Status(ctx, n)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// Status reads one job's progress, leases and last verification.
func (b *Backfiller) Status(ctx context.Context, job string) (JobStatus, error) {
	var s JobStatus
	var spec []byte
	var last time.Time
	err := b.pool.QueryRow(ctx, `SELECT j.name, j.migration, j.epoch, j.done, j.paused, j.pause_reason, j.estimated_rows, j.ranges,
	j.upper_bound, j.spec, j.started_at, j.finished_at, j.updated_at,
	coalesce(sum(r.rows_done), 0)::int8, count(r.id) FILTER (WHERE r.done)::int, coalesce(max(r.updated_at), j.started_at)
FROM `+b.t.jobs+` j LEFT JOIN `+b.t.ranges+` r ON r.job = j.name WHERE j.name = $1 GROUP BY j.name`, job).Scan(
		&s.Name, &s.Migration, &s.Epoch, &s.Done, &s.Paused, &s.PauseReason, &s.EstimatedRows, &s.Ranges,
		&s.UpperBound, &spec, &s.StartedAt, &s.FinishedAt, &s.UpdatedAt, &s.RowsDone, &s.RangesDone, &last)
	if errors.Is(err, pgx.ErrNoRows) {
		return s, fmt.Errorf("%w: %q (schema %s)", ErrUnknownJob, job, b.schema)
	}
	if err != nil {
		return s, fmt.Errorf("backfill: status of %s: %w", job, err)
	}
	var doc struct {
		Spec Spec `json:"spec"`
	}
	if err := jsonUnmarshal(spec, &doc); err != nil {
		return s, fmt.Errorf("backfill: status of %s: stored spec: %w", job, err)
	}
	s.Spec = doc.Spec
	end := last
	if s.FinishedAt != nil {
		end = *s.FinishedAt
	}
	if el := end.Sub(s.StartedAt).Seconds(); el > 0 {
		s.RowsPerSecond = float64(s.RowsDone) / el
	}
	if !s.Done && s.RowsPerSecond > 0 && s.EstimatedRows > s.RowsDone {
		s.ETA = time.Duration(float64(s.EstimatedRows-s.RowsDone) / s.RowsPerSecond * float64(time.Second))
	}
	// A lease whose holder's session is gone (killed, crashed) is free to
	// be retaken at once, so it is not shown as held; one renewed by a
	// chunk in the last seconds is, in case its holder lost its session
	// but not its work.
	rows, err := b.pool.Query(ctx, `SELECT r.id, r.owner, r.lease_until, r.rows_done, r.cursor FROM `+b.t.ranges+` r
WHERE r.job = $1 AND r.owner IS NOT NULL AND r.lease_until > clock_timestamp() AND NOT r.done
AND (r.updated_at > clock_timestamp() - interval '5 seconds' OR EXISTS (SELECT FROM pg_locks k
	WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 1
	AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
	AND ((k.classid::int8 << 32) | k.objid::int8) = hashtextextended($2 || r.id, 0)))
ORDER BY r.id`, job, lockPrefix(b.schema, job))
	if err != nil {
		return s, fmt.Errorf("backfill: status of %s: %w", job, err)
	}
	s.Leases, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (LeaseStatus, error) {
		var l LeaseStatus
		return l, r.Scan(&l.Range, &l.Owner, &l.Until, &l.RowsDone, &l.Cursor)
	})
	if err != nil {
		return s, fmt.Errorf("backfill: status of %s: %w", job, err)
	}
	var detail []byte
	err = b.pool.QueryRow(ctx, `SELECT detail FROM `+b.t.verifications+` WHERE job = $1 ORDER BY id DESC LIMIT 1`, job).Scan(&detail)
	switch {
	case err == nil:
		var v Verification
		if jsonUnmarshal(detail, &v) == nil {
			s.LastVerification = &v
		}
	case !errors.Is(err, pgx.ErrNoRows):
		return s, fmt.Errorf("backfill: status of %s: %w", job, err)
	}
	return s, nil
}

// StoredJob rebuilds a job from its stored Spec, for tools (the CLI) that
// verify or resume a job a service registered. Jobs with a Go transform or
// a custom sink cannot be rebuilt: their code is not stored.
func (b *Backfiller) StoredJob(ctx context.Context, name string) (Job, error) {
	var spec []byte
	var migration string
	err := b.pool.QueryRow(ctx, `SELECT migration, spec FROM `+b.t.jobs+` WHERE name = $1`, name).Scan(&migration, &spec)
	if errors.Is(err, pgx.ErrNoRows) {
		return Job{}, fmt.Errorf("%w: %q (schema %s)", ErrUnknownJob, name, b.schema)
	}
	if err != nil {
		return Job{}, fmt.Errorf("backfill: read job %s: %w", name, err)
	}
	var doc struct {
		Spec Spec   `json:"spec"`
		Sink string `json:"sink"`
		Go   bool   `json:"go_transform"`
	}
	if err := jsonUnmarshal(spec, &doc); err != nil {
		return Job{}, fmt.Errorf("backfill: read job %s: %w", name, err)
	}
	j := Job{Name: name, Migration: migration, Spec: doc.Spec}
	if doc.Go {
		return j, fmt.Errorf("%w: job %s has a Go transform (%s): run and verify it from the service that defines it",
			ErrInvalidJob, name, doc.Spec.TransformVersion)
	}
	if doc.Sink != localSinkDesc(doc.Spec.Target) {
		return j, fmt.Errorf("%w: job %s writes to %s, not to a table of this database: run and verify it from the service that defines it",
			ErrInvalidJob, name, doc.Sink)
	}
	return j, nil
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
