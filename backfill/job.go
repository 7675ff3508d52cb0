package backfill

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/flags"
)

// Table names a Postgres table; an empty Schema means the connection's
// search_path.
type Table struct {
	Schema string `json:"schema,omitempty"`
	Name   string `json:"name"`
}

func (t Table) sql() string {
	if t.Schema == "" {
		return pgx.Identifier{t.Name}.Sanitize()
	}
	return pgx.Identifier{t.Schema, t.Name}.Sanitize()
}

func (t Table) String() string {
	if t.Schema == "" {
		return t.Name
	}
	return t.Schema + "." + t.Name
}

// Spec is the declarative part of a job: what is read, how it is shaped and
// where it goes. It is stored with the job (so `dimmer backfill` can resume
// and verify it) and fingerprinted: a job never resumes under another Spec.
type Spec struct {
	// Source is the old table, read in key order.
	Source Table `json:"source"`
	// Target is the new table (Postgres sinks). Other sinks ignore it.
	Target Table `json:"target"`
	// Key is the source's primary (or any unique, NOT NULL) key, one or more
	// columns; the keyset order. The target has the same key columns.
	Key []string `json:"key"`
	// Columns are the target columns written, the key and VersionColumn
	// included. Empty: every column of Source.
	Columns []string `json:"columns,omitempty"`
	// Exprs maps a target column to a SQL expression over the source row (a
	// transform run in the server); columns absent read the same-named
	// source column.
	Exprs map[string]string `json:"exprs,omitempty"`
	// VersionColumn is compared inside the upsert: a target row whose
	// version is greater than the copied one is left alone, so a backfilled
	// row never overwrites a newer dual write. A number or a timestamp.
	VersionColumn string `json:"version_column"`
	// TransformVersion names the Go Transform's revision: change it when the
	// Transform changes, so old checkpoints are not resumed under it.
	TransformVersion string `json:"transform_version,omitempty"`
	// VerifyIgnore lists target columns verification does not compare
	// (e.g. a column the new side fills itself).
	VerifyIgnore []string `json:"verify_ignore,omitempty"`
}

// Row is one row on its way to the sink, keyed by target column name.
type Row map[string]any

// Transform reshapes a row in Go between source and sink. Return a nil Row
// to skip it.
type Transform func(ctx context.Context, r Row) (Row, error)

// Job is one backfill: a source, a transform and a sink, and how fast to go.
type Job struct {
	// Name identifies the job's checkpoints, leases and verifications.
	Name string
	// Migration is the stage flag the backfill belongs to: the job records
	// the flag's epoch and refuses to run while the stage is off.
	Migration string
	Spec      Spec
	// Transform, if set, runs in Go on every row (Spec.TransformVersion is
	// then required). Without it and without a Sink, chunks are copied by
	// one statement inside the server (the fast path).
	Transform Transform
	// Sink receives the rows. Nil: the Postgres table Spec.Target in the
	// Backfiller's database, written in the checkpoint's transaction.
	Sink Sink
	// SourcePool reads Source from another database. Nil: the Backfiller's.
	SourcePool *pgxpool.Pool
	Config     Config
}

// Config is how a job runs. Zero fields take the defaults shown.
type Config struct {
	// Workers copy disjoint ranges concurrently in this process (1).
	Workers int
	// Ranges the key space is split into when the job starts; the unit of
	// leasing between workers and processes. Default: one per 100,000 rows
	// estimated, at least Workers, at most 16 × Workers (a range ends in a
	// partial chunk, and small ranges never let chunks grow; idle workers
	// split busy ranges anyway).
	Ranges int
	// TargetChunkTime is what a chunk should take; the chunk size follows
	// it by an EWMA of the time per row (500ms).
	TargetChunkTime time.Duration
	// LockTime bounds the chunk time instead when a chunk holds locks the
	// service's own writes wait for until it commits: an in-place fill
	// (Target is Source, so every copied row is updated) or LockSourceRows.
	// A write meeting a locked row waits up to a chunk (50ms; 20ms for an
	// in-place fill, whose UPDATE holds its rows against every write; its
	// chunk also stays under 0.5% of the table's rows, at least MinChunk).
	LockTime time.Duration
	// InitialChunk, MinChunk and MaxChunk bound the chunk size in rows
	// (1000, 100, 100000).
	InitialChunk, MinChunk, MaxChunk int
	// RowsPerSecond caps the job's rate over all its workers in this
	// process (0: no cap). It also bounds a chunk to a quarter second of
	// the rate (below MinChunk if need be), so the rate holds over any 5 s.
	RowsPerSecond float64
	// Signals are consulted before every chunk; any of them can hold the
	// job back (replica lag, the service's own latency).
	Signals []Signal
	// LeaseTTL is how long a range stays with a worker that stopped
	// renewing it (it renews with every chunk) before another takes it
	// (30s; at least 1s and two TargetChunkTime).
	LeaseTTL time.Duration
	// PollInterval is how often a paused or waiting worker looks again (1s).
	PollInterval time.Duration
	// MaxRetries of one chunk on transient errors before the job fails (10).
	MaxRetries int
	// LockSourceRows takes FOR KEY SHARE locks on the chunk's source rows
	// (fast path only), so a dual-write delete of a row being copied waits
	// for the chunk: no deleted row is resurrected in new. Costs a write per
	// source row; without it, verification finds and repairs such rows.
	LockSourceRows bool
	// AllowStageOff runs even while the migration is off (nothing then
	// dual-writes rows created after the upper bound: only for tables that
	// no longer change).
	AllowStageOff bool
	// Progress is called after every chunk (serialised).
	Progress func(Progress)
}

