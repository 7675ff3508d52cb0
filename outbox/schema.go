package outbox

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// SchemaVersion is the newest schema version this code installs.
const SchemaVersion = 2

// Beginner starts transactions: *pgxpool.Pool and *pgx.Conn are.
type Beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// messageColumns are the message table's columns after seq, in either
// layout.
const messageColumns = `	id              uuid NOT NULL,
	bucket          int NOT NULL,
	lane            text COLLATE "C" NOT NULL,
	key             text,
	topic           text NOT NULL,
	payload         bytea NOT NULL,
	headers         jsonb,
	created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
	attempts        int NOT NULL DEFAULT 0,
	next_attempt_at timestamptz,
	last_error      text,
	dead_at         timestamptz`

// migrations[i] brings the schema from version i to i+1. Never edit an
// entry once released: append a new one.
func (o *Outbox) migrations() []string {
	ident := func(s string) string { return pgx.Identifier{s}.Sanitize() }
	// Version 1's message table: one plain table, or (Config.Partitions,
	// only ever at a fresh install) the same table split by bucket range.
	v1 := o.partitionedV1()
	if o.cfg.Partitions == 1 {
		v1 = `CREATE TABLE ` + o.table + ` (
	seq             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
` + messageColumns + `
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 20000,
        autovacuum_vacuum_cost_delay = 0);
CREATE INDEX ` + ident(o.cfg.Table+"_lane_idx") + ` ON ` + o.table + ` (bucket, lane, seq);
CREATE INDEX ` + ident(o.cfg.Table+"_dead_idx") + ` ON ` + o.table + ` (id) WHERE dead_at IS NOT NULL;`
	}
	return []string{
		// v1
		v1 + `
CREATE TABLE ` + o.leases + ` (
	bucket     int PRIMARY KEY,
	owner      text,
	epoch      bigint NOT NULL DEFAULT 0,
	expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO ` + o.leases + ` (bucket) SELECT generate_series(0, ` + fmt.Sprint(o.cfg.Buckets-1) + `);
CREATE TABLE ` + o.relays + ` (
	id      text PRIMARY KEY,
	seen_at timestamptz NOT NULL
);`,
		// v2: a relay registers with the backend pid of a connection that
		// holds a session advisory lock keyed by that pid for as long as
		// the relay lives, so the other relays see it die with its session
		// (NULL: registered by older code, alive while it heartbeats).
		`ALTER TABLE ` + o.relays + ` ADD COLUMN pid int;`,
	}
}

// partitionedV1 is version 1's message table split by bucket range
// (Config.Partitions > 1): the same columns and indexes, with the
// partition key in the primary key as PostgreSQL requires. The storage
// parameters go on each partition, where the rows are.
func (o *Outbox) partitionedV1() string {
	ident := func(s string) string { return pgx.Identifier{s}.Sanitize() }
	var b strings.Builder
	b.WriteString(`CREATE TABLE ` + o.table + ` (
	seq             bigint GENERATED ALWAYS AS IDENTITY,
` + messageColumns + `,
	PRIMARY KEY (seq, bucket)
) PARTITION BY RANGE (bucket);
`)
	size := o.cfg.Buckets / o.cfg.Partitions
	for i := range o.cfg.Partitions {
		fmt.Fprintf(&b, `CREATE TABLE %s PARTITION OF %s FOR VALUES FROM (%d) TO (%d)
WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 20000, autovacuum_vacuum_cost_delay = 0);
`, o.partition(i), o.table, i*size, (i+1)*size)
	}
	b.WriteString(`CREATE INDEX ` + ident(o.cfg.Table+"_lane_idx") + ` ON ` + o.table + ` (bucket, lane, seq);
CREATE INDEX ` + ident(o.cfg.Table+"_dead_idx") + ` ON ` + o.table + ` (id) WHERE dead_at IS NOT NULL;`)
	return b.String()
}

// partition is the quoted name of partition i.
func (o *Outbox) partition(i int) string {
	return pgx.Identifier{o.cfg.Schema, fmt.Sprintf("%s_p%d", o.cfg.Table, i)}.Sanitize()
}

// partitionOf is the partition holding bucket b.
func (o *Outbox) partitionOf(b int) int { return b / (o.cfg.Buckets / o.cfg.Partitions) }

// partitionCount counts the message table's partitions ($1): 1 for a
// plain table.
const partitionCount = `CASE WHEN c.relkind = 'p' THEN (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid) ELSE 1 END
FROM pg_class c WHERE c.oid = $1::regclass`

func installedPartitions(ctx context.Context, db Querier, table string) (int, error) {
	var n int
	err := db.QueryRow(ctx, `SELECT `+partitionCount, table).Scan(&n)
	return n, err
}

