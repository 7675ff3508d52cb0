package cdc_test

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
)

// writeCounted runs txs transactions per key from one writer per key group:
// each bumps the key's counter (the row lock orders same-key transactions,
// so the counter is the commit order) and emits the value. Every fifth
// transaction also emits a message and rolls back.
func writeCounted(t testing.TB, ctx context.Context, pool *pgxpool.Pool, e *cdc.Emitter, topic string, keys, txs, writers int) {
	_, err := pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS counters (key text PRIMARY KEY, n int NOT NULL DEFAULT 0)`)
	require.NoError(t, err)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range txs * keys / writers {
				key := fmt.Sprint("k", (i*writers+w)%keys)
				if i%5 == 4 {
					tx, err := pool.Begin(ctx)
					require.NoError(t, err)
					_, err = e.Enqueue(ctx, tx, outbox.Message{Topic: topic, Key: key, Payload: []byte("rolled back")})
					require.NoError(t, err)
					require.NoError(t, tx.Rollback(ctx))
				}
				require.NoError(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
					var n int
					if err := tx.QueryRow(ctx, `INSERT INTO counters (key, n) VALUES ($1, 1)
ON CONFLICT (key) DO UPDATE SET n = counters.n + 1 RETURNING n`, key).Scan(&n); err != nil {
						return err
					}
					_, err := e.Enqueue(ctx, tx, outbox.Message{Topic: topic, Key: key, Payload: []byte(strconv.Itoa(n)),
						Headers: map[string]string{"n": strconv.Itoa(n)}})
					return err
				}))
			}
		}()
	}
	wg.Wait()
}

// checkOrder asserts that per key the records carry 1..want in order, once
// each after removing re-sent duplicates (a re-send repeats a tail that was
// already published, so a value seen before is a duplicate), and returns the
// number of duplicates.
func checkOrder(t testing.TB, recs []*kgo.Record, want map[string]int) (dups int) {
	next := map[string]int{}
	for _, r := range recs {
		k := string(r.Key)
		n, err := strconv.Atoi(string(r.Value))
		require.NoError(t, err, "record %q of key %s (a rolled-back message was published?)", r.Value, k)
		switch {
		case n == next[k]+1:
			next[k] = n
		case n <= next[k]:
			dups++
		default:
			t.Fatalf("key %s: got %d after %d (a record skipped or out of order)", k, n, next[k])
		}
	}
	for k, n := range want {
		assert.Equal(t, n, next[k], "key %s: last value", k)
	}
	assert.Len(t, next, len(want), "keys seen")
	return dups
}

// A flaky publisher fails some records once: their keys wait and retry,
// other keys go on, and per key the order is still commit order.
func TestRelayPublishesCommittedMessagesInOrder(t *testing.T) {
	t.Parallel()
	url, pool := logicalDB(t)
	name := slot(t, pool, cdc.SlotSpec{Purpose: "relay"})
	seeds := brokers(t)
	topic := dimmertest.Name("orders_")
	createTopic(t, seeds, topic, 4)
	kp := producer(t, seeds)
	var calls, failedOnce atomic.Int64
	var mu sync.Mutex
	sameKeyInBatch := false
	pub := outbox.PublisherFunc(func(ctx context.Context, batch []outbox.Record) []error {
		keys := map[string]bool{}
		mu.Lock()
		for _, r := range batch {
			if keys[r.Key] {
				sameKeyInBatch = true
			}
			keys[r.Key] = true
		}
		mu.Unlock()
		if calls.Add(1)%3 == 0 {
			// Fail the first record of this batch, publish the rest.
			res := kp.Publish(ctx, batch[1:])
			failedOnce.Add(1)
			return append([]error{fmt.Errorf("injected failure")}, res...)
		}
		return kp.Publish(ctx, batch)
	})
	e, err := cdc.NewEmitter()
	require.NoError(t, err)
	r, err := cdc.NewRelay(url, pub, cdc.RelayConfig{Slot: name, BatchSize: 50, BackoffMin: time.Millisecond, BackoffMax: 10 * time.Millisecond, Logger: quiet(t)})
	require.NoError(t, err)
	ctx := tctx(t, 2*time.Minute)
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()

	const keys, txs = 40, 25
	writeCounted(t, ctx, pool, e, topic, keys, txs, 8)
	want := map[string]int{}
	for k := range keys {
		want[fmt.Sprint("k", k)] = txs
	}
	// Every committed message reaches the broker; the slot's confirmed
	// position then passes the end of the writes.
	var end string
	require.NoError(t, pool.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&end))
	require.Eventually(t, func() bool {
		var ok bool
		require.NoError(t, pool.QueryRow(ctx, `SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1`, name, end).Scan(&ok))
		return ok
	}, time.Minute, 20*time.Millisecond)
	recs := consumeAll(t, seeds, topic)
	dups := checkOrder(t, recs, want)
	assert.Zero(t, dups, "a clean run re-sends nothing")
	assert.Len(t, recs, keys*txs)
	assert.Positive(t, failedOnce.Load())
	assert.False(t, sameKeyInBatch, "a batch held two records of one key")
	for _, rec := range recs {
		assert.Equal(t, string(rec.Value), headerOf(rec, "n"))
		assert.NotEmpty(t, headerOf(rec, outbox.HeaderMessageID))
	}
	require.NoError(t, r.Shutdown(ctx))
	require.NoError(t, <-done)
}

func headerOf(r *kgo.Record, name string) string {
	for _, h := range r.Headers {
		if h.Key == name {
			return string(h.Value)
		}
	}
	return ""
}

func TestRelayMissingSlot(t *testing.T) {
	t.Parallel()
	url, _ := logicalDB(t)
	r, err := cdc.NewRelay(url, outbox.PublisherFunc(func(context.Context, []outbox.Record) []error { return nil }),
		cdc.RelayConfig{Slot: "no_such_slot", Logger: quiet(t)})
	require.NoError(t, err)
	err = r.Run(tctx(t, 30*time.Second))
	require.ErrorIs(t, err, cdc.ErrNoSlot)
	assert.Contains(t, err.Error(), "no_such_slot")
}

func notSentAll(n int, err error) []error {
	res := make([]error, n)
	for i := range res {
		res[i] = err
	}
	return res
}

// publishLog records which relay published when, to prove that two relays
// never publish at the same time.
type publishLog struct {
	mu    sync.Mutex
	spans []span
}

type span struct {
	relay      string
	start, end time.Time
}

func (l *publishLog) wrap(id string, p outbox.Publisher) outbox.Publisher {
	return outbox.PublisherFunc(func(ctx context.Context, batch []outbox.Record) []error {
		s := span{relay: id, start: time.Now()}
		res := p.Publish(ctx, batch)
		s.end = time.Now()
		l.mu.Lock()
		l.spans = append(l.spans, s)
		l.mu.Unlock()
		return res
	})
}

// Two relays on one slot: one publishes, the other stands by; when the
// active one dies for the database (its connections are cut and its WAL
// sender terminated, new connections refused) while a Publish call of it
// hangs at the broker, the standby takes over, waits out the dead one's
// lease, and their publishing never overlaps. A relay whose connection
// merely blipped may take its slot back within its own lease, so the test
// makes sure a cannot come back: only b can take over.
func TestRelayStandbyTakesOver(t *testing.T) {
	t.Parallel()
	url, pool := logicalDB(t)
	name := slot(t, pool, cdc.SlotSpec{Purpose: "relay"})
	seeds := brokers(t)
	topic := dimmertest.Name("orders_")
	createTopic(t, seeds, topic, 4)
	kp := producer(t, seeds)
	log := &publishLog{}
	ctx := tctx(t, 2*time.Minute)
	newRelay := func(id, connString string, pub outbox.Publisher) (*cdc.Relay, chan error) {
		r, err := cdc.NewRelay(connString, log.wrap(id, pub), cdc.RelayConfig{Slot: name, ID: id, BatchSize: 20,
			StandbyPoll: 20 * time.Millisecond, FenceTTL: 2 * time.Second, Logger: quiet(t)})
		require.NoError(t, err)
		done := make(chan error, 1)
		go func() { done <- r.Run(ctx) }()
		return r, done
	}
	// a reaches Postgres through a proxy that can cut it off for good.
	// Once stalled, its Publish calls hang until their deadline.
	proxy := newCutProxy(t, hostOf(t, url))
	var stall atomic.Bool
	stalled := make(chan struct{}, 1)
	aPub := outbox.PublisherFunc(func(ctx context.Context, batch []outbox.Record) []error {
		if stall.Load() {
			select {
			case stalled <- struct{}{}:
			default:
			}
			<-ctx.Done()
			return notSentAll(len(batch), ctx.Err())
		}
		return kp.Publish(ctx, batch)
	})
	a, aDone := newRelay("a", proxy.via(t, url), aPub)
	require.Eventually(t, a.Active, 30*time.Second, 5*time.Millisecond)
	var aSender int32
	require.NoError(t, pool.QueryRow(ctx, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, name).Scan(&aSender))
	b, bDone := newRelay("b", url, kp)
	e, err := cdc.NewEmitter()
	require.NoError(t, err)

	const keys = 20
	writeCounted(t, ctx, pool, e, topic, keys, 10, 4)
	published := func(relay string) func() bool {
		return func() bool {
			log.mu.Lock()
			defer log.mu.Unlock()
			for _, s := range log.spans {
				if s.relay == relay {
					return true
				}
			}
			return false
		}
	}
	require.Eventually(t, published("a"), 30*time.Second, 5*time.Millisecond)
	assert.False(t, b.Active(), "the standby must not read while a holds the slot")
	stall.Store(true)
	writes := make(chan struct{})
	go func() {
		defer close(writes)
		writeCounted(t, ctx, pool, e, topic, keys, 10, 4)
	}()
	select {
	case <-stalled:
	case <-ctx.Done():
		t.Fatal("a never published after the stall")
	}
	// a dies for the database while writes go on and a Publish call of it
	// hangs: every connection of it is cut, new ones are refused, and its
	// WAL sender is terminated so the slot is free at once. Only its lease
	// keeps the hanging call from overlapping b's publishing.
	proxy.refuse.Store(true)
	proxy.cut()
	_, err = pool.Exec(ctx, `SELECT pg_terminate_backend($1)`, aSender)
	require.NoError(t, err)
	require.Eventually(t, b.Active, 30*time.Second, 5*time.Millisecond, "the standby takes the slot")
	require.Eventually(t, func() bool { return !a.Active() }, 30*time.Second, 5*time.Millisecond)
	<-writes
	// Written after a died: only b can publish these.
	writeCounted(t, ctx, pool, e, topic, keys, 10, 4)
	var end string
	require.NoError(t, pool.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&end))
	require.Eventually(t, func() bool {
		var ok bool
		require.NoError(t, pool.QueryRow(ctx, `SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1`, name, end).Scan(&ok))
		return ok
	}, time.Minute, 20*time.Millisecond)
	assert.True(t, b.Active(), "b still owns the slot")
	assert.False(t, a.Active(), "a, cut off from the database, never took the slot back")
	require.NoError(t, a.Shutdown(ctx))
	require.NoError(t, b.Shutdown(ctx))
	require.NoError(t, <-aDone)
	require.NoError(t, <-bDone)

	want := map[string]int{}
	for k := range keys {
		want[fmt.Sprint("k", k)] = 30
	}
	dups := checkOrder(t, consumeAll(t, seeds, topic), want)
	t.Logf("re-sent after the takeover: %d", dups)
	log.mu.Lock()
	defer log.mu.Unlock()
	relays := map[string]bool{}
	for i, s := range log.spans {
		relays[s.relay] = true
		for _, o := range log.spans[i+1:] {
			if o.relay != s.relay && o.start.Before(s.end) && s.start.Before(o.end) {
				t.Fatalf("relays %s and %s published at the same time: %v..%v and %v..%v", s.relay, o.relay, s.start, s.end, o.start, o.end)
			}
		}
	}
	assert.Equal(t, map[string]bool{"a": true, "b": true}, relays, "both relays published, one after the other")
}

// A transaction left open elsewhere (it already emitted a message) stalls
// nothing: later transactions are published as they commit, and the open
// one's message when it commits, in commit order.
func TestRelayLongOpenTransactionStallsNothing(t *testing.T) {
	t.Parallel()
	url, pool := logicalDB(t)
	name := slot(t, pool, cdc.SlotSpec{Purpose: "relay"})
	ctx := tctx(t, time.Minute)
	var mu sync.Mutex
	var got []string
	pub := outbox.PublisherFunc(func(_ context.Context, batch []outbox.Record) []error {
		mu.Lock()
		defer mu.Unlock()
		for _, r := range batch {
			got = append(got, string(r.Payload))
		}
		return make([]error, len(batch))
	})
	r, err := cdc.NewRelay(url, pub, cdc.RelayConfig{Slot: name, Logger: quiet(t)})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	e, err := cdc.NewEmitter()
	require.NoError(t, err)
	long, err := pool.Begin(ctx)
	require.NoError(t, err)
	_, err = e.Enqueue(ctx, long, outbox.Message{Topic: "t", Key: "k", Payload: []byte("long")})
	require.NoError(t, err)
	for i := range 3 {
		_, err := e.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: "k", Payload: []byte(fmt.Sprint("short", i))})
		require.NoError(t, err)
	}
	require.Eventually(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(got) == 3 }, 30*time.Second, 5*time.Millisecond)
	require.NoError(t, long.Commit(ctx))
	require.Eventually(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(got) == 4 }, 30*time.Second, 5*time.Millisecond)
	mu.Lock()
	assert.Equal(t, []string{"short0", "short1", "short2", "long"}, got)
	mu.Unlock()
	require.NoError(t, r.Shutdown(ctx))
	require.NoError(t, <-done)
}