func (c Config) withDefaults() Config {
	if c.Workers <= 0 {
		c.Workers = 1
	}
	if c.Ranges <= 0 {
		c.Ranges = 16 * c.Workers
	}
	if c.TargetChunkTime <= 0 {
		c.TargetChunkTime = 500 * time.Millisecond
	}
	if c.LockTime <= 0 {
		c.LockTime = 50 * time.Millisecond
	}
	if c.MinChunk <= 0 {
		c.MinChunk = 100
	}
	if c.MaxChunk <= 0 {
		c.MaxChunk = 100000
	}
	if c.InitialChunk <= 0 {
		c.InitialChunk = 1000
	}
	c.InitialChunk = min(max(c.InitialChunk, c.MinChunk), c.MaxChunk)
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = 30 * time.Second
	}
	if c.PollInterval <= 0 {
		c.PollInterval = time.Second
	}
	if c.MaxRetries <= 0 {
		c.MaxRetries = 10
	}
	return c
}

// rowsPerRange is the default range size.
const rowsPerRange = 100_000

// rangesFor is how many ranges a key space of estimate rows is split into.
func (c Config) rangesFor(estimate int64) int {
	d := c.withDefaults()
	if c.Ranges > 0 {
		return c.Ranges
	}
	n := int((estimate + rowsPerRange - 1) / rowsPerRange)
	return min(max(n, d.Workers), d.Ranges)
}

// minLeaseTTL is the shortest lease a worker of c keeps while it copies.
func minLeaseTTL(c Config) time.Duration {
	return max(time.Second, 2*c.withDefaults().TargetChunkTime)
}

// Validate reports the first invalid field.
func (c Config) Validate() error {
	switch {
	case c.Workers < 0:
		return fieldErr("Config.Workers", "%d is negative", c.Workers)
	case c.Ranges < 0:
		return fieldErr("Config.Ranges", "%d is negative", c.Ranges)
	case c.MinChunk < 0 || c.MaxChunk < 0 || c.InitialChunk < 0:
		return fieldErr("Config.MinChunk/MaxChunk/InitialChunk", "negative")
	case c.MaxChunk > 0 && c.MinChunk > c.MaxChunk:
		return fieldErr("Config.MinChunk", "%d is above MaxChunk %d", c.MinChunk, c.MaxChunk)
	case math.IsNaN(c.RowsPerSecond) || math.IsInf(c.RowsPerSecond, 0) || c.RowsPerSecond < 0 || c.RowsPerSecond > 0 && c.RowsPerSecond < 1:
		return fieldErr("Config.RowsPerSecond", "%v: want 0 (no limit) or a rate of at least 1 row/s", c.RowsPerSecond)
	case c.TargetChunkTime < 0:
		return fieldErr("Config.TargetChunkTime", "%v is negative", c.TargetChunkTime)
	case c.LockTime < 0:
		return fieldErr("Config.LockTime", "%v is negative", c.LockTime)
	case c.PollInterval < 0:
		return fieldErr("Config.PollInterval", "%v is negative", c.PollInterval)
	case c.LeaseTTL < 0:
		return fieldErr("Config.LeaseTTL", "%v is negative", c.LeaseTTL)
	case c.LeaseTTL > 0 && c.LeaseTTL < minLeaseTTL(c):
		// A worker renews its lease once a chunk: a lease shorter than
		// two chunks lapses under a live worker, and every other worker
		// then takes the range and fences off the chunk in progress.
		return fieldErr("Config.LeaseTTL", "%v is shorter than %v (1s, and two TargetChunkTime)", c.LeaseTTL, minLeaseTTL(c))
	}
	for i, s := range c.Signals {
		if s == nil {
			return fieldErr(fmt.Sprintf("Config.Signals[%d]", i), "nil")
		}
	}
	return nil
}

// Validate checks the job without touching a database.
func (j *Job) Validate() error {
	if j.Name == "" {
		return fieldErr("Job.Name", "empty")
	}
	if len(j.Name) > 200 {
		return fieldErr("Job.Name", "longer than 200 characters")
	}
	if err := flags.ValidateName(j.Migration); err != nil {
		return fieldErr("Job.Migration", "%v", err)
	}
	s := j.Spec
	if s.Source.Name == "" {
		return fieldErr("Spec.Source.Name", "empty")
	}
	if j.Sink == nil && s.Target.Name == "" {
		return fieldErr("Spec.Target.Name", "empty (and no Sink is set)")
	}
	if len(s.Key) == 0 {
		return fieldErr("Spec.Key", "no key column: a keyset needs the source's primary key")
	}
	for i, k := range s.Key {
		if k == "" || slices.Contains(s.Key[:i], k) {
			return fieldErr("Spec.Key", "column %d (%q) is empty or repeated", i, k)
		}
	}
	if s.VersionColumn == "" {
		return fieldErr("Spec.VersionColumn", "empty: without a version comparison a backfilled row could overwrite a newer dual write")
	}
	if j.Transform != nil && s.TransformVersion == "" {
		return fieldErr("Spec.TransformVersion", "empty while Transform is set: name the transform's revision so a changed transform is not resumed")
	}
	for c := range s.Exprs {
		if slices.Contains(s.Key, c) {
			return fieldErr("Spec.Exprs", "key column %q cannot be transformed: the keyset and the upsert match on it", c)
		}
	}
	return j.Config.Validate()
}

// fingerprint is the stable identity of what the job copies.
func (j *Job) fingerprint(sinkDesc string) (string, string) {
	doc := struct {
		Spec Spec   `json:"spec"`
		Sink string `json:"sink"`
		Go   bool   `json:"go_transform"`
	}{j.Spec, sinkDesc, j.Transform != nil}
	b, _ := json.Marshal(doc) // map keys are sorted by encoding/json
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8]), string(b)
}
