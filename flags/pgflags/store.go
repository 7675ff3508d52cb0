package pgflags

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"go.opentelemetry.io/otel/metric"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/flags"
)

// DefaultSchema is the schema the tables live in unless [WithSchema] says
// otherwise.
const DefaultSchema = "dimmer"

// maxSchemaLen keeps the notification channel "<schema>.stage_flags" within
// PostgreSQL's 63-byte identifier limit.
const maxSchemaLen = 63 - len(channelSuffix)

const channelSuffix = ".stage_flags"

// SchemaVersion is the version of the tables this build installs and expects.
const SchemaVersion = 1

// Option configures a [Store] or a [Provider].
type Option func(*config) error

type config struct {
	schema string
	resync time.Duration
	logger *slog.Logger
	meter  metric.MeterProvider
}

func newConfig(opts []Option) (config, error) {
	c := config{schema: DefaultSchema, resync: 5 * time.Second, logger: slog.Default()}
	for _, o := range opts {
		if o == nil {
			return c, errors.New("pgflags: nil option")
		}
		if err := o(&c); err != nil {
			return c, err
		}
	}
	return c, nil
}

// WithSchema sets the schema holding the tables (default "dimmer"). It also
// names the notification channel, "<schema>.stage_flags", so stores in
// different schemas of one database do not hear each other.
func WithSchema(name string) Option {
	return func(c *config) error {
		if name == "" || len(name) > maxSchemaLen || strings.ContainsRune(name, 0) {
			return fmt.Errorf("pgflags: WithSchema(%q): a schema name must have 1-%d bytes and no NUL", name, maxSchemaLen)
		}
		c.schema = name
		return nil
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(c *config) error {
		if l == nil {
			return errors.New("pgflags: WithLogger: logger is nil")
		}
		c.logger = l
		return nil
	}
}

// WithMeterProvider sets where a provider's metrics go (default no-op):
// dimmer.flags.corrupt (flags whose stored document does not decode) and
// dimmer.flags.parse_errors (each change to such a document). Stores ignore
// it.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(c *config) error {
		if mp == nil {
			return errors.New("pgflags: WithMeterProvider: meter provider is nil")
		}
		c.meter = mp
		return nil
	}
}

// WithResyncInterval bounds how long a provider can miss a change whose
// notification was lost: every interval it reloads all flags (default 5s).
// Stores ignore it.
func WithResyncInterval(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("pgflags: WithResyncInterval(%v): the interval must be positive", d)
		}
		c.resync = d
		return nil
	}
}

// Channel is the LISTEN/NOTIFY channel of the stage flags kept in schema.
func Channel(schema string) string { return schema + channelSuffix }

// tables holds the sanitized, schema-qualified names used in SQL.
type tables struct {
	schema, flags, audit, fleet, version string
	channel                              string
}

func newTables(schema string) tables {
	q := func(n string) string { return pgx.Identifier{schema, n}.Sanitize() }
	return tables{
		schema:  pgx.Identifier{schema}.Sanitize(),
		flags:   q("stage_flags"),
		audit:   q("stage_audit"),
		fleet:   q("fleet_instances"),
		version: q("schema_version"),
		channel: Channel(schema),
	}
}

// Store is the Postgres implementation of [flags.Store] and
// [flags.FleetStore]. It is safe for concurrent use.
type Store struct {
	pool   *pgxpool.Pool
	cfg    config
	t      tables
	logger *slog.Logger
}

var (
	_ flags.Store      = (*Store)(nil)
	_ flags.FleetStore = (*Store)(nil)
)

// NewStore returns a store over pool. It does no I/O; call [Store.Install]
// once (at start-up or from a deploy step) to create the tables.
func NewStore(pool *pgxpool.Pool, opts ...Option) (*Store, error) {
	if pool == nil {
		return nil, errors.New("pgflags.NewStore: pool is nil")
	}
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	return &Store{pool: pool, cfg: cfg, t: newTables(cfg.schema), logger: cfg.logger}, nil
}

// Schema is the schema the store's tables live in.
func (s *Store) Schema() string { return s.cfg.schema }

// Channel is the channel every applied change is notified on.
func (s *Store) Channel() string { return s.t.channel }

// migrationsSQL are the schema versions in order; Install applies those
// above the recorded version.
func (t tables) migrationsSQL() []string {
	return []string{
		1: `
CREATE TABLE IF NOT EXISTS ` + t.flags + ` (
	migration  text PRIMARY KEY,
	doc        jsonb NOT NULL,
	revision   bigint NOT NULL CHECK (revision > 0),
	updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ` + t.audit + ` (
	id        bigserial PRIMARY KEY,
	migration text NOT NULL,
	at        timestamptz NOT NULL,
	entry     jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS stage_audit_migration_id ON ` + t.audit + ` (migration, id DESC);
CREATE TABLE IF NOT EXISTS ` + t.fleet + ` (
	id         text PRIMARY KEY,
	doc        jsonb NOT NULL,
	expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS fleet_instances_expires_at ON ` + t.fleet + ` (expires_at);`,
	}
}

