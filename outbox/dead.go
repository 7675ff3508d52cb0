package outbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Querier runs queries: *pgxpool.Pool, *pgx.Conn and pgx.Tx all are.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// DeadLetter is a message that failed Config.MaxAttempts times. It holds
// back the later messages of its key until it is retried or skipped.
type DeadLetter struct {
	Record
	LastError string
	DeadAt    time.Time
	// Waiting counts the later messages of the same key held back by it.
	Waiting int
	// RawHeaders holds the stored headers when they are not a JSON object
	// of strings (Headers is then nil): a hand-edited row is dead for
	// that, and an operator who skips it keeps what it held.
	RawHeaders string
}

// DeadLetters lists up to limit dead letters, oldest first, optionally only
// of one topic ("" for all).
func (o *Outbox) DeadLetters(ctx context.Context, db Querier, topic string, limit int) ([]DeadLetter, error) {
	if limit <= 0 {
		limit = 100
	}
	rows, err := db.Query(ctx, `SELECT d.seq, d.id, d.key, d.topic, d.payload, d.headers::text, d.attempts, d.created_at,
	coalesce(d.last_error, ''), d.dead_at,
	(SELECT count(*) FROM `+o.table+` w WHERE w.bucket = d.bucket AND w.lane = d.lane AND w.seq > d.seq)
FROM `+o.table+` d WHERE d.dead_at IS NOT NULL AND ($1 = '' OR d.topic = $1)
ORDER BY d.dead_at, d.seq LIMIT $2`, topic, limit)
	if err != nil {
		return nil, fmt.Errorf("outbox: list dead letters: %w", err)
	}
	var out []DeadLetter
	var d DeadLetter
	var key *string
	var headers []byte
	_, err = pgx.ForEachRow(rows, []any{&d.Seq, &d.ID, &key, &d.Topic, &d.Payload, &headers, &d.Attempts, &d.CreatedAt, &d.LastError, &d.DeadAt, &d.Waiting}, func() error {
		if key != nil {
			d.Key = *key
		}
		d.Headers, d.RawHeaders = lenientHeaders(headers)
		out = append(out, d)
		d, key, headers = DeadLetter{}, nil, nil
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("outbox: list dead letters: %w", err)
	}
	return out, nil
}

// RetryDead makes a dead letter pending again with a fresh attempt budget;
// the relay publishes it next, then the messages it held back.
func (o *Outbox) RetryDead(ctx context.Context, db Execer, id uuid.UUID) error {
	tag, err := db.Exec(ctx, `UPDATE `+o.table+` SET dead_at = NULL, attempts = 0, next_attempt_at = NULL
WHERE id = $1 AND dead_at IS NOT NULL`, id)
	if err != nil {
		return fmt.Errorf("outbox: retry dead letter %s: %w", id, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("%w: %s", ErrNotDead, id)
	}
	return nil
}

// RetryAllDead makes every dead letter pending again with a fresh attempt
// budget, optionally only of one topic ("" for all), and returns how many:
// after an outage of the broker that outlasted MaxAttempts, every key it
// held flows again, each in its own order.
func (o *Outbox) RetryAllDead(ctx context.Context, db Execer, topic string) (int64, error) {
	tag, err := db.Exec(ctx, `UPDATE `+o.table+` SET dead_at = NULL, attempts = 0, next_attempt_at = NULL
WHERE dead_at IS NOT NULL AND ($1 = '' OR topic = $1)`, topic)
	if err != nil {
		return 0, fmt.Errorf("outbox: retry dead letters: %w", err)
	}
	return tag.RowsAffected(), nil
}

// SkipDead deletes a dead letter without publishing it and returns it,
// whole, for the operator's record (Waiting: the messages it let flow).
func (o *Outbox) SkipDead(ctx context.Context, db Querier, id uuid.UUID) (DeadLetter, error) {
	var d DeadLetter
	var key *string
	var headers []byte
	err := db.QueryRow(ctx, `DELETE FROM `+o.table+` d WHERE id = $1 AND dead_at IS NOT NULL
RETURNING seq, id, key, topic, payload, headers::text, attempts, created_at, coalesce(last_error, ''), dead_at,
	(SELECT count(*) FROM `+o.table+` w WHERE w.bucket = d.bucket AND w.lane = d.lane AND w.seq > d.seq)`, id).
		Scan(&d.Seq, &d.ID, &key, &d.Topic, &d.Payload, &headers, &d.Attempts, &d.CreatedAt, &d.LastError, &d.DeadAt, &d.Waiting)
	if errors.Is(err, pgx.ErrNoRows) {
		return DeadLetter{}, fmt.Errorf("%w: %s", ErrNotDead, id)
	}
	if err != nil {
		return DeadLetter{}, fmt.Errorf("outbox: skip dead letter %s: %w", id, err)
	}
	d.Headers, d.RawHeaders = lenientHeaders(headers)
	if key != nil {
		d.Key = *key
	}
	return d, nil
}

// Stats describes the whole outbox.
type Stats struct {
	Pending int64         // undelivered messages, dead letters included
	Dead    int64         // dead letters
	Oldest  time.Duration // age of the oldest undelivered message
}

// Stats counts undelivered messages, optionally of topics starting with
// topicPrefix ("" for all).
func (o *Outbox) Stats(ctx context.Context, db Querier, topicPrefix string) (Stats, error) {
	return o.stats(ctx, db, `starts_with(topic, $1)`, topicPrefix)
}

// TopicStats counts the undelivered messages of exactly one topic: dualwrite's
// "no pending repairs" guard asks TopicStats(ctx, db, "dimmer.repair.<migration>"),
// which a prefix would confuse with the repairs of "<migration>.v2".
func (o *Outbox) TopicStats(ctx context.Context, db Querier, topic string) (Stats, error) {
	return o.stats(ctx, db, `topic = $1`, topic)
}

func (o *Outbox) stats(ctx context.Context, db Querier, where, arg string) (Stats, error) {
	var s Stats
	var age float64
	err := db.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE dead_at IS NOT NULL),
	coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8
FROM `+o.table+` WHERE `+where, arg).Scan(&s.Pending, &s.Dead, &age)
	if err != nil {
		return Stats{}, fmt.Errorf("outbox: stats: %w", err)
	}
	s.Oldest = time.Duration(age * float64(time.Second))
	return s, nil
}

// lenientHeaders decodes stored headers for an operator's view of a dead
// letter: headers edited into something else than an object of strings
// (which is why such a message is dead) come back as they are stored,
// rather than making the dead letter unreadable.
func lenientHeaders(raw []byte) (headers map[string]string, stored string) {
	if raw == nil {
		return nil, ""
	}
	if json.Unmarshal(raw, &headers) != nil {
		return nil, string(raw)
	}
	return headers, ""
}
