package outbox_test

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
)

// ownDatabase installs an outbox in a database of its own, for tests whose
// subject (the xmin horizon, vacuum) is database-wide.
func ownDatabase(t *testing.T, cfg outbox.Config) (*pgxpool.Pool, *outbox.Outbox) {
	pool := dimmertest.Pool(t, dimmertest.Database(t))
	o, err := outbox.New(cfg)
	require.NoError(t, err)
	require.NoError(t, o.Install(tctx(t, 30*time.Second), pool))
	return pool, o
}

func counting(n *atomic.Int64) outbox.Publisher {
	return outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
		n.Add(int64(len(b)))
		return make([]error, len(b))
	})
}

// TestIdleInTransactionDoesNotStall: a transaction left idle in transaction
// (holding an xid, an uncommitted outbox row and a snapshot) must not hold
// back the delivery of anything else.
func TestIdleInTransactionDoesNotStall(t *testing.T) {
	t.Parallel()
	pool, o := ownDatabase(t, outbox.Config{})
	ctx := tctx(t, 30*time.Second)
	idle, err := pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	require.NoError(t, err)
	defer idle.Rollback(context.Background())
	_, err = o.Enqueue(ctx, idle, outbox.Message{Topic: "t", Key: "stuck"})
	require.NoError(t, err)
	var state string
	require.NoError(t, idle.QueryRow(ctx, `SELECT txid_current()::text`).Scan(&state))

	var n atomic.Int64
	r, err := o.NewRelay(pool, counting(&n), outbox.RelayConfig{PollInterval: time.Second, Logger: quiet(t)})
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	defer func() { require.NoError(t, r.Shutdown(ctx)); <-done }()
	began := time.Now()
	for i := range 100 {
		_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: fmt.Sprint("k", i)})
		require.NoError(t, err)
	}
	require.Eventually(t, func() bool { return n.Load() == 100 }, 5*time.Second, 5*time.Millisecond)
	t.Logf("100 messages delivered in %v beside an idle-in-transaction session", time.Since(began))
	var inDB int
	require.NoError(t, idle.QueryRow(ctx, `SELECT count(*) FROM dimmer.outbox`).Scan(&inDB))
	assert.Equal(t, 1, inDB, "the open transaction's own row is still there, unpublished")
	require.NoError(t, idle.Commit(ctx))
	require.Eventually(t, func() bool { return n.Load() == 101 }, 5*time.Second, 5*time.Millisecond, "delivered once committed")
}

// TestDeadTuplesStayBounded: delivered rows are deleted in bulk and the
// relay vacuums every VacuumEvery deletions, so after many rounds of fill
// and drain the table is no larger than after the first few, and its dead
// tuples are gone.
func TestDeadTuplesStayBounded(t *testing.T) {
	t.Parallel()
	// One layout after the other: the subject is vacuum, whose horizon
	// the twin's transactions would hold back.
	for _, partitions := range []int{1, 4} {
		t.Run(fmt.Sprint("partitions=", partitions), func(t *testing.T) {
			pool, o := ownDatabase(t, outbox.Config{NoNotify: true, Partitions: partitions})
			ctx := tctx(t, 60*time.Second)
			var n atomic.Int64
			r, err := o.NewRelay(pool, counting(&n), outbox.RelayConfig{PollInterval: 10 * time.Millisecond, VacuumEvery: 500, Logger: quiet(t)})
			require.NoError(t, err)
			done := make(chan struct{})
			go func() { defer close(done); _ = r.Run(ctx) }()
			defer func() { require.NoError(t, r.Shutdown(ctx)); <-done }()

			size := func() int64 {
				var s int64
				require.NoError(t, pool.QueryRow(ctx, `SELECT COALESCE((SELECT sum(pg_relation_size(relid)) FROM pg_partition_tree('dimmer.outbox')), pg_relation_size('dimmer.outbox'))::int8`).Scan(&s))
				return s
			}
			const perRound = 1000
			var sizes []int64
			var oneRound int64 // the heap of one round's rows, before any is delivered
			for round := range 8 {
				_, err := pool.Exec(ctx, `SELECT 1`) // keep the pool warm
				require.NoError(t, err)
				tx, err := pool.Begin(ctx)
				require.NoError(t, err)
				for i := range perRound {
					_, err := o.Enqueue(ctx, tx, outbox.Message{Topic: "t", Key: fmt.Sprint("k", i%197), Payload: make([]byte, 200)})
					require.NoError(t, err)
				}
				if round == 0 {
					require.NoError(t, tx.QueryRow(ctx, `SELECT COALESCE((SELECT sum(pg_relation_size(relid)) FROM pg_partition_tree('dimmer.outbox')), pg_relation_size('dimmer.outbox'))::int8`).Scan(&oneRound))
				}
				require.NoError(t, tx.Commit(ctx))
				want := int64((round + 1) * perRound)
				require.Eventually(t, func() bool { return n.Load() >= want }, 20*time.Second, 5*time.Millisecond)
				waitDrained(t, pool, o, 10*time.Second)
				sizes = append(sizes, size())
			}
			t.Logf("table size after each round of %d: %v bytes (one round's rows: %d)", perRound, sizes, oneRound)
			// Without vacuum the heap grows by a round's worth every round (8x).
			// (Measured against one round's rows, not the first round's drained
			// table: a vacuum just before that measure truncates it to nothing.)
			assert.LessOrEqual(t, slices.Max(sizes), 3*oneRound, "the heap is reused, not grown")
		})
	}
}