// Install creates the schema and tables, or upgrades them, to
// [SchemaVersion]. It is idempotent and safe to run from several processes at
// once: installers of one schema take turns on a transaction-scoped advisory
// lock. A database already at a newer version is an error, so an old build
// never runs against tables it does not understand.
func (s *Store) Install(ctx context.Context) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`,
			"dimmer/pgflags/install/"+s.cfg.schema); err != nil {
			return fmt.Errorf("pgflags: install %s: lock: %w", s.cfg.schema, err)
		}
		if _, err := tx.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+s.t.schema+`;
CREATE TABLE IF NOT EXISTS `+s.t.version+` (
	version      int PRIMARY KEY,
	installed_at timestamptz NOT NULL DEFAULT now()
)`); err != nil {
			return fmt.Errorf("pgflags: install %s: %w", s.cfg.schema, err)
		}
		var cur int
		if err := tx.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM `+s.t.version).Scan(&cur); err != nil {
			return fmt.Errorf("pgflags: install %s: read version: %w", s.cfg.schema, err)
		}
		if cur > SchemaVersion {
			return fmt.Errorf("pgflags: schema %s is at version %d, newer than this build supports (%d): upgrade dimmer",
				s.cfg.schema, cur, SchemaVersion)
		}
		steps := s.t.migrationsSQL()
		for v := cur + 1; v <= SchemaVersion; v++ {
			if _, err := tx.Exec(ctx, steps[v]); err != nil {
				return fmt.Errorf("pgflags: install %s: version %d: %w", s.cfg.schema, v, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO `+s.t.version+` (version) VALUES ($1)`, v); err != nil {
				return fmt.Errorf("pgflags: install %s: record version %d: %w", s.cfg.schema, v, err)
			}
			s.logger.Info("installed flag store schema", "schema", s.cfg.schema, "version", v)
		}
		return nil
	})
}

// ErrNotInstalled: the store's schema does not hold its tables ([Store.Install]
// creates them), or holds an older version of them.
var ErrNotInstalled = errors.New("pgflags: flag store not installed")

// Check reports whether the schema holds the tables this build reads, and
// changes nothing: for a reader whose role may not create tables, and so
// that a misspelt schema is not answered as an empty store (Install would
// create it).
func (s *Store) Check(ctx context.Context) error {
	var present bool
	if err := s.pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, s.t.version).Scan(&present); err != nil {
		return fmt.Errorf("pgflags: check %s: %w", s.cfg.schema, err)
	}
	cur := 0
	if present {
		if err := s.pool.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM `+s.t.version).Scan(&cur); err != nil {
			return fmt.Errorf("pgflags: check %s: read version: %w", s.cfg.schema, err)
		}
	}
	switch {
	case cur > SchemaVersion:
		return fmt.Errorf("pgflags: schema %s is at version %d, newer than this build supports (%d): upgrade dimmer",
			s.cfg.schema, cur, SchemaVersion)
	case cur < SchemaVersion:
		return fmt.Errorf("%w: schema %q holds no flag store of this version (found %d, want %d)", ErrNotInstalled, s.cfg.schema, cur, SchemaVersion)
	}
	return nil
}

// Load implements [flags.Store].
func (s *Store) Load(ctx context.Context, migration string) (flags.State, error) {
	if err := flags.ValidateName(migration); err != nil {
		return flags.State{}, err
	}
	var doc []byte
	var rev int64
	err := s.pool.QueryRow(ctx, `SELECT doc, revision FROM `+s.t.flags+` WHERE migration = $1`, migration).Scan(&doc, &rev)
	if errors.Is(err, pgx.ErrNoRows) {
		return flags.State{Migration: migration, Stage: flags.Off}, nil
	}
	if err != nil {
		return flags.State{}, fmt.Errorf("pgflags: load %s: %w", migration, err)
	}
	return decode(migration, doc, rev)
}

// decode parses a stored document and checks it belongs to migration; one
// that does not decode is a *flags.CorruptFlagError.
func decode(migration string, doc []byte, revision int64) (flags.State, error) {
	st, err := flags.DecodeStateOf(migration, doc)
	if err == nil && st.Revision != revision {
		// A swap compares the row's revision: a document saying another
		// one could never be changed, forced or not, until it is treated
		// as corrupt and overwritten at the row's revision.
		err = fmt.Errorf("flag %s: the document says revision %d, the row's revision is %d", migration, st.Revision, revision)
	}
	if err != nil {
		return flags.State{}, fmt.Errorf("pgflags: %w", &flags.CorruptFlagError{Migration: migration, Revision: revision, Raw: doc, Err: err})
	}
	return st, nil
}

