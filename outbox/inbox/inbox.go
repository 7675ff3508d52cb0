package inbox

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// ErrInvalid: an empty consumer or message id, or a nil transaction.
var ErrInvalid = errors.New("inbox: invalid argument")

// Inbox is a handle on one inbox table.
type Inbox struct {
	schema, table string
	qtable        string
}

// Execer runs statements: *pgxpool.Pool, *pgx.Conn and pgx.Tx all are.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// New returns a handle on schema.table (defaults "dimmer", "inbox").
func New(schema, table string) (*Inbox, error) {
	if schema == "" {
		schema = "dimmer"
	}
	if table == "" {
		table = "inbox"
	}
	if len(schema) > 63 || len(table) > 63 {
		return nil, fmt.Errorf("%w: schema and table names must be at most 63 bytes", ErrInvalid)
	}
	return &Inbox{schema: schema, table: table, qtable: pgx.Identifier{schema, table}.Sanitize()}, nil
}

// Install creates the table if it does not exist (idempotent).
func (i *Inbox) Install(ctx context.Context, db Execer) error {
	_, err := db.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+pgx.Identifier{i.schema}.Sanitize()+`;
CREATE TABLE IF NOT EXISTS `+i.qtable+` (
	consumer     text NOT NULL,
	message_id   text NOT NULL,
	processed_at timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (consumer, message_id)
)`)
	if err != nil {
		return fmt.Errorf("inbox: install %s: %w", i.qtable, err)
	}
	return nil
}

// Mark records that consumer handles msgID in tx and reports whether this
// is the first time (false: already handled by a committed transaction;
// skip the effect). It only counts if tx commits.
func (i *Inbox) Mark(ctx context.Context, tx pgx.Tx, consumer, msgID string) (first bool, err error) {
	switch {
	case tx == nil:
		return false, fmt.Errorf("%w: tx is nil: Mark must run in the transaction that applies the message", ErrInvalid)
	case consumer == "":
		return false, fmt.Errorf("%w: consumer is empty", ErrInvalid)
	case msgID == "":
		return false, fmt.Errorf("%w: message id is empty (was the message published by the outbox?)", ErrInvalid)
	}
	tag, err := tx.Exec(ctx, `INSERT INTO `+i.qtable+` (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING`, consumer, msgID)
	if err != nil {
		return false, fmt.Errorf("inbox: mark %s/%s: %w", consumer, msgID, err)
	}
	return tag.RowsAffected() == 1, nil
}

// Prune deletes entries older than keep; keep must exceed the longest time a
// message can be redelivered after (broker retention, consumer lag).
func (i *Inbox) Prune(ctx context.Context, db Execer, keep time.Duration) (int64, error) {
	if keep <= 0 {
		return 0, fmt.Errorf("%w: keep must be positive", ErrInvalid)
	}
	tag, err := db.Exec(ctx, `DELETE FROM `+i.qtable+` WHERE processed_at < now() - $1 * interval '1 millisecond'`, float64(keep)/float64(time.Millisecond))
	if err != nil {
		return 0, fmt.Errorf("inbox: prune: %w", err)
	}
	return tag.RowsAffected(), nil
}
