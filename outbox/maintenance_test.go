package outbox_test

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
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
	pool, o := ownDatabase(t, outbox.Config{NoNotify: true})
	ctx := tctx(t, 60*time.Second)
	var n atomic.Int64
	r, err := o.NewRelay(pool, counting(&n), outbox.RelayConfig{PollInterval: 10 * time.Millisecond, VacuumEvery: 500, Logger: quiet(t)})
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	defer func() { require.NoError(t, r.Shutdown(ctx)); <-done }()

	size := func() int64 {
		var s int64
		require.NoError(t, pool.QueryRow(ctx, `SELECT pg_relation_size('dimmer.outbox')`).Scan(&s))
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
			require.NoError(t, tx.QueryRow(ctx, `SELECT pg_relation_size('dimmer.outbox')`).Scan(&oneRound))
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
}

// TestVacuumEveryCountsTheTablesDeletions: VacuumEvery bounds the dead rows
// of the table, however many relays share it: a relay holding half the
// buckets counts its deletions against half of VacuumEvery. Here every
// message falls in one relay's buckets, so that relay alone reaching half
// of VacuumEvery must vacuum (counting against all of it, it would not).
func TestVacuumEveryCountsTheTablesDeletions(t *testing.T) {
	t.Parallel()
	pool, o := setup(t, outbox.Config{Buckets: 16})
	ctx := tctx(t, 60*time.Second)
	var n atomic.Int64
	logs := &messages{}
	var relays []*outbox.Relay
	for i := range 2 {
		r, err := o.NewRelay(pool, counting(&n), outbox.RelayConfig{ID: fmt.Sprint("r", i), VacuumEvery: 1000, Logger: slog.New(logs)})
		require.NoError(t, err)
		relays = append(relays, r)
		done := make(chan struct{})
		go func() { defer close(done); _ = r.Run(ctx) }()
		t.Cleanup(func() { require.NoError(t, r.Shutdown(ctx)); <-done })
	}
	require.Eventually(t, func() bool { return len(relays[0].Buckets()) == 8 && len(relays[1].Buckets()) == 8 },
		10*time.Second, 5*time.Millisecond, "the relays share the buckets evenly")
	mine := map[int]bool{}
	for _, b := range relays[0].Buckets() {
		mine[b] = true
	}

	table := o.Config().Schema + "." + o.Config().Table
	vacuums := func() (n int64) {
		require.NoError(t, pool.QueryRow(ctx, `SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = $1::regclass`, table).Scan(&n))
		return n
	}
	before := vacuums()
	for sent := 0; sent < 600; {
		var msgs []outbox.Message
		for len(msgs) < 100 {
			if key := fmt.Sprint("k", rand.IntN(1<<30)); mine[o.Bucket(key)] {
				msgs = append(msgs, outbox.Message{Topic: "t", Key: key, Payload: []byte("x")})
			}
		}
		tx, err := pool.Begin(ctx)
		require.NoError(t, err)
		_, err = o.EnqueueBatch(ctx, tx, msgs)
		require.NoError(t, err)
		require.NoError(t, tx.Commit(ctx))
		sent += len(msgs)
		require.Eventually(t, func() bool { return n.Load() == int64(sent) }, 10*time.Second, 5*time.Millisecond)
	}
	require.Eventually(t, func() bool { return logs.count("outbox table vacuumed") == 1 }, 10*time.Second, 10*time.Millisecond,
		"vacuumed after 500 of the table's deletions, all of them r0's")
	assert.Equal(t, before+1, vacuums())
}