// Swap implements [flags.Store]. One transaction updates the row only if its
// revision is still expectRevision (a missing row is revision 0), appends the
// audit entry and queues the notification, which PostgreSQL delivers exactly
// when the transaction commits.
func (s *Store) Swap(ctx context.Context, expectRevision int64, next flags.State, entry flags.AuditEntry) (flags.State, error) {
	sw, err := flags.PrepareSwap(expectRevision, next, entry)
	if err != nil {
		return flags.State{}, fmt.Errorf("pgflags: swap: %w", err)
	}
	m, next, doc, entryDoc := sw.State.Migration, sw.State, sw.Doc, sw.EntryDoc
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var tag interface{ RowsAffected() int64 }
		var err error
		if expectRevision == 0 {
			tag, err = tx.Exec(ctx, `INSERT INTO `+s.t.flags+` (migration, doc, revision, updated_at)
VALUES ($1, $2, $3, $4) ON CONFLICT (migration) DO NOTHING`, m, doc, next.Revision, next.UpdatedAt)
		} else {
			// The row lock taken by UPDATE makes racers queue; each re-checks
			// the revision after the winner commits and finds it changed.
			tag, err = tx.Exec(ctx, `UPDATE `+s.t.flags+` SET doc = $2, revision = $3, updated_at = $4
WHERE migration = $1 AND revision = $5`, m, doc, next.Revision, next.UpdatedAt, expectRevision)
		}
		if err != nil {
			return fmt.Errorf("pgflags: swap %s: %w", m, err)
		}
		if tag.RowsAffected() == 0 {
			var cur int64
			err := tx.QueryRow(ctx, `SELECT coalesce((SELECT revision FROM `+s.t.flags+` WHERE migration = $1), 0)`, m).Scan(&cur)
			if err != nil {
				return fmt.Errorf("pgflags: swap %s: read revision: %w", m, err)
			}
			return &flags.ConflictError{Migration: m, Expected: expectRevision, Current: cur}
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+s.t.audit+` (migration, at, entry) VALUES ($1, $2, $3)`,
			m, entry.At, entryDoc); err != nil {
			return fmt.Errorf("pgflags: swap %s: audit: %w", m, err)
		}
		if _, err := tx.Exec(ctx, `SELECT pg_notify($1, $2)`, s.t.channel, payload(m, doc)); err != nil {
			return fmt.Errorf("pgflags: swap %s: notify: %w", m, err)
		}
		return nil
	})
	if err != nil {
		return flags.State{}, err
	}
	return next, nil
}

// maxPayload stays under PostgreSQL's 8000-byte notification limit.
const maxPayload = 7900

// payload is "<migration>\n<document>", or the name alone when the document
// is too large for a notification (listeners then load it).
func payload(migration string, doc []byte) string {
	if len(migration)+1+len(doc) > maxPayload {
		return migration
	}
	return migration + "\n" + string(doc)
}

// parsePayload splits a notification payload.
func parsePayload(p string) (migration string, doc []byte) {
	m, d, ok := strings.Cut(p, "\n")
	if !ok {
		return p, nil
	}
	return m, []byte(d)
}

// Migrations implements [flags.Store], in name order. A stored document that
// does not decode is a *flags.CorruptFlagError in the returned error, which
// joins one per corrupt migration; every other migration is still returned.
func (s *Store) Migrations(ctx context.Context) ([]flags.State, error) {
	rows, err := s.pool.Query(ctx, `SELECT migration, doc, revision FROM `+s.t.flags+` ORDER BY migration`)
	if err != nil {
		return nil, fmt.Errorf("pgflags: list migrations: %w", err)
	}
	var out []flags.State
	var bad []error
	for rows.Next() {
		var m string
		var doc []byte
		var rev int64
		if err := rows.Scan(&m, &doc, &rev); err != nil {
			return nil, fmt.Errorf("pgflags: list migrations: %w", err)
		}
		st, err := decode(m, doc, rev)
		if err != nil {
			bad = append(bad, err)
			continue
		}
		out = append(out, st)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("pgflags: list migrations: %w", err)
	}
	if len(bad) > 0 {
		return out, errors.Join(bad...)
	}
	return out, nil
}

