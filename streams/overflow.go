package streams

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/flags"
)

// OverflowKey names one processed set: a group's origins of one side and
// partition of a topic.
type OverflowKey struct {
	Group, Topic string
	Side         flags.Side
	Partition    int32
}

// Overflow keeps the spans of origin offsets a consumer processed that its
// commit metadata cannot carry (Kafka bounds metadata, 4096 bytes by
// default). A [Consumer] with one spills its smallest spans there instead
// of failing with [ErrStateTooLarge], and asks it about an origin in the
// region it spilled from. [PostgresOverflow] is the usual implementation.
type Overflow interface {
	// Put records that every offset in [lo[i], hi[i]) was processed. It
	// must be durable when it returns and idempotent.
	Put(ctx context.Context, key OverflowKey, lo, hi []int64) error
	// Has reports whether a Put covered offset.
	Has(ctx context.Context, key OverflowKey, offset int64) (bool, error)
}

var _ Overflow = (*PostgresOverflow)(nil)

// PostgresOverflow is an [Overflow] in a table of spans, one row a span, so
// a spill costs a row per span whatever its length.
type PostgresOverflow struct {
	pool          *pgxpool.Pool
	schema, table string
}

// NewPostgresOverflow returns an overflow in schema.stream_processed
// (schema default "dimmer"). Call [PostgresOverflow.Install] once.
func NewPostgresOverflow(pool *pgxpool.Pool, schema string) (*PostgresOverflow, error) {
	if pool == nil {
		return nil, errors.New("streams: NewPostgresOverflow: pool is required")
	}
	if schema == "" {
		schema = "dimmer"
	}
	return &PostgresOverflow{pool: pool, schema: pgx.Identifier{schema}.Sanitize(),
		table: pgx.Identifier{schema, "stream_processed"}.Sanitize()}, nil
}

// Install creates the schema and table if they do not exist.
func (o *PostgresOverflow) Install(ctx context.Context) error {
	_, err := o.pool.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+o.schema+`;
	CREATE TABLE IF NOT EXISTS `+o.table+` (
		group_id text NOT NULL, topic text NOT NULL, side text NOT NULL, part int NOT NULL,
		lo bigint NOT NULL, hi bigint NOT NULL CHECK (hi > lo),
		PRIMARY KEY (group_id, topic, side, part, lo))`)
	if err != nil {
		return fmt.Errorf("streams: install %s: %w", o.table, err)
	}
	return nil
}

// Put inserts the spans in one transaction; a span already there keeps the
// longer end.
func (o *PostgresOverflow) Put(ctx context.Context, key OverflowKey, lo, hi []int64) error {
	if len(lo) != len(hi) {
		return fmt.Errorf("streams: overflow put: %d starts for %d ends", len(lo), len(hi))
	}
	_, err := o.pool.Exec(ctx, `INSERT INTO `+o.table+` (group_id, topic, side, part, lo, hi)
		SELECT $1, $2, $3, $4, l, h FROM unnest($5::bigint[], $6::bigint[]) AS s(l, h)
		ON CONFLICT (group_id, topic, side, part, lo) DO UPDATE SET hi = greatest(`+o.table+`.hi, excluded.hi)`,
		key.Group, key.Topic, key.Side.String(), key.Partition, lo, hi)
	if err != nil {
		return fmt.Errorf("streams: overflow put %s/%s/%d: %w", key.Group, key.Side, key.Partition, err)
	}
	return nil
}

// Has looks up the span starting at or below offset.
func (o *PostgresOverflow) Has(ctx context.Context, key OverflowKey, offset int64) (bool, error) {
	var hi int64
	err := o.pool.QueryRow(ctx, `SELECT hi FROM `+o.table+`
		WHERE group_id = $1 AND topic = $2 AND side = $3 AND part = $4 AND lo <= $5
		ORDER BY lo DESC LIMIT 1`, key.Group, key.Topic, key.Side.String(), key.Partition, offset).Scan(&hi)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("streams: overflow lookup %s/%s/%d@%d: %w", key.Group, key.Side, key.Partition, offset, err)
	}
	return offset < hi, nil
}
