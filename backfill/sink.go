package backfill

import (
	"context"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
)

// SinkSpec is what a sink is told about the rows it will receive.
type SinkSpec struct {
	Key           []string
	Columns       []string
	VersionColumn string
}

// Sink is where a job's rows go. Write must be idempotent and version-guarded:
// writing a row again changes nothing, and a row already holding a greater
// version than the written one keeps it. Write commits on its own; the job's
// checkpoint commits right after, so a crash in between redoes at most one
// chunk.
type Sink interface {
	// Describe identifies the destination in the job's fingerprint.
	Describe() string
	// Open is called once per run before any Write.
	Open(ctx context.Context, s SinkSpec) error
	Write(ctx context.Context, rows []Row) error
}

// PGSink upserts into a Postgres table. When its pool is the Backfiller's,
// rows are written in the checkpoint's transaction (exactly once); with
// another database's pool it commits on its own.
type PGSink struct {
	pool  *pgxpool.Pool
	table Table
	spec  SinkSpec
	stage string
	sql   string
}

var _ Sink = (*PGSink)(nil)

// NewPGSink returns a sink writing to table through pool.
func NewPGSink(pool *pgxpool.Pool, table Table) (*PGSink, error) {
	if pool == nil {
		return nil, fieldErr("PGSink pool", "nil")
	}
	if table.Name == "" {
		return nil, fieldErr("PGSink table", "empty name")
	}
	return &PGSink{pool: pool, table: table}, nil
}

func (s *PGSink) Describe() string {
	cfg := s.pool.Config().ConnConfig
	return fmt.Sprintf("postgres://%s:%d/%s#%s", cfg.Host, cfg.Port, cfg.Database, s.table)
}

func (s *PGSink) Open(ctx context.Context, spec SinkSpec) error {
	_, types, err := columnTypes(ctx, s.pool, s.table)
	if err != nil {
		return fmt.Errorf("%w (sink)", err)
	}
	for _, c := range spec.Columns {
		if _, ok := types[c]; !ok {
			return fieldErr("Spec.Columns", "column %q is not in the target %s", c, s.table)
		}
	}
	s.spec = spec
	// A per-session staging table: COPY is the fastest way in and keeps
	// every value in pgx's own binary encoding of the target's types.
	s.stage = ident("__dimmer_backfill_" + strings.ReplaceAll(s.table.String(), ".", "_"))
	cl := quoteList(spec.Columns)
	s.sql = `INSERT INTO ` + s.table.sql() + ` AS t (` + cl + `) SELECT ` + cl + ` FROM ` + s.stage +
		upsertClause("t", spec.Key, spec.Columns, spec.VersionColumn)
	return nil
}

func (s *PGSink) Write(ctx context.Context, rows []Row) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error { return s.writeTx(ctx, tx, rows) })
}

func (s *PGSink) writeTx(ctx context.Context, tx pgx.Tx, rows []Row) error {
	if len(rows) == 0 {
		return nil
	}
	if _, err := tx.Exec(ctx, `CREATE TEMP TABLE IF NOT EXISTS `+s.stage+` (LIKE `+s.table.sql()+`) ON COMMIT DELETE ROWS`); err != nil {
		return fmt.Errorf("backfill: sink %s: staging table: %w", s.table, err)
	}
	if _, err := tx.Exec(ctx, `TRUNCATE `+s.stage); err != nil {
		return fmt.Errorf("backfill: sink %s: %w", s.table, err)
	}
	src := pgx.CopyFromSlice(len(rows), func(i int) ([]any, error) {
		vals := make([]any, len(s.spec.Columns))
		for j, c := range s.spec.Columns {
			vals[j] = rows[i][c]
		}
		return vals, nil
	})
	if _, err := tx.CopyFrom(ctx, pgx.Identifier{strings.Trim(s.stage, `"`)}, s.spec.Columns, src); err != nil {
		return fmt.Errorf("backfill: sink %s: copy: %w", s.table, err)
	}
	if _, err := tx.Exec(ctx, s.sql); err != nil {
		return fmt.Errorf("backfill: sink %s: upsert: %w", s.table, err)
	}
	return nil
}

// RedisSink writes each row as a hash at Key(row), through a script that
// compares the stored version field first: a newer version is left alone.
type RedisSink struct {
	client redis.UniversalClient
	key    func(Row) string
	name   string
	fields []string
	spec   SinkSpec
}

// RedisSinkOption configures a RedisSink.
type RedisSinkOption func(*RedisSink) error

// RedisFields names the hash fields written, taken from the row by name
// (the version field is always written): for a layout of the service's
// own, e.g. a version and a JSON document made by the job's Transform.
// Default: every column of the job.
func RedisFields(fields ...string) RedisSinkOption {
	return func(s *RedisSink) error {
		if len(fields) == 0 {
			return fieldErr("RedisFields", "empty")
		}
		s.fields = fields
		return nil
	}
}

var _ Sink = (*RedisSink)(nil)

