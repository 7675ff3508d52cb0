package backfill

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// SchemaVersion is the newest version of the backfill tables this code
// installs.
const SchemaVersion = 2

// migrations[i] brings the tables from version i to i+1. Never edit a
// released entry: append one.
func (b *Backfiller) migrations() []string {
	return []string{
		// v1
		`CREATE TABLE ` + b.t.jobs + ` (
	name           text PRIMARY KEY,
	migration      text NOT NULL,
	definition     text NOT NULL,
	spec           jsonb NOT NULL,
	epoch          bigint NOT NULL,
	upper_bound    text[],
	ranges         int NOT NULL,
	estimated_rows bigint NOT NULL DEFAULT 0,
	done           bool NOT NULL DEFAULT false,
	paused         bool NOT NULL DEFAULT false,
	pause_reason   text NOT NULL DEFAULT '',
	started_at     timestamptz NOT NULL DEFAULT now(),
	finished_at    timestamptz,
	updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON ` + b.t.jobs + ` (migration);
CREATE TABLE ` + b.t.ranges + ` (
	job         text NOT NULL REFERENCES ` + b.t.jobs + ` ON DELETE CASCADE,
	id          int NOT NULL,
	lo          text[],
	hi          text[] NOT NULL,
	cursor      text[],
	done        bool NOT NULL DEFAULT false,
	rows_done   bigint NOT NULL DEFAULT 0,
	chunks      bigint NOT NULL DEFAULT 0,
	owner       text,
	token       bigint NOT NULL DEFAULT 0,
	lease_until timestamptz NOT NULL DEFAULT '-infinity',
	updated_at  timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (job, id)
);
CREATE TABLE ` + b.t.verifications + ` (
	id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	job           text NOT NULL,
	migration     text NOT NULL,
	epoch         bigint NOT NULL,
	ok            bool NOT NULL,
	started_at    timestamptz NOT NULL,
	finished_at   timestamptz NOT NULL,
	chunks        bigint NOT NULL,
	differing     bigint NOT NULL,
	repaired      bigint NOT NULL,
	rows_source   bigint NOT NULL,
	rows_target   bigint NOT NULL,
	detail        jsonb NOT NULL
);
CREATE INDEX ON ` + b.t.verifications + ` (migration, job, id DESC);`,
		// v2: the rows a range is expected to hold, which steers work
		// stealing to the range with the most left (corrected by the counts
		// a stealer takes).
		`ALTER TABLE ` + b.t.ranges + ` ADD COLUMN est_rows bigint NOT NULL DEFAULT 0;`,
	}
}

// Check reports whether the schema holds the backfill tables of this
// version, and changes nothing: for a reader whose role may not create
// tables, and so that a misspelt schema is not answered as one without
// jobs (Install would create it). Missing or older tables are
// [ErrNotInstalled], newer ones [ErrSchemaMismatch].
func (b *Backfiller) Check(ctx context.Context) error {
	var present bool
	if err := b.pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, b.t.meta).Scan(&present); err != nil {
		return fmt.Errorf("backfill: check schema %s: %w", b.schema, err)
	}
	version := 0
	if present {
		err := b.pool.QueryRow(ctx, `SELECT version FROM `+b.t.meta).Scan(&version)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("backfill: check schema %s: %w", b.schema, err)
		}
	}
	switch {
	case version > SchemaVersion:
		return fmt.Errorf("%w: %s is at version %d, this code knows up to %d", ErrSchemaMismatch, b.t.meta, version, SchemaVersion)
	case version < SchemaVersion:
		return fmt.Errorf("%w: schema %q holds no backfill tables of this version (found %d, want %d)", ErrNotInstalled, b.schema, version, SchemaVersion)
	}
	return nil
}

// Install creates or upgrades the backfill tables (jobs, ranges with their
// checkpoints and leases, verifications) in the configured schema. It is
// idempotent and safe to run from every instance at start-up: concurrent
// installs serialise on an advisory lock and the version reached is stored in
// backfill_meta. Tables installed by newer code are refused with
// [ErrSchemaMismatch].
func (b *Backfiller) Install(ctx context.Context) error {
	tx, err := b.pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("backfill: install: %w", err)
	}
	defer rollback(ctx, tx)
	steps := []string{
		`SELECT pg_advisory_xact_lock(hashtextextended('dimmer.backfill.install/' || $1, 0))`,
		`CREATE SCHEMA IF NOT EXISTS ` + pgx.Identifier{b.schema}.Sanitize(),
		`CREATE TABLE IF NOT EXISTS ` + b.t.meta + ` (
	singleton    bool PRIMARY KEY DEFAULT true CHECK (singleton),
	version      int NOT NULL,
	installed_at timestamptz NOT NULL DEFAULT now()
)`,
	}
	for i, s := range steps {
		var args []any
		if i == 0 {
			args = []any{b.schema}
		}
		if _, err := tx.Exec(ctx, s, args...); err != nil {
			return fmt.Errorf("backfill: install in schema %s: %w", b.schema, err)
		}
	}
	var version int
	err = tx.QueryRow(ctx, `SELECT version FROM `+b.t.meta).Scan(&version)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		version = 0
	case err != nil:
		return fmt.Errorf("backfill: install: read %s: %w", b.t.meta, err)
	}
	if version > SchemaVersion {
		return fmt.Errorf("%w: %s is at version %d, this code knows up to %d", ErrSchemaMismatch, b.t.meta, version, SchemaVersion)
	}
	migs := b.migrations()
	for v := version; v < SchemaVersion; v++ {
		if _, err := tx.Exec(ctx, migs[v]); err != nil {
			return fmt.Errorf("backfill: install in schema %s: migrate to version %d: %w", b.schema, v+1, err)
		}
	}
	if version < SchemaVersion {
		if _, err := tx.Exec(ctx, `INSERT INTO `+b.t.meta+` (version) VALUES ($1)
ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version`, SchemaVersion); err != nil {
			return fmt.Errorf("backfill: install: record version: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("backfill: install in schema %s: %w", b.schema, err)
	}
	return nil
}
