package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/outbox"
)

// TestEnqueueBatchKeepsPerKeyCommitOrder: writers commit, concurrently,
// single Enqueues, small batches (per-key locks) and large batches (over 64
// keys: stripe locks), each transaction enqueueing first and numbering its
// messages per key afterwards (so only the outbox's own locks can keep the
// numbering and the seq order in step). The published stream must be,
// per key, exactly the committed messages in commit order.
func TestEnqueueBatchKeepsPerKeyCommitOrder(t *testing.T) {
	forEachLayout(t, func(t *testing.T, partitions int) {
		pool, o := setup(t, outbox.Config{Buckets: 8, Partitions: partitions})
		ctx := tctx(t, 90*time.Second)
		_, err := pool.Exec(ctx, `CREATE TABLE counters (key text PRIMARY KEY, n int NOT NULL DEFAULT 0);
CREATE TABLE expected (key text, n int, id uuid, PRIMARY KEY (key, n))`)
		require.NoError(t, err)
		const nkeys = 150
		keys := make([]string, nkeys)
		for i := range keys {
			keys[i] = fmt.Sprintf("k%03d", i)
		}
		_, err = pool.Exec(ctx, `INSERT INTO counters (key) SELECT unnest($1::text[])`, keys)
		require.NoError(t, err)

		var mu sync.Mutex
		got := map[string][]uuid.UUID{}
		pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
			mu.Lock()
			defer mu.Unlock()
			for _, r := range b {
				if r.Key != "" {
					got[r.Key] = append(got[r.Key], r.ID)
				}
			}
			return make([]error, len(b))
		})
		r, err := o.NewRelay(pool, pub, outbox.RelayConfig{PollInterval: 10 * time.Millisecond, BatchSize: 64, Logger: quiet(t)})
		require.NoError(t, err)
		done := make(chan struct{})
		go func() { defer close(done); _ = r.Run(ctx) }()

		number := func(tx pgx.Tx, msgs []outbox.Message, ids []uuid.UUID) error {
			for i, m := range msgs {
				if m.Key == "" {
					continue
				}
				var n int
				if err := tx.QueryRow(ctx, `UPDATE counters SET n = n + 1 WHERE key = $1 RETURNING n`, m.Key).Scan(&n); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, `INSERT INTO expected VALUES ($1, $2, $3)`, m.Key, n, ids[i]); err != nil {
					return err
				}
			}
			return nil
		}
		var wg sync.WaitGroup
		for g := range 6 {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(g), 5))
				for range 25 {
					var msgs []outbox.Message
					size := []int{1, 1 + rng.IntN(8), 70 + rng.IntN(80)}[rng.IntN(3)]
					for range size {
						k := ""
						if rng.IntN(10) > 0 {
							k = keys[rng.IntN(nkeys)]
						}
						msgs = append(msgs, outbox.Message{Topic: "t", Key: k, Payload: []byte("p")})
					}
					// Numbering updates counter rows in slice order; sort by
					// key so that writers lock those rows in one order.
					slices.SortStableFunc(msgs, func(a, b outbox.Message) int { return cmpString(a.Key, b.Key) })
					err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
						var ids []uuid.UUID
						if len(msgs) == 1 && rng.IntN(2) == 0 {
							id, err := o.Enqueue(ctx, tx, msgs[0])
							if err != nil {
								return err
							}
							ids = []uuid.UUID{id}
						} else {
							var err error
							if ids, err = o.EnqueueBatch(ctx, tx, msgs); err != nil {
								return err
							}
						}
						if rng.IntN(4) == 0 {
							time.Sleep(time.Duration(rng.IntN(3)) * time.Millisecond) // a commit that comes late
						}
						return number(tx, msgs, ids)
					})
					if err != nil {
						t.Errorf("writer: %v", err)
						return
					}
				}
			})
		}
		wg.Wait()
		waitDrained(t, pool, o, 60*time.Second)
		require.NoError(t, r.Shutdown(ctx))
		<-done

		want := map[string][]uuid.UUID{}
		rows, err := pool.Query(ctx, `SELECT key, id FROM expected ORDER BY key, n`)
		require.NoError(t, err)
		var key string
		var id uuid.UUID
		total := 0
		_, err = pgx.ForEachRow(rows, []any{&key, &id}, func() error { want[key] = append(want[key], id); total++; return nil })
		require.NoError(t, err)
		mu.Lock()
		defer mu.Unlock()
		assert.Equal(t, want, got, "per key: every committed message once, in commit order")
		t.Logf("%d keyed messages", total)
	})
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// TestEnqueueBatchRefusesAsAWhole: one bad message (its index named) and
// nothing of the batch is written; IDs given are kept, zero ones generated.
func TestEnqueueBatchRefusesAsAWhole(t *testing.T) {
	t.Parallel()
	pool, o := setup(t, outbox.Config{MaxPayload: 10})
	ctx := tctx(t, 30*time.Second)
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		_, err := o.EnqueueBatch(ctx, tx, []outbox.Message{
			{Topic: "t", Key: "a"}, {Topic: "t", Key: "b", Payload: make([]byte, 11)}, {Topic: "t", Key: "c"},
		})
		return err
	})
	require.ErrorIs(t, err, outbox.ErrInvalidMessage)
	var fe *outbox.FieldError
	require.True(t, errors.As(err, &fe))
	assert.Equal(t, "Payload", fe.Field)
	assert.Contains(t, err.Error(), "message 1 of 3")
	assert.Zero(t, pending(t, pool, o))

	given := uuid.Must(uuid.NewV7())
	var ids []uuid.UUID
	require.NoError(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		var err error
		ids, err = o.EnqueueBatch(ctx, tx, []outbox.Message{
			{Topic: "t", Key: "a", Headers: map[string]string{"h": "v"}}, {ID: given, Topic: "t"},
		})
		return err
	}))
	require.Len(t, ids, 2)
	assert.NotEqual(t, uuid.Nil, ids[0])
	assert.Equal(t, given, ids[1])
	dl, err := pool.Query(ctx, `SELECT id, key, lane, bucket, headers FROM `+o.Config().Schema+`.outbox ORDER BY seq`)
	require.NoError(t, err)
	type row struct {
		id      uuid.UUID
		key     *string
		lane    string
		bucket  int
		headers map[string]string
	}
	var rs []row
	var x row
	_, err = pgx.ForEachRow(dl, []any{&x.id, &x.key, &x.lane, &x.bucket, &x.headers}, func() error { rs = append(rs, x); x = row{}; return nil })
	require.NoError(t, err)
	require.Len(t, rs, 2)
	assert.Equal(t, ids[0], rs[0].id)
	assert.Equal(t, "a", *rs[0].key)
	assert.Equal(t, o.Bucket("a"), rs[0].bucket, "bucketed as Enqueue would")
	assert.Equal(t, map[string]string{"h": "v"}, rs[0].headers)
	assert.Nil(t, rs[1].key, "keyless")
	assert.Equal(t, o.Bucket(rs[1].lane), rs[1].bucket)
}