// NewRedisSink returns a sink writing hashes; name identifies the key layout
// in the job's fingerprint (e.g. "user:{id}" — change it when key changes).
func NewRedisSink(client redis.UniversalClient, name string, key func(Row) string, opts ...RedisSinkOption) (*RedisSink, error) {
	switch {
	case client == nil:
		return nil, fieldErr("RedisSink client", "nil")
	case key == nil:
		return nil, fieldErr("RedisSink key", "nil")
	case name == "":
		return nil, fieldErr("RedisSink name", "empty")
	}
	s := &RedisSink{client: client, key: key, name: name}
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// columns are the hash fields written, the version's included.
func (s *RedisSink) columns() []string {
	if s.fields == nil {
		return s.spec.Columns
	}
	if slices.Contains(s.fields, s.spec.VersionColumn) {
		return s.fields
	}
	return append([]string{s.spec.VersionColumn}, s.fields...)
}

// versionedHSet replaces the hash unless it holds a greater version.
// Versions are compared as numbers (timestamps are written as Unix
// nanoseconds, so they compare too).
var versionedHSet = redis.NewScript(`
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cur) > tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return 1`)

func (s *RedisSink) Describe() string {
	if s.fields != nil {
		return "redis#" + s.name + "[" + strings.Join(s.fields, ",") + "]"
	}
	return "redis#" + s.name
}

func (s *RedisSink) Open(ctx context.Context, spec SinkSpec) error {
	s.spec = spec
	return versionedHSet.Load(ctx, s.client).Err()
}

func (s *RedisSink) Write(ctx context.Context, rows []Row) error {
	p := s.client.Pipeline()
	for _, r := range rows {
		v, ok := r[s.spec.VersionColumn]
		if !ok || v == nil {
			return fmt.Errorf("backfill: redis sink: row %v has no %s", r, s.spec.VersionColumn)
		}
		args := []any{s.spec.VersionColumn, RedisValue(v)}
		for _, c := range s.columns() {
			if r[c] == nil {
				continue // a missing field is NULL
			}
			args = append(args, c, RedisValue(r[c]))
		}
		versionedHSet.EvalSha(ctx, p, []string{s.key(r)}, args...)
	}
	cmds, err := p.Exec(ctx)
	if err != nil {
		for _, c := range cmds {
			if c.Err() != nil && strings.HasPrefix(c.Err().Error(), "NOSCRIPT") {
				if err := versionedHSet.Load(ctx, s.client).Err(); err != nil {
					return err
				}
				return fmt.Errorf("backfill: redis sink: script was flushed, reloaded: %w", c.Err())
			}
		}
		return fmt.Errorf("backfill: redis sink: %w", err)
	}
	return nil
}

// RedisValue is how RedisSink renders a Postgres value: UUIDs in their
// text form, times as Unix nanoseconds, numerics exactly.
func RedisValue(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case []byte:
		return string(x)
	case [16]byte:
		h := hex.EncodeToString(x[:])
		return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
	case time.Time:
		return strconv.FormatInt(x.UnixNano(), 10)
	case pgtype.Numeric:
		b, err := x.MarshalJSON()
		if err == nil {
			return strings.Trim(string(b), `"`)
		}
	case fmt.Stringer:
		return x.String()
	}
	return fmt.Sprint(v)
}

// checkWritable checks, before anything is copied, that the target can take
// what the copy writes: a unique index on exactly the key columns (the
// upsert's ON CONFLICT needs one, and without it a redone chunk would
// duplicate rows), and no column among those written that only the server
// may set (GENERATED ALWAYS identity or generated columns).
func (s *PGSink) checkWritable(ctx context.Context, spec SinkSpec) error {
	var unique bool
	var always []string
	err := s.pool.QueryRow(ctx, `SELECT
	EXISTS (SELECT FROM pg_index i
		WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
		AND (SELECT array_agg(a.attname::text COLLATE "C" ORDER BY a.attname::text COLLATE "C")
			FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
			JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
			WHERE k.ord <= i.indnkeyatts)
		= (SELECT array_agg(c COLLATE "C" ORDER BY c COLLATE "C") FROM unnest($2::text[]) c)),
	ARRAY(SELECT a.attname::text FROM pg_attribute a
		WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
		AND (a.attidentity = 'a' OR a.attgenerated <> '') AND a.attname = ANY($3::text[])
		ORDER BY a.attnum)`, s.table.sql(), spec.Key, spec.Columns).Scan(&unique, &always)
	if err != nil {
		return fmt.Errorf("backfill: read indexes of %s: %w", s.table, err)
	}
	if !unique {
		return fieldErr("Spec.Key", "the target %s has no unique index or primary key on exactly (%s): the copy upserts by the key, "+
			"and without one a redone chunk would write its rows twice; add one before the copy", s.table, strings.Join(spec.Key, ", "))
	}
	if len(always) > 0 {
		return fieldErr("Spec.Columns", "the target %s sets %s itself (GENERATED ALWAYS): a copy cannot write them; "+
			"make an identity GENERATED BY DEFAULT while the migration runs, or leave generated columns out of Spec.Columns", s.table, strings.Join(always, ", "))
	}
	return nil
}
