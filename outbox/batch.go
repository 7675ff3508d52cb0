package outbox

import (
	"cmp"
	"context"
	"fmt"
	"slices"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Key locks and stripes. Enqueue locks its key exclusively (class lockNS,
// object keyLock(key)) and the key's stripe shared (class lockNS+3, object
// keyLock(key) & stripeMask). A batch of few keys takes the same locks as
// that many Enqueues. A batch of many keys cannot: PostgreSQL keeps every
// lock a transaction holds in a shared table sized max_locks_per_transaction
// x max_connections (64 x 100 by default), which 50,000 key locks would
// overflow. It locks the stripes of its keys exclusively instead, at most
// stripes locks: that excludes every writer of those keys (each holds its
// key's stripe shared) while the batch's transaction lasts, which is all
// the per-key order needs, at the price of also holding back writers of
// other keys in the same stripes.
const (
	stripes    = 1024
	stripeMask = "1023"
	// batchKeyLocks is the most distinct keys a batch locks one by one.
	batchKeyLocks = 64
)

// EnqueueBatch writes msgs in the caller's transaction, like calling
// [Outbox.Enqueue] for each in order, but in two round trips: the key locks,
// then one COPY of all rows. Per key, the messages are published in slice
// order, after every message of the key committed before tx and before any
// committed after it, exactly as with Enqueue. It returns the message IDs
// (generated for zero IDs), in slice order.
//
// Every message is checked first: a refused one (its index is in the
// error, a [*FieldError] or [*RecordTooLargeError]) writes nothing.
//
// Locks: a batch of up to 64 distinct keys takes the same per-key locks as
// Enqueue, in key-hash order; a larger one locks the keys' stripes (1,024
// in all) exclusively, in stripe order, so while its transaction lasts it
// also holds back writers of unrelated keys that share a stripe (with
// thousands of keys, nearly all writers). Concurrent batches never deadlock
// each other; a transaction that enqueues keys one by one in another order
// may deadlock with a batch and should retry, as with Enqueue. Instances
// running a version without EnqueueBatch do not take stripe locks, so
// finish such a rollout before enqueueing batches of more than 64 keys.
func (o *Outbox) EnqueueBatch(ctx context.Context, tx pgx.Tx, msgs []Message) ([]uuid.UUID, error) {
	if tx == nil {
		return nil, badMessage("tx", "is nil: EnqueueBatch must run inside the caller's transaction")
	}
	if len(msgs) == 0 {
		return nil, nil
	}
	ids := make([]uuid.UUID, len(msgs))
	rows := make([][]any, len(msgs))
	keys := map[int32]bool{}
	anyHeaders := false
	for i := range msgs {
		m := msgs[i]
		if err := o.validate(&m); err != nil {
			return nil, fmt.Errorf("message %d of %d: %w", i, len(msgs), err)
		}
		if m.ID == uuid.Nil {
			id, err := uuid.NewV7()
			if err != nil {
				return nil, fmt.Errorf("outbox: generate id: %w", err)
			}
			m.ID = id
		}
		ids[i] = m.ID
		var headers any
		if len(m.Headers) > 0 {
			headers, anyHeaders = m.Headers, true
		}
		payload := m.Payload
		if payload == nil {
			payload = []byte{}
		}
		var key any
		lane := m.Key
		if m.Key == "" {
			lane = keylessLane(m.ID)
		} else {
			key = m.Key
			keys[keyLock(m.Key)] = true
		}
		// As [16]byte: pgx encodes it straight to uuid, where uuid.UUID
		// would go through its text form (a third of the COPY's CPU).
		rows[i] = []any{[16]byte(m.ID), int32(o.Bucket(lane)), lane, key, m.Topic, payload, headers}
	}

	batch := &pgx.Batch{}
	if len(keys) > 0 {
		locks := make([]int32, 0, len(keys))
		for k := range keys {
			locks = append(locks, k)
		}
		if len(locks) <= batchKeyLocks {
			// As that many Enqueues, in a fixed order: unnest yields the
			// array's order and the select list runs left to right per row.
			slices.SortFunc(locks, func(a, b int32) int {
				return cmp.Or(cmp.Compare(a&(stripes-1), b&(stripes-1)), cmp.Compare(a, b))
			})
			batch.Queue(`SELECT pg_advisory_xact_lock_shared($1::int4, k & `+stripeMask+`), pg_advisory_xact_lock($2::int4, k)
FROM unnest($3::int4[]) AS k`, o.lockNS+3, o.lockNS, locks)
		} else {
			seen := map[int32]bool{}
			var ss []int32
			for _, k := range locks {
				if s := k & (stripes - 1); !seen[s] {
					seen[s] = true
					ss = append(ss, s)
				}
			}
			slices.Sort(ss)
			batch.Queue(`SELECT pg_advisory_xact_lock($1::int4, s) FROM unnest($2::int4[]) AS s`, o.lockNS+3, ss)
		}
	}
	if !o.cfg.NoNotify {
		batch.Queue(`SELECT pg_notify($1, '')`, o.channel)
	}
	if batch.Len() > 0 {
		if err := tx.SendBatch(ctx, batch).Close(); err != nil {
			return nil, fmt.Errorf("outbox: enqueue batch to %s: lock keys: %w", o.table, err)
		}
	}
	// The locks are held: the rows now draw their seq in slice order.
	cols := []string{"id", "bucket", "lane", "key", "topic", "payload", "headers"}
	if !anyHeaders {
		cols = cols[:6] // every row's headers are NULL: leave the column out
		for i := range rows {
			rows[i] = rows[i][:6]
		}
	}
	if _, err := tx.CopyFrom(ctx, pgx.Identifier{o.cfg.Schema, o.cfg.Table}, cols, pgx.CopyFromRows(rows)); err != nil {
		return nil, fmt.Errorf("outbox: enqueue batch to %s: %w", o.table, err)
	}
	return ids, nil
}