// Install creates or upgrades the outbox tables in Config.Schema. It is
// idempotent and safe to run from every instance at start-up: concurrent
// installs serialise on an advisory lock, and the version reached is stored
// in <Table>_meta. It refuses ([ErrSchemaMismatch]) a table installed with
// another bucket count or partition count, or by newer code.
func (o *Outbox) Install(ctx context.Context, db Beginner) error {
	tx, err := db.Begin(ctx)
	if err != nil {
		return fmt.Errorf("outbox: install: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	steps := []string{
		`SELECT pg_advisory_xact_lock($1::int4, -1)`,
		`CREATE SCHEMA IF NOT EXISTS ` + pgx.Identifier{o.cfg.Schema}.Sanitize(),
		`CREATE TABLE IF NOT EXISTS ` + o.meta + ` (
	singleton    bool PRIMARY KEY DEFAULT true CHECK (singleton),
	version      int NOT NULL,
	buckets      int NOT NULL,
	installed_at timestamptz NOT NULL DEFAULT now()
)`,
	}
	for i, s := range steps {
		var args []any
		if i == 0 {
			args = []any{o.lockNS + 1}
		}
		if _, err := tx.Exec(ctx, s, args...); err != nil {
			return fmt.Errorf("outbox: install %s: %w", o.table, err)
		}
	}
	var version, buckets int
	err = tx.QueryRow(ctx, `SELECT version, buckets FROM `+o.meta).Scan(&version, &buckets)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		version, buckets = 0, o.cfg.Buckets
	case err != nil:
		return fmt.Errorf("outbox: install: read %s: %w", o.meta, err)
	}
	if version > SchemaVersion {
		return fmt.Errorf("%w: %s is at version %d, this code knows up to %d", ErrSchemaMismatch, o.table, version, SchemaVersion)
	}
	if buckets != o.cfg.Buckets {
		return fmt.Errorf("%w: %s was installed with %d buckets, Config.Buckets is %d (the bucket count cannot change)", ErrSchemaMismatch, o.table, buckets, o.cfg.Buckets)
	}
	migs := o.migrations()
	for v := version; v < SchemaVersion; v++ {
		if _, err := tx.Exec(ctx, migs[v]); err != nil {
			return fmt.Errorf("outbox: install %s: migrate to version %d: %w", o.table, v+1, err)
		}
	}
	parts, err := installedPartitions(ctx, tx, o.table)
	if err != nil {
		return fmt.Errorf("outbox: install: read %s: %w", o.table, err)
	}
	if parts != o.cfg.Partitions {
		return fmt.Errorf("%w: %s was installed with %d partitions, Config.Partitions is %d (the layout cannot change)", ErrSchemaMismatch, o.table, parts, o.cfg.Partitions)
	}
	if version < SchemaVersion {
		if _, err := tx.Exec(ctx, `INSERT INTO `+o.meta+` (version, buckets) VALUES ($1, $2)
ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version`, SchemaVersion, o.cfg.Buckets); err != nil {
			return fmt.Errorf("outbox: install: record version: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("outbox: install %s: %w", o.table, err)
	}
	return nil
}

// ErrNotInstalled: no outbox is installed under the schema and table named.
var ErrNotInstalled = errors.New("outbox: not installed")

// Installed returns the configuration of the outbox installed as
// schema.table (Buckets and Partitions as installed, other fields
// defaulted), for tools
// that operate an outbox a service installed, such as the dimmer CLI. It
// returns [ErrNotInstalled] when there is none.
func Installed(ctx context.Context, db Querier, schema, table string) (Config, error) {
	cfg := Config{Schema: schema, Table: table, Buckets: 1}
	probe, err := New(cfg)
	if err != nil {
		return Config{}, err
	}
	var exists bool
	if err := db.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, probe.meta).Scan(&exists); err != nil {
		return Config{}, fmt.Errorf("outbox: read %s: %w", probe.meta, err)
	}
	if !exists {
		return Config{}, fmt.Errorf("%w: no %s", ErrNotInstalled, probe.meta)
	}
	var version int
	err = db.QueryRow(ctx, `SELECT version, buckets FROM `+probe.meta).Scan(&version, &cfg.Buckets)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return Config{}, fmt.Errorf("%w: %s is empty", ErrNotInstalled, probe.meta)
	case err != nil:
		return Config{}, fmt.Errorf("outbox: read %s: %w", probe.meta, err)
	}
	if version > SchemaVersion {
		return Config{}, fmt.Errorf("%w: %s is at version %d, this code knows up to %d", ErrSchemaMismatch, probe.table, version, SchemaVersion)
	}
	if cfg.Partitions, err = installedPartitions(ctx, db, probe.table); err != nil {
		return Config{}, fmt.Errorf("outbox: read %s: %w", probe.table, err)
	}
	cfg.withDefaults()
	return cfg, nil
}