// TestVacuumSkippedWhenVacuumedMeanwhile: a relay whose count of deletions
// comes round does not vacuum if the table was vacuumed since the count
// began (by another relay, or autovacuum, here by hand): relays counting
// from different moments would otherwise vacuum once each per VacuumEvery
// deletions of the table.
func TestVacuumSkippedWhenVacuumedMeanwhile(t *testing.T) {
	t.Parallel()
	pool, o := setup(t, outbox.Config{})
	ctx := tctx(t, 60*time.Second)
	var n atomic.Int64
	logs := &messages{}
	r, err := o.NewRelay(pool, counting(&n), outbox.RelayConfig{VacuumEvery: 1000, Logger: slog.New(logs)})
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	defer func() { require.NoError(t, r.Shutdown(ctx)); <-done }()
	require.Eventually(t, func() bool { return len(r.Buckets()) == outbox.DefaultBuckets }, 10*time.Second, 5*time.Millisecond)

	table := o.Config().Schema + "." + o.Config().Table
	vacuums := func() (n int64) {
		require.NoError(t, pool.QueryRow(ctx, `SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = $1::regclass`, table).Scan(&n))
		return n
	}
	deliver := func(count int) {
		tx, err := pool.Begin(ctx)
		require.NoError(t, err)
		msgs := make([]outbox.Message, count)
		for i := range msgs {
			msgs[i] = outbox.Message{Topic: "t", Key: fmt.Sprint("k", rand.IntN(1<<30)), Payload: []byte("x")}
		}
		_, err = o.EnqueueBatch(ctx, tx, msgs)
		require.NoError(t, err)
		require.NoError(t, tx.Commit(ctx))
		require.Eventually(t, func() bool { return pending(t, pool, o) == 0 }, 10*time.Second, 5*time.Millisecond)
	}
	deliver(900)
	_, err = pool.Exec(ctx, `VACUUM `+table)
	require.NoError(t, err)
	before := vacuums()
	deliver(900) // the relay's count reaches 1,000 after the VACUUM above
	require.Eventually(t, func() bool { return logs.has("outbox vacuum skipped") }, 10*time.Second, 5*time.Millisecond)
	assert.Equal(t, before, vacuums(), "no second vacuum for the same dead rows")
	assert.False(t, logs.has("outbox table vacuumed"))
}

// messages records the messages logged at any level.
type messages struct {
	mu   sync.Mutex
	msgs []string
}

func (m *messages) Enabled(context.Context, slog.Level) bool { return true }
func (m *messages) Handle(_ context.Context, r slog.Record) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.msgs = append(m.msgs, r.Message)
	return nil
}
func (m *messages) WithAttrs([]slog.Attr) slog.Handler { return m }
func (m *messages) WithGroup(string) slog.Handler      { return m }
func (m *messages) has(prefix string) bool             { return m.count(prefix) > 0 }
func (m *messages) count(prefix string) (n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range m.msgs {
		if strings.HasPrefix(s, prefix) {
			n++
		}
	}
	return n
}

// TestVacuumWaitsForTheBacklog: a relay draining a backlog puts its vacuum
// off until it has caught up (up to four times its share), then vacuums
// once for all the rows it delivered.
func TestVacuumWaitsForTheBacklog(t *testing.T) {
	t.Parallel()
	pool, o := setup(t, outbox.Config{})
	ctx := tctx(t, 60*time.Second)
	var n atomic.Int64
	logs := &messages{}
	r, err := o.NewRelay(pool, counting(&n), outbox.RelayConfig{BatchSize: 100, VacuumEvery: 200, Logger: slog.New(logs)})
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	defer func() { require.NoError(t, r.Shutdown(ctx)); <-done }()
	require.Eventually(t, func() bool { return len(r.Buckets()) == outbox.DefaultBuckets }, 10*time.Second, 5*time.Millisecond)

	// Seven full batches, then a part of one: 750 deletions, under the
	// four shares (800) a backlog may put the vacuum off by.
	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	msgs := make([]outbox.Message, 750)
	for i := range msgs {
		msgs[i] = outbox.Message{Topic: "t", Key: fmt.Sprint("k", i), Payload: []byte("x")}
	}
	_, err = o.EnqueueBatch(ctx, tx, msgs)
	require.NoError(t, err)
	require.NoError(t, tx.Commit(ctx))
	require.Eventually(t, func() bool { return n.Load() == 750 }, 10*time.Second, 5*time.Millisecond)
	require.Eventually(t, func() bool { return logs.count("outbox table vacuumed") > 0 }, 10*time.Second, 5*time.Millisecond,
		"vacuumed once caught up")
	assert.Equal(t, 1, logs.count("outbox table vacuumed"), "not every 200 deletions during the drain")
}
