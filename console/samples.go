package console

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/redis/go-redis/v9"

	"github.com/dimmer-dev/dimmer/flags"
)

// SampleStore keeps the charts' samples beside the flags, so a console
// started in the middle of a migration (a restart, a second operator's
// laptop) draws the last hour and not an empty chart. Only the console's
// sampler writes to it, once per interval and migration: nothing on the
// services' paths. [PostgresSamples] and [RedisSamples] keep them in the
// flag store's database.
type SampleStore interface {
	// AddSample stores s, unless a sample of the same interval (every) is
	// already stored (another console took it), and keeps only the newest
	// keep samples of the migration.
	AddSample(ctx context.Context, migration string, s Sample, every time.Duration, keep int) error
	// Samples returns the migration's newest samples, at most limit, oldest
	// first.
	Samples(ctx context.Context, migration string, limit int) ([]Sample, error)
}

// WithSampleStore makes the sampler ([Server.Run], [Server.SampleOnce])
// keep its samples in st as well, and start from the ones st already holds.
func WithSampleStore(st SampleStore) Option {
	return func(s *Server) error {
		if st == nil {
			return errors.New("WithSampleStore: nil")
		}
		s.sampleStore = st
		return nil
	}
}

// SampleDB is the database of a Postgres flag store: *pgxpool.Pool fits.
type SampleDB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// PostgresSamples keeps samples in the table console_samples of schema
// (the flag store's: "dimmer" by default) in db. Install creates it.
func PostgresSamples(db SampleDB, schema string) (*PGSamples, error) {
	switch {
	case db == nil:
		return nil, errors.New("console.PostgresSamples: db is nil")
	case schema == "":
		return nil, errors.New("console.PostgresSamples: schema is empty")
	}
	return &PGSamples{db: db, table: pgx.Identifier{schema, "console_samples"}.Sanitize()}, nil
}

// PGSamples is the [SampleStore] of [PostgresSamples].
type PGSamples struct {
	db    SampleDB
	table string
}

var _ SampleStore = (*PGSamples)(nil)

// Install creates the samples table if it does not exist (the flag store's
// schema must).
func (p *PGSamples) Install(ctx context.Context) error {
	_, err := p.db.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+p.table+` (
	migration text NOT NULL,
	at timestamptz NOT NULL,
	stages jsonb NOT NULL,
	PRIMARY KEY (migration, at))`)
	if err != nil {
		return fmt.Errorf("console: install %s: %w", p.table, err)
	}
	return nil
}

// AddSample implements [SampleStore]. The sample is stored at the start of
// its interval, so consoles sampling the same interval store it once.
func (p *PGSamples) AddSample(ctx context.Context, migration string, s Sample, every time.Duration, keep int) error {
	doc, err := json.Marshal(s.Stages)
	if err != nil {
		return fmt.Errorf("console: store sample of %s: %w", migration, err)
	}
	_, err = p.db.Exec(ctx, `WITH ins AS (INSERT INTO `+p.table+` (migration, at, stages) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING)
DELETE FROM `+p.table+` WHERE migration = $1 AND at < (
	SELECT at FROM `+p.table+` WHERE migration = $1 ORDER BY at DESC OFFSET $4 - 2 LIMIT 1)`,
		migration, s.At.Truncate(every), doc, keep)
	if err != nil {
		return fmt.Errorf("console: store sample of %s: %w", migration, err)
	}
	return nil
}

// Samples implements [SampleStore].
func (p *PGSamples) Samples(ctx context.Context, migration string, limit int) ([]Sample, error) {
	rows, err := p.db.Query(ctx, `SELECT at, stages FROM (SELECT at, stages FROM `+p.table+`
WHERE migration = $1 ORDER BY at DESC LIMIT $2) s ORDER BY at`, migration, limit)
	if err != nil {
		return nil, fmt.Errorf("console: samples of %s: %w", migration, err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Sample, error) {
		var s Sample
		var doc []byte
		if err := r.Scan(&s.At, &doc); err != nil {
			return s, err
		}
		s.At = s.At.UTC()
		return s, json.Unmarshal(doc, &s.Stages)
	})
	if err != nil {
		return nil, fmt.Errorf("console: samples of %s: %w", migration, err)
	}
	return out, nil
}

// RedisSamples keeps samples in a sorted set per migration under prefix
// (the flag store's: "dimmer:" by default), scored by their interval.
func RedisSamples(client redis.UniversalClient, prefix string) (SampleStore, error) {
	if client == nil {
		return nil, errors.New("console.RedisSamples: client is nil")
	}
	return redisSamples{client, prefix + "console:samples:"}, nil
}

type redisSamples struct {
	client redis.UniversalClient
	prefix string
}

func (r redisSamples) AddSample(ctx context.Context, migration string, s Sample, every time.Duration, keep int) error {
	if err := flags.ValidateName(migration); err != nil {
		return fmt.Errorf("console: store sample: %w", err)
	}
	s.At = s.At.Truncate(every)
	doc, err := json.Marshal(s)
	if err != nil {
		return fmt.Errorf("console: store sample of %s: %w", migration, err)
	}
	key, score := r.prefix+migration, strconv.FormatInt(s.At.UnixNano(), 10)
	// The interval's score is taken once; a race between two consoles
	// stores both, which only draws one point twice.
	n, err := r.client.ZCount(ctx, key, score, score).Result()
	if err != nil || n > 0 {
		return wrapSample(migration, err)
	}
	_, err = r.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.ZAdd(ctx, key, redis.Z{Score: float64(s.At.UnixNano()), Member: doc})
		p.ZRemRangeByRank(ctx, key, 0, int64(-keep-1))
		return nil
	})
	return wrapSample(migration, err)
}

func wrapSample(migration string, err error) error {
	if err != nil {
		return fmt.Errorf("console: store sample of %s: %w", migration, err)
	}
	return nil
}

func (r redisSamples) Samples(ctx context.Context, migration string, limit int) ([]Sample, error) {
	docs, err := r.client.ZRange(ctx, r.prefix+migration, int64(-limit), -1).Result()
	if err != nil {
		return nil, fmt.Errorf("console: samples of %s: %w", migration, err)
	}
	out := make([]Sample, 0, len(docs))
	for _, d := range docs {
		var s Sample
		if err := json.Unmarshal([]byte(d), &s); err != nil {
			return nil, fmt.Errorf("console: samples of %s: decode: %w", migration, err)
		}
		out = append(out, s)
	}
	return out, nil
}