// AppendAudit implements [flags.Store].
func (s *Store) AppendAudit(ctx context.Context, entry flags.AuditEntry) error {
	if err := flags.ValidateName(entry.Migration); err != nil {
		return fmt.Errorf("pgflags: append audit: %w", err)
	}
	if entry.At.IsZero() {
		entry.At = time.Now().UTC()
	}
	doc, err := json.Marshal(entry.Capped())
	if err != nil {
		return fmt.Errorf("pgflags: append audit %s: %w", entry.Migration, err)
	}
	if _, err := s.pool.Exec(ctx, `INSERT INTO `+s.t.audit+` (migration, at, entry) VALUES ($1, $2, $3)`,
		entry.Migration, entry.At, doc); err != nil {
		return fmt.Errorf("pgflags: append audit %s: %w", entry.Migration, err)
	}
	return nil
}

// Audit implements [flags.Store].
func (s *Store) Audit(ctx context.Context, migration string, limit int) ([]flags.AuditEntry, error) {
	if err := flags.ValidateName(migration); err != nil {
		return nil, fmt.Errorf("pgflags: audit: %w", err)
	}
	var lim *int
	if limit > 0 {
		lim = &limit
	}
	rows, err := s.pool.Query(ctx, `SELECT entry FROM `+s.t.audit+` WHERE migration = $1 ORDER BY id DESC LIMIT $2`, migration, lim)
	if err != nil {
		return nil, fmt.Errorf("pgflags: audit %s: %w", migration, err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (flags.AuditEntry, error) {
		var doc []byte
		if err := r.Scan(&doc); err != nil {
			return flags.AuditEntry{}, err
		}
		return flags.DecodeAuditEntry(migration, doc), nil
	})
	if err != nil {
		return nil, fmt.Errorf("pgflags: audit %s: %w", migration, err)
	}
	return out, nil
}

// Heartbeat implements [flags.FleetStore]. Expiry is computed on the
// database's clock, so instances with skewed clocks still agree on who is
// alive. Expired rows are pruned on the way.
func (s *Store) Heartbeat(ctx context.Context, inst flags.Instance, ttl time.Duration) error {
	if inst.ID == "" {
		return errors.New("pgflags: heartbeat: instance ID is empty")
	}
	if ttl <= 0 {
		return fmt.Errorf("pgflags: heartbeat %s: ttl %v must be positive", inst.ID, ttl)
	}
	if inst.SeenAt.IsZero() {
		inst.SeenAt = time.Now().UTC()
	}
	doc, err := json.Marshal(inst)
	if err != nil {
		return fmt.Errorf("pgflags: heartbeat %s: %w", inst.ID, err)
	}
	// The prune is in the statement that upserts this instance's row, so it
	// holds that row. It skips a row another statement has locked: that
	// instance is beating now, and its own beat prunes the rows expired for
	// an hour, this one's among them when both come back after so long (a
	// fleet started again under the same IDs). Waiting for it would
	// deadlock the two beats.
	_, err = s.pool.Exec(ctx, `
WITH pruned AS (DELETE FROM `+s.t.fleet+` WHERE id IN (SELECT id FROM `+s.t.fleet+`
	WHERE expires_at < clock_timestamp() - interval '1 hour' AND id <> $1 FOR UPDATE SKIP LOCKED))
INSERT INTO `+s.t.fleet+` (id, doc, expires_at)
VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, expires_at = excluded.expires_at`,
		inst.ID, doc, ttl.Seconds())
	if err != nil {
		return fmt.Errorf("pgflags: heartbeat %s: %w", inst.ID, err)
	}
	return nil
}

// Instances implements [flags.FleetStore], in ID order.
func (s *Store) Instances(ctx context.Context) ([]flags.Instance, error) {
	rows, err := s.pool.Query(ctx, `SELECT doc FROM `+s.t.fleet+` WHERE expires_at > clock_timestamp() ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("pgflags: instances: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (flags.Instance, error) {
		var in flags.Instance
		var doc []byte
		if err := r.Scan(&doc); err != nil {
			return in, err
		}
		if err := json.Unmarshal(doc, &in); err != nil {
			return in, fmt.Errorf("decode instance: %w", err)
		}
		return in, nil
	})
	if err != nil {
		return nil, fmt.Errorf("pgflags: instances: %w", err)
	}
	return out, nil
}

// Deregister implements [flags.FleetStore]; an unknown ID is not an error.
func (s *Store) Deregister(ctx context.Context, id string) error {
	if id == "" {
		return errors.New("pgflags: deregister: instance ID is empty")
	}
	if _, err := s.pool.Exec(ctx, `DELETE FROM `+s.t.fleet+` WHERE id = $1`, id); err != nil {
		return fmt.Errorf("pgflags: deregister %s: %w", id, err)
	}
	return nil
}
