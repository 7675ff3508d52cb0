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

// killable is a relay with everything a crash takes down with it.
type killable struct {
	relay  *outbox.Relay
	cancel context.CancelFunc
	pool   *pgxpool.Pool
	done   chan struct{}
}

// TestPerKeyOrderUnderChaos commits randomized, interleaved transactions from
// many goroutines while 4 relays publish to Kafka and are killed abruptly
// (context cancelled right after a batch was published and before it was
// acknowledged, pool and producer closed, no lease released) and replaced.
// The published stream must hold every committed message, none of the
// rolled-back ones, and per key the first deliveries in commit order.
func TestPerKeyOrderUnderChaos(t *testing.T) {
	forEachLayout(t, func(t *testing.T, partitions int) {
		pool, o := setup(t, outbox.Config{Buckets: 16, Partitions: partitions})
		ctx := tctx(t, 90*time.Second)
		seeds := brokers(t)
		topic := dimmertest.Name("orders_")
		createTopic(t, seeds, topic, 8)

		// Ground truth, written in the same transactions: a per-key counter
		// row (its lock makes n the commit order per key) and the message id
		// it numbered.
		_, err := pool.Exec(ctx, `CREATE TABLE counters (key text PRIMARY KEY, n int NOT NULL DEFAULT 0);
CREATE TABLE expected (key text, n int, id uuid, PRIMARY KEY (key, n))`)
		require.NoError(t, err)
		const nkeys = 30
		keys := make([]string, nkeys)
		for i := range keys {
			keys[i] = fmt.Sprintf("acct-%02d", i)
			_, err := pool.Exec(ctx, `INSERT INTO counters (key) VALUES ($1)`, keys[i])
			require.NoError(t, err)
		}

		var kills atomic.Int64
		var mu sync.Mutex
		relays := map[int]*killable{}
		start := func(slot int) {
			rp := relayPool(t)
			cl, pub := producer(t, seeds)
			k := &killable{pool: rp, done: make(chan struct{})}
			rctx, cancel := context.WithCancel(ctx)
			k.cancel = cancel
			// Kill mid-batch: after the broker acknowledged, before the ack.
			crashy := outbox.PublisherFunc(func(c context.Context, b []outbox.Record) []error {
				res := pub.Publish(c, b)
				if rand.IntN(8) == 0 {
					kills.Add(1)
					cancel()
				}
				return res
			})
			r, err := o.NewRelay(rp, crashy, outbox.RelayConfig{
				ID: fmt.Sprintf("relay-%d-%d", slot, rand.Int()), LeaseTTL: 400 * time.Millisecond,
				PollInterval: 50 * time.Millisecond, BatchSize: 64, Logger: quiet(t),
			})
			require.NoError(t, err)
			k.relay = r
			go func() {
				defer close(k.done)
				_ = r.Run(rctx)
				rp.Close() // a crash takes its connections and producer with it
				cl.Close()
			}()
			mu.Lock()
			relays[slot] = k
			mu.Unlock()
		}
		for slot := range 4 {
			start(slot)
		}
		// The supervisor restarts crashed relays and crashes some more.
		stopSup := make(chan struct{})
		supDone := make(chan struct{})
		go func() {
			defer close(supDone)
			tick := time.NewTicker(30 * time.Millisecond)
			defer tick.Stop()
			n := 0
			for {
				select {
				case <-stopSup:
					return
				case <-tick.C:
				}
				n++
				for slot := range 4 {
					mu.Lock()
					k := relays[slot]
					mu.Unlock()
					select {
					case <-k.done:
						start(slot)
					default:
						if n%10 == 0 && rand.IntN(4) == 0 {
							kills.Add(1)
							k.cancel() // killed at a random point
						}
					}
				}
			}
		}()

		began := time.Now()
		var committed, rolledBack atomic.Int64
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(g), 7))
				for range 40 {
					pick := rng.Perm(nkeys)[:1+rng.IntN(3)]
					slices.Sort(pick) // a consistent lock order: no deadlocks
					err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
						for _, i := range pick {
							for range 1 + rng.IntN(2) {
								id, err := o.Enqueue(ctx, tx, outbox.Message{Topic: topic, Key: keys[i], Payload: []byte(keys[i])})
								if err != nil {
									return err
								}
								if rng.IntN(3) == 0 {
									time.Sleep(time.Duration(rng.IntN(1500)) * time.Microsecond)
								}
								var n int
								if err := tx.QueryRow(ctx, `UPDATE counters SET n = n + 1 WHERE key = $1 RETURNING n`, keys[i]).Scan(&n); err != nil {
									return err
								}
								if _, err := tx.Exec(ctx, `INSERT INTO expected VALUES ($1, $2, $3)`, keys[i], n, id); err != nil {
									return err
								}
							}
						}
						if rng.IntN(10) == 0 {
							return errRollback
						}
						return nil
					})
					switch err {
					case nil:
						committed.Add(1)
					case errRollback:
						rolledBack.Add(1)
					default:
						t.Errorf("writer: %v", err)
						return
					}
				}
			}()
		}
		wg.Wait()
		t.Logf("writers done after %v", time.Since(began))
		waitDrained(t, pool, o, 45*time.Second)
		t.Logf("drained after %v", time.Since(began))
		close(stopSup)
		<-supDone
		mu.Lock()
		for _, k := range relays {
			_ = k.relay.Shutdown(ctx)
			<-k.done
		}
		mu.Unlock()
		t.Logf("relays stopped after %v", time.Since(began))

		want := map[string][]string{}
		rows, err := pool.Query(ctx, `SELECT key, id::text FROM expected ORDER BY key, n`)
		require.NoError(t, err)
		var key, id string
		total := 0
		_, err = pgx.ForEachRow(rows, []any{&key, &id}, func() error { want[key] = append(want[key], id); total++; return nil })
		require.NoError(t, err)

		got := map[string][]string{}
		recs := consumeAll(t, seeds, topic)
		for _, r := range recs {
			got[string(r.Key)] = append(got[string(r.Key)], header(r, outbox.HeaderMessageID))
		}
		dups := 0
		for _, k := range keys {
			seen := map[string]bool{}
			var first []string
			for _, id := range got[k] {
				if seen[id] {
					dups++
					continue
				}
				seen[id] = true
				first = append(first, id)
			}
			require.Equal(t, want[k], first, "key %s: first deliveries must be every committed message, in commit order", k)
		}
		t.Logf("%d transactions committed, %d rolled back, %d messages, %d published records, %d duplicates, %d relay kills",
			committed.Load(), rolledBack.Load(), total, len(recs), dups, kills.Load())
		assert.Equal(t, total+dups, len(recs))
		assert.Greater(t, kills.Load(), int64(3), "the test must actually kill relays")
		assert.Greater(t, rolledBack.Load(), int64(0))
	})
}

var errRollback = fmt.Errorf("test rollback")

// TestLeasesSplitAndFence: relays share the buckets fairly; a relay whose
// lease was taken over cannot acknowledge (its rows stay for the owner).
func TestLeasesSplitAndFence(t *testing.T) {
	forEachLayout(t, func(t *testing.T, partitions int) {
		pool, o := setup(t, outbox.Config{Buckets: 8, Partitions: partitions})
		ctx := tctx(t, 30*time.Second)
		var published atomic.Int64
		pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
			published.Add(int64(len(b)))
			return make([]error, len(b))
		})
		var rs []*outbox.Relay
		var wg sync.WaitGroup
		for i := range 3 {
			r, err := o.NewRelay(pool, pub, outbox.RelayConfig{ID: fmt.Sprint("r", i), LeaseTTL: 300 * time.Millisecond, PollInterval: 20 * time.Millisecond, Logger: quiet(t)})
			require.NoError(t, err)
			rs = append(rs, r)
			wg.Add(1)
			go func() { defer wg.Done(); _ = r.Run(ctx) }()
		}
		require.Eventually(t, func() bool {
			all := map[int]int{}
			for _, r := range rs {
				bs := r.Buckets()
				if len(bs) < 2 || len(bs) > 3 {
					return false
				}
				for _, b := range bs {
					all[b]++
				}
			}
			return len(all) == 8
		}, 10*time.Second, 20*time.Millisecond, "8 buckets split 3/3/2 without overlap")

		// Graceful shutdown hands buckets over at once (well under a TTL).
		require.NoError(t, rs[0].Shutdown(ctx))
		require.Eventually(t, func() bool { return len(rs[1].Buckets())+len(rs[2].Buckets()) == 8 }, 5*time.Second, 10*time.Millisecond)

		for i := range 50 {
			_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: fmt.Sprint("k", i)})
			require.NoError(t, err)
		}
		waitDrained(t, pool, o, 10*time.Second)
		assert.GreaterOrEqual(t, published.Load(), int64(50))
		for _, r := range rs[1:] {
			require.NoError(t, r.Shutdown(ctx))
		}
		wg.Wait()
		var owned int
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM `+o.Config().Schema+`.outbox_leases WHERE owner IS NOT NULL`).Scan(&owned))
		assert.Zero(t, owned, "shutdown releases every lease")
	})
}

// TestFencedAck: a relay stalled in Publish past its lease is fenced off.
// Another relay takes the bucket over (and fails to publish, so the row
// stays); the stalled relay's acknowledgement must then delete nothing.
func TestFencedAck(t *testing.T) {
	t.Parallel()
	pool, o := setup(t, outbox.Config{Buckets: 1})
	ctx := tctx(t, 30*time.Second)
	_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: "k"})
	require.NoError(t, err)
	table := o.Config().Schema + ".outbox"

	stalled := make(chan struct{})
	release := make(chan struct{})
	slow := outbox.PublisherFunc(func(c context.Context, b []outbox.Record) []error {
		close(stalled)
		<-release // ignores its deadline, like a wedged client
		return make([]error, len(b))
	})
	r1, err := o.NewRelay(pool, slow, outbox.RelayConfig{ID: "slow", LeaseTTL: 300 * time.Millisecond, PollInterval: 20 * time.Millisecond, Logger: quiet(t)})
	require.NoError(t, err)
	d1 := make(chan struct{})
	go func() { defer close(d1); _ = r1.Run(ctx) }()
	<-stalled
	require.Equal(t, []int{0}, r1.Buckets())

	r2, err := o.NewRelay(pool, outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
		errs := make([]error, len(b))
		for i := range errs {
			errs[i] = fmt.Errorf("broker says no")
		}
		return errs
	}), outbox.RelayConfig{ID: "owner", LeaseTTL: 300 * time.Millisecond, PollInterval: 20 * time.Millisecond, BackoffMin: time.Minute, BackoffMax: time.Minute, Logger: quiet(t)})
	require.NoError(t, err)
	d2 := make(chan struct{})
	go func() { defer close(d2); _ = r2.Run(ctx) }()
	attempts := func() int {
		var n int
		require.NoError(t, pool.QueryRow(ctx, `SELECT attempts FROM `+table).Scan(&n))
		return n
	}
	require.Eventually(t, func() bool { return attempts() == 1 }, 10*time.Second, 10*time.Millisecond,
		"the lease expires and the new owner tries (and fails) to publish")

	close(release) // the stale relay now acknowledges its batch
	require.Eventually(t, func() bool { return len(r1.Buckets()) == 0 }, 10*time.Second, 10*time.Millisecond,
		"the fenced-off relay learns it lost the lease")
	assert.Equal(t, 1, pending(t, pool, o), "the stale acknowledgement must not delete the new owner's row")
	assert.Equal(t, []int{0}, r2.Buckets())
	require.NoError(t, r1.Shutdown(ctx))
	require.NoError(t, r2.Shutdown(ctx))
	<-d1
	<-d2
}

// takeOverSQL hands the buckets matching cond to another relay for an
// hour, as a takeover commits it.
func takeOverSQL(o *outbox.Outbox, cond string) string {
	c := o.Config()
	return `UPDATE ` + pgx.Identifier{c.Schema, c.Table + "_leases"}.Sanitize() + ` SET owner = 'other', epoch = epoch + 1,
	expires_at = now() + interval '1 hour' WHERE ` + cond
}

// startRelay runs a relay with ID "r"; stop shuts it down and waits for Run.
func startRelay(t *testing.T, ctx context.Context, o *outbox.Outbox, pool *pgxpool.Pool, pub outbox.Publisher, cfg outbox.RelayConfig) (r *outbox.Relay, stop func()) {
	cfg.ID, cfg.Logger = "r", quiet(t)
	r, err := o.NewRelay(pool, pub, cfg)
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	return r, func() {
		require.NoError(t, r.Shutdown(ctx))
		<-done
	}
}

// TestAckDeletesOnlyHeldBuckets: a batch spans two buckets and one of them
// is taken over while the batch is published. The acknowledgement deletes
// the row of the bucket still held and leaves the other for its new owner.
func TestAckDeletesOnlyHeldBuckets(t *testing.T) {
	forEachLayout(t, func(t *testing.T, partitions int) {
		pool, o := setup(t, outbox.Config{Buckets: 2, Partitions: min(partitions, 2)})
		ctx := tctx(t, 30*time.Second)
		keyOf := map[int]string{}
		for i := 0; len(keyOf) < 2; i++ {
			k := fmt.Sprint("k", i)
			if _, ok := keyOf[o.Bucket(k)]; !ok {
				keyOf[o.Bucket(k)] = k
			}
		}
		for _, k := range keyOf {
			_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: k})
			require.NoError(t, err)
		}
		c := o.Config()
		stalled := make(chan struct{})
		release := make(chan struct{})
		var once sync.Once
		var mu sync.Mutex
		published := map[string]int{}
		pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
			mu.Lock()
			for _, rec := range b {
				published[rec.Key]++
			}
			mu.Unlock()
			once.Do(func() {
				assert.Len(t, b, 2, "one batch carries both buckets' rows")
				close(stalled)
				<-release
			})
			return make([]error, len(b))
		})
		_, stop := startRelay(t, ctx, o, pool, pub, outbox.RelayConfig{})
		<-stalled
		_, err := pool.Exec(ctx, takeOverSQL(o, "bucket = 1"))
		require.NoError(t, err)
		close(release)
		require.Eventually(t, func() bool { return pending(t, pool, o) == 1 }, 10*time.Second, 5*time.Millisecond,
			"the held bucket's row is acknowledged")
		stop()
		var key string
		require.NoError(t, pool.QueryRow(ctx, `SELECT key FROM `+c.Schema+`.`+c.Table).Scan(&key))
		assert.Equal(t, keyOf[1], key, "the taken-over bucket's row stays for its new owner")
		mu.Lock()
		defer mu.Unlock()
		assert.Equal(t, 1, published[keyOf[0]], "the held bucket's row was acknowledged by that batch, not published again")
	})
}

// TestFencedOffAckHoldsBackSuccessors: the bucket is taken over just as the
// broker acknowledges a batch, so that batch's deletion is fenced off. The
// keys' next messages must not be published: their predecessors stay in
// the table for the new owner, who will publish them again.
func TestFencedOffAckHoldsBackSuccessors(t *testing.T) {
	t.Parallel()
	pool, o := setup(t, outbox.Config{Buckets: 1})
	ctx := tctx(t, 30*time.Second)
	const keys = 10
	for round := range 2 {
		for k := range keys {
			_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: fmt.Sprint("k", k), Payload: []byte(fmt.Sprint(round))})
			require.NoError(t, err)
		}
	}
	var mu sync.Mutex
	var published []string
	first := true
	tookOver := make(chan struct{})
	pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
		mu.Lock()
		defer mu.Unlock()
		for _, rec := range b {
			published = append(published, rec.Key+"/"+string(rec.Payload))
		}
		if first {
			first = false
			_, err := pool.Exec(ctx, takeOverSQL(o, "true"))
			assert.NoError(t, err)
			close(tookOver)
		}
		return make([]error, len(b))
	})
	r, stop := startRelay(t, ctx, o, pool, pub, outbox.RelayConfig{})
	<-tookOver
	require.Eventually(t, func() bool { return len(r.Buckets()) == 0 }, 10*time.Second, 5*time.Millisecond,
		"the relay learns it lost the bucket")
	stop()
	assert.Equal(t, 2*keys, pending(t, pool, o), "nothing was deleted under the lost lease")
	mu.Lock()
	defer mu.Unlock()
	for _, p := range published {
		assert.True(t, strings.HasSuffix(p, "/0"), "a key's second message was published while its first stayed: %s", p)
	}
}

// TestFailureWaitsForTakeover: a publish fails while another relay's
// takeover of the bucket is in progress. Recording the failure waits for
// the takeover and then counts nothing: an attempt counted under the lost
// lease would delay (or dead-letter) a message its new owner publishes.
func TestFailureWaitsForTakeover(t *testing.T) {
	t.Parallel()
	pool, o := setup(t, outbox.Config{Buckets: 1})
	ctx := tctx(t, 30*time.Second)
	_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: "k"})
	require.NoError(t, err)
	c := o.Config()
	table := c.Schema + "." + c.Table

	publishing := make(chan struct{})
	fail := make(chan struct{})
	var once sync.Once
	pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
		once.Do(func() { close(publishing); <-fail })
		errs := make([]error, len(b))
		for i := range errs {
			errs[i] = fmt.Errorf("broker says no")
		}
		return errs
	})
	r, stop := startRelay(t, ctx, o, pool, pub, outbox.RelayConfig{BackoffMin: time.Minute, BackoffMax: time.Minute})
	<-publishing

	takeover, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer takeover.Rollback(ctx)
	_, err = takeover.Exec(ctx, takeOverSQL(o, "true"))
	require.NoError(t, err)
	close(fail)
	attempts := func() int {
		var n int
		require.NoError(t, pool.QueryRow(ctx, `SELECT attempts FROM `+table).Scan(&n))
		return n
	}
	waiting := func() bool {
		var n int
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
	WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%SET attempts = t.attempts + 1%'`,
			pgx.Identifier{c.Schema, c.Table}.Sanitize()).Scan(&n))
		return n > 0
	}
	require.Eventually(t, func() bool { return waiting() || attempts() > 0 }, 10*time.Second, 5*time.Millisecond)
	require.NoError(t, takeover.Commit(ctx))
	require.Eventually(t, func() bool { return len(r.Buckets()) == 0 }, 10*time.Second, 5*time.Millisecond,
		"the relay learns it lost the bucket")
	assert.Equal(t, 0, attempts(), "no attempt counted under the lost lease")
	stop()
}

// TestPipelinedBatchesKeepOrder: with far more keys than the batch size the
// relay publishes batches of many keys back to back (many keys in flight),
// and failed publishes are retried; per key, the acknowledged messages must
// still be exactly the committed ones in commit order, and no batch may
// carry a key twice or a key still in flight.
func TestPipelinedBatchesKeepOrder(t *testing.T) {
	forEachLayout(t, func(t *testing.T, partitions int) {
		pool, o := setup(t, outbox.Config{Buckets: 8, Partitions: partitions})
		ctx := tctx(t, 60*time.Second)
		_, err := pool.Exec(ctx, `CREATE TABLE counters (key text PRIMARY KEY, n int NOT NULL DEFAULT 0)`)
		require.NoError(t, err)
		const nkeys = 300
		for i := range nkeys {
			_, err := pool.Exec(ctx, `INSERT INTO counters (key) VALUES ($1)`, fmt.Sprint("k", i))
			require.NoError(t, err)
		}

		var mu sync.Mutex
		got := map[string][]int{}
		inFlight := map[string]bool{}
		published, batches := 0, 0
		pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
			mu.Lock()
			batches++
			published += len(b)
			for _, r := range b {
				if inFlight[r.Key] {
					t.Errorf("key %s published while a message of it is in flight", r.Key)
				}
				inFlight[r.Key] = true
			}
			mu.Unlock()
			time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond) // the broker's round trip
			errs := make([]error, len(b))
			mu.Lock()
			defer mu.Unlock()
			for i, r := range b {
				delete(inFlight, r.Key)
				if rand.IntN(10) == 0 {
					errs[i] = fmt.Errorf("leader not available")
					continue
				}
				var n int
				fmt.Sscan(string(r.Payload), &n)
				got[r.Key] = append(got[r.Key], n)
			}
			return errs
		})
		// Writers first, so a backlog builds up across many keys.
		var wg sync.WaitGroup
		for g := range 6 {
			wg.Go(func() {
				rng := rand.New(rand.NewPCG(uint64(g), 11))
				for range 150 {
					key := fmt.Sprint("k", rng.IntN(nkeys))
					require.NoError(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
						var n int
						if err := tx.QueryRow(ctx, `UPDATE counters SET n = n + 1 WHERE key = $1 RETURNING n`, key).Scan(&n); err != nil {
							return err
						}
						_, err := o.Enqueue(ctx, tx, outbox.Message{Topic: "t", Key: key, Payload: []byte(fmt.Sprint(n))})
						return err
					}))
				}
			})
		}
		wg.Wait()
		r, err := o.NewRelay(pool, pub, outbox.RelayConfig{BatchSize: 16, PollInterval: 10 * time.Millisecond,
			BackoffMin: time.Millisecond, BackoffMax: 5 * time.Millisecond, Logger: quiet(t)})
		require.NoError(t, err)
		runUntilDrained(t, ctx, pool, o, r, 40*time.Second)

		rows, err := pool.Query(ctx, `SELECT key, n FROM counters WHERE n > 0`)
		require.NoError(t, err)
		var key string
		var n int
		want := map[string][]int{}
		_, err = pgx.ForEachRow(rows, []any{&key, &n}, func() error {
			for i := 1; i <= n; i++ {
				want[key] = append(want[key], i)
			}
			return nil
		})
		require.NoError(t, err)
		mu.Lock()
		defer mu.Unlock()
		assert.Equal(t, want, got, "per key: every committed message once, in commit order")
		// How many batches come out full is chance: the window is the first
		// 16 rows by seq, so it depends on how the writers' keys interleave
		// and which publishes failed (a backing-off head holds its slot).
		// What the backlog must give is batches of many keys, not one.
		mean := float64(published) / float64(batches)
		t.Logf("%d records in %d batches, %.1f a batch", published, batches, mean)
		assert.GreaterOrEqual(t, mean, 8.0, "the backlog must give batches of many keys")
	})
}

// warnings counts the records at Warn and above a relay logs.
type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) Enabled(context.Context, slog.Level) bool { return true }
func (w *warnings) Handle(_ context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn {
		w.mu.Lock()
		w.msgs = append(w.msgs, r.Message)
		w.mu.Unlock()
	}
	return nil
}
func (w *warnings) WithAttrs([]slog.Attr) slog.Handler { return w }
func (w *warnings) WithGroup(string) slog.Handler      { return w }

// TestShutdownAfterRunContextEnded: the README's `go relay.Run(ctx); defer
// relay.Shutdown(ctx)` with ctx cancelled first. Shutdown must still hand
// the leases back and deregister (on a context of its own), quietly.
func TestShutdownAfterRunContextEnded(t *testing.T) {
	t.Parallel()
	pool, o := setup(t, outbox.Config{Buckets: 4})
	outer := tctx(t, 30*time.Second)
	ctx, cancel := context.WithCancel(outer)
	w := &warnings{}
	pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error { return make([]error, len(b)) })
	r, err := o.NewRelay(pool, pub, outbox.RelayConfig{ID: "svc-1", LeaseTTL: 30 * time.Second, Logger: slog.New(w)})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	require.Eventually(t, func() bool { return len(r.Buckets()) == 4 }, 10*time.Second, 5*time.Millisecond)

	cancel() // the service's context ends first
	require.ErrorIs(t, <-done, context.Canceled)
	require.NoError(t, r.Shutdown(ctx), "Run had already stopped: nothing was cut short")

	c := o.Config()
	var owned, registered int
	require.NoError(t, pool.QueryRow(outer, `SELECT count(*) FROM `+c.Schema+`.outbox_leases WHERE owner IS NOT NULL`).Scan(&owned))
	require.NoError(t, pool.QueryRow(outer, `SELECT count(*) FROM `+c.Schema+`.outbox_relays`).Scan(&registered))
	assert.Zero(t, owned, "the leases are handed back, not left to lapse after LeaseTTL (30s)")
	assert.Zero(t, registered, "the relay is deregistered")
	assert.Empty(t, r.Buckets())
	w.mu.Lock()
	assert.Empty(t, w.msgs, "a normal stop logs no warning")
	w.mu.Unlock()
	require.NoError(t, r.Shutdown(outer), "a second Shutdown does nothing more")
}

// TestReleaseAndRegisterWhileReaped: a relay stopping, or starting under
// the ID of a dead predecessor, while another relay reaps that ID. The
// reaper deletes the registration row, then frees the ID's leases, in one
// transaction; the test plays that reaper, holding the row while the
// relay's own statements run. A relay that took the leases first would
// wait for the row while the reaper waits for the leases: a deadlock,
// which aborts the release or the registration (a warning, leases left to
// lapse) or the reaper's maintenance.
func TestReleaseAndRegisterWhileReaped(t *testing.T) {
	t.Parallel()
	// reapDuring holds the registration row of id as a reaper does, then,
	// once a statement of the relay waits for it, frees id's leases and
	// commits.
	reapDuring := func(t *testing.T, ctx context.Context, o *outbox.Outbox, id string) (finish func()) {
		schema := o.Config().Schema
		// Connections of their own: the relay's pool may be all in use
		// by statements waiting for this transaction.
		reaper, observer := dimmertest.Conn(t), dimmertest.Conn(t)
		tx, err := reaper.Begin(ctx)
		require.NoError(t, err)
		_, err = tx.Exec(ctx, `DELETE FROM `+schema+`.outbox_relays WHERE id = $1`, id)
		require.NoError(t, err)
		return func() {
			require.Eventually(t, func() bool { return dimmertest.LockWaiting(t, observer, schema, "outbox_relays") },
				10*time.Second, 5*time.Millisecond, "the relay's statement waits for the registration row")
			_, err := tx.Exec(ctx, `UPDATE `+schema+`.outbox_leases SET owner = NULL, expires_at = '-infinity' WHERE owner = $1`, id)
			require.NoError(t, err, "the relay holds none of its leases while it waits for the row")
			require.NoError(t, tx.Commit(ctx))
		}
	}
	noop := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error { return make([]error, len(b)) })
	count := func(t *testing.T, ctx context.Context, pool *pgxpool.Pool, sql string) (n int) {
		require.NoError(t, pool.QueryRow(ctx, sql).Scan(&n))
		return n
	}

	t.Run("shutdown", func(t *testing.T) {
		t.Parallel()
		pool, o := setup(t, outbox.Config{Buckets: 4})
		ctx := tctx(t, 30*time.Second)
		w := &warnings{}
		r, err := o.NewRelay(pool, noop, outbox.RelayConfig{ID: "svc-1", LeaseTTL: 30 * time.Second, Logger: slog.New(w)})
		require.NoError(t, err)
		go func() { _ = r.Run(ctx) }()
		require.Eventually(t, func() bool { return len(r.Buckets()) == 4 }, 10*time.Second, 5*time.Millisecond)

		finish := reapDuring(t, ctx, o, "svc-1")
		stopped := make(chan error, 1)
		go func() { stopped <- r.Shutdown(ctx) }()
		finish()
		require.NoError(t, <-stopped)
		s := o.Config().Schema
		assert.Zero(t, count(t, ctx, pool, `SELECT count(*) FROM `+s+`.outbox_leases WHERE owner IS NOT NULL`))
		assert.Zero(t, count(t, ctx, pool, `SELECT count(*) FROM `+s+`.outbox_relays`))
		w.mu.Lock()
		assert.Empty(t, w.msgs, "the release went through")
		w.mu.Unlock()
	})

	t.Run("register", func(t *testing.T) {
		t.Parallel()
		pool, o := setup(t, outbox.Config{Buckets: 4})
		ctx := tctx(t, 30*time.Second)
		s := o.Config().Schema
		// A predecessor that died holding two buckets: its pid holds no
		// registration lock.
		_, err := pool.Exec(ctx, `INSERT INTO `+s+`.outbox_relays (id, seen_at, pid) VALUES ('svc-1', now(), 0)`)
		require.NoError(t, err)
		_, err = pool.Exec(ctx, `UPDATE `+s+`.outbox_leases SET owner = 'svc-1', epoch = epoch + 1,
	expires_at = now() + interval '30 seconds' WHERE bucket < 2`)
		require.NoError(t, err)

		finish := reapDuring(t, ctx, o, "svc-1")
		w := &warnings{}
		r, err := o.NewRelay(pool, noop, outbox.RelayConfig{ID: "svc-1", LeaseTTL: 30 * time.Second, Logger: slog.New(w)})
		require.NoError(t, err)
		done := make(chan struct{})
		go func() { defer close(done); _ = r.Run(ctx) }()
		finish()
		require.Eventually(t, func() bool { return len(r.Buckets()) == 4 }, 10*time.Second, 5*time.Millisecond)
		require.NoError(t, r.Shutdown(ctx))
		<-done
		w.mu.Lock()
		assert.Empty(t, w.msgs, "the registration went through at once")
		w.mu.Unlock()
	})
}

// TestHandOffsAreImmediate: with a LeaseTTL of 30s (a lease tick every
// 10s), relays joining, a relay killed (its session ends without any
// release) and restarted under the same ID, and a graceful leave must each
// re-spread the buckets within a second or two, because a hand-off is
// announced to the taker and a dead relay is recognised by its session, not
// by its lease running out. Meanwhile a steady writer's messages must keep
// flowing: none waits anywhere near a lease tick.
func TestHandOffsAreImmediate(t *testing.T) {
	forEachLayout(t, func(t *testing.T, partitions int) {
		pool, o := setup(t, outbox.Config{Buckets: 16, Partitions: partitions})
		ctx := tctx(t, 90*time.Second)
		const ttl = 30 * time.Second

		var mu sync.Mutex
		committed := map[string]time.Time{}
		var worst time.Duration
		pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
			now := time.Now()
			mu.Lock()
			for _, r := range b {
				if t0, ok := committed[r.ID.String()]; ok {
					worst = max(worst, now.Sub(t0))
				}
			}
			mu.Unlock()
			return make([]error, len(b))
		})
		type running struct {
			r      *outbox.Relay
			cancel context.CancelFunc
			pool   *pgxpool.Pool
			done   chan struct{}
		}
		start := func(id string) *running {
			rp := relayPool(t)
			// Connections open, as a service's pool has them: what is timed
			// is the hand-off, not connection set-up on a loaded machine.
			var cs []*pgxpool.Conn
			for range rp.Config().MaxConns {
				c, err := rp.Acquire(ctx)
				require.NoError(t, err)
				cs = append(cs, c)
			}
			for _, c := range cs {
				c.Release()
			}
			r, err := o.NewRelay(rp, pub, outbox.RelayConfig{ID: id, LeaseTTL: ttl, Logger: quiet(t)})
			require.NoError(t, err)
			rctx, cancel := context.WithCancel(ctx)
			x := &running{r: r, cancel: cancel, pool: rp, done: make(chan struct{})}
			go func() { defer close(x.done); _ = r.Run(rctx) }()
			return x
		}
		split := func(what string, rs ...*running) {
			t.Helper()
			began := time.Now()
			require.Eventually(t, func() bool {
				seen := map[int]bool{}
				for _, x := range rs {
					bs := x.r.Buckets()
					if len(bs) < 16/len(rs) || len(bs) > (16+len(rs)-1)/len(rs) {
						return false
					}
					for _, b := range bs {
						seen[b] = true
					}
					// On 4 partitions, 1, 2 or 4 relays hold whole
					// partitions each: a range of 16/relays buckets.
					if partitions > 1 && 4%len(rs) == 0 && (bs[0]%len(bs) != 0 || bs[len(bs)-1] != bs[0]+len(bs)-1) {
						return false
					}
				}
				return len(seen) == 16
			}, 2*time.Second, 5*time.Millisecond, "%s: the buckets are shared fairly at once, not at a lease tick (%v), on whole partitions", what, ttl/3)
			t.Logf("%s: shared fairly after %v", what, time.Since(began))
		}

		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
				}
				var id string
				err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
					u, err := o.Enqueue(ctx, tx, outbox.Message{Topic: "t", Key: fmt.Sprint("k", i%97)})
					id = u.String()
					return err
				})
				if err != nil {
					t.Errorf("writer: %v", err)
					return
				}
				mu.Lock()
				committed[id] = time.Now()
				mu.Unlock()
			}
		})

		a := start("a")
		split("one relay", a)
		b, c, d := start("b"), start("c"), start("d")
		split("three joined", a, b, c, d)

		// Killed: no Shutdown, its connections die with it.
		c.cancel()
		<-c.done
		c.pool.Close()
		split("one killed", a, b, d)
		c = start("c") // restarted under the same ID
		split("restarted", a, b, c, d)
		require.NoError(t, d.r.Shutdown(ctx))
		<-d.done
		split("one left", a, b, c)

		close(stop)
		wg.Wait()
		waitDrained(t, pool, o, 10*time.Second)
		for _, x := range []*running{a, b, c} {
			require.NoError(t, x.r.Shutdown(ctx))
			<-x.done
		}
		mu.Lock()
		defer mu.Unlock()
		t.Logf("%d messages, worst commit-to-publish %v", len(committed), worst)
		assert.Less(t, worst, 2*time.Second, "no message waits for a lease to lapse or a lease tick")
		// Five changes of membership move a bucket a few times, not back
		// and forth between relays that each hold the other's.
		var moves int
		require.NoError(t, pool.QueryRow(ctx, `SELECT max(epoch) FROM `+o.Config().Schema+`.outbox_leases`).Scan(&moves))
		t.Logf("the most-moved bucket changed hands %d times", moves)
		assert.LessOrEqual(t, moves, 15)
	})
}

// TestRegistrationSessionKilled: the server ends one relay's registration
// session (pg_terminate_backend) while its process lives on. The other
// relay takes all its buckets over at once (LeaseTTL is 30s); the cut-off
// relay stops publishing for them, registers again and gets its share back;
// every message is still delivered once per key in order.
func TestRegistrationSessionKilled(t *testing.T) {
	forEachLayout(t, func(t *testing.T, partitions int) {
		pool, o := setup(t, outbox.Config{Buckets: 8, Partitions: partitions})
		ctx := tctx(t, 60*time.Second)
		var mu sync.Mutex
		got := map[string][]int{}
		pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
			mu.Lock()
			defer mu.Unlock()
			for _, r := range b {
				var n int
				fmt.Sscan(string(r.Payload), &n)
				got[r.Key] = append(got[r.Key], n)
			}
			return make([]error, len(b))
		})
		var rs []*outbox.Relay
		var wg sync.WaitGroup
		for _, id := range []string{"a", "b"} {
			r, err := o.NewRelay(relayPool(t), pub, outbox.RelayConfig{ID: id, LeaseTTL: 30 * time.Second, Logger: quiet(t)})
			require.NoError(t, err)
			rs = append(rs, r)
			wg.Go(func() { _ = r.Run(ctx) })
		}
		require.Eventually(t, func() bool { return len(rs[0].Buckets()) == 4 && len(rs[1].Buckets()) == 4 }, 10*time.Second, 5*time.Millisecond)

		send := func(from, to int) {
			for i := from; i < to; i++ {
				_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: fmt.Sprint("k", i%10), Payload: []byte(fmt.Sprint(i / 10))})
				require.NoError(t, err)
			}
		}
		send(0, 100)
		var pid int
		require.NoError(t, pool.QueryRow(ctx, `SELECT pid FROM `+o.Config().Schema+`.outbox_relays WHERE id = 'a'`).Scan(&pid))
		var killed bool
		require.NoError(t, pool.QueryRow(ctx, `SELECT pg_terminate_backend($1)`, pid).Scan(&killed))
		require.True(t, killed)
		began := time.Now()
		require.Eventually(t, func() bool { return len(rs[1].Buckets()) == 8 || len(rs[0].Buckets()) == 0 }, 2*time.Second, 5*time.Millisecond,
			"the cut-off relay stops claiming its buckets, or the other takes them over, at once")
		require.Eventually(t, func() bool { return len(rs[0].Buckets()) == 4 && len(rs[1].Buckets()) == 4 }, 5*time.Second, 5*time.Millisecond,
			"the cut-off relay registers again and gets its share back")
		var newPid int
		require.NoError(t, pool.QueryRow(ctx, `SELECT pid FROM `+o.Config().Schema+`.outbox_relays WHERE id = 'a'`).Scan(&newPid))
		assert.NotEqual(t, pid, newPid, "registered on a new session")
		t.Logf("shared again %v after the session was killed", time.Since(began))
		send(100, 200)
		waitDrained(t, pool, o, 10*time.Second)
		for _, r := range rs {
			require.NoError(t, r.Shutdown(ctx))
		}
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		for k := range 10 {
			var firsts []int
			seen := map[int]bool{}
			for _, n := range got[fmt.Sprint("k", k)] {
				if !seen[n] {
					seen[n] = true
					firsts = append(firsts, n)
				}
			}
			want := make([]int, 20)
			for i := range want {
				want[i] = i
			}
			assert.Equal(t, want, firsts, "key k%d: every message, first deliveries in order", k)
		}
	})
}

// TestRelayHandsOverRecordsAsEnqueued: the publisher gets every field of a
// message as it was enqueued (keyed or not, with or without headers, an
// empty payload as an empty value, not a Kafka tombstone), with its
// sequence, creation time and the attempts made before.
func TestRelayHandsOverRecordsAsEnqueued(t *testing.T) {
	ctx := tctx(t, time.Minute)
	pool, o := setup(t, outbox.Config{})
	before := time.Now()
	binaryPayload := make([]byte, 256)
	for i := range binaryPayload {
		binaryPayload[i] = byte(i)
	}
	msgs := []outbox.Message{
		{Topic: "a", Key: "k1", Payload: []byte("p1"), Headers: map[string]string{"x": "1", "y": "ü"}},
		{Topic: "b", Payload: []byte{}},
		{Topic: "a", Key: "k2", Payload: binaryPayload},
	}
	for i := range msgs {
		id, err := o.EnqueuePool(ctx, pool, msgs[i])
		require.NoError(t, err)
		msgs[i].ID = id
	}
	after := time.Now()

	var mu sync.Mutex
	var got []outbox.Record
	failedOnce := false
	pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
		mu.Lock()
		defer mu.Unlock()
		res := make([]error, len(b))
		for i, r := range b {
			r.Payload = slices.Clone(r.Payload) // the relay may reuse it
			got = append(got, r)
			if r.ID == msgs[2].ID && !failedOnce {
				failedOnce = true
				res[i] = fmt.Errorf("refused once")
			}
		}
		return res
	})
	r, err := o.NewRelay(pool, pub, outbox.RelayConfig{BackoffMin: time.Millisecond, BackoffMax: 2 * time.Millisecond, PollInterval: 10 * time.Millisecond, Logger: quiet(t)})
	require.NoError(t, err)
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(rctx) }()
	waitDrained(t, pool, o, 30*time.Second)
	require.NoError(t, r.Shutdown(ctx))
	cancel()
	<-done

	mu.Lock()
	defer mu.Unlock()
	require.Len(t, got, 4, "three messages, one of them twice")
	attempts := map[string][]int{}
	var seqs []int64
	for _, rec := range got {
		i := slices.IndexFunc(msgs, func(m outbox.Message) bool { return m.ID == rec.ID })
		require.GreaterOrEqual(t, i, 0, "unknown record %v", rec.ID)
		assert.Equal(t, msgs[i], rec.Message)
		assert.NotNil(t, rec.Payload)
		assert.WithinRange(t, rec.CreatedAt, before.Add(-time.Second), after.Add(time.Second))
		attempts[rec.ID.String()] = append(attempts[rec.ID.String()], rec.Attempts)
		if len(attempts[rec.ID.String()]) == 1 {
			seqs = append(seqs, rec.Seq)
		}
	}
	assert.Equal(t, []int{0, 1}, attempts[msgs[2].ID.String()])
	assert.Equal(t, []int{0}, attempts[msgs[0].ID.String()])
	assert.True(t, slices.IsSorted(seqs) && seqs[0] > 0, "seqs %v", seqs)
}

// TestAckCommitSettingStaysLocal: the acknowledgement commits without
// waiting for the WAL flush, and that setting must not outlive its
// transaction on a pooled connection the service shares.
func TestAckCommitSettingStaysLocal(t *testing.T) {
	ctx := tctx(t, time.Minute)
	pool, o := setup(t, outbox.Config{})
	for i := range 50 {
		_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: fmt.Sprint("k", i)})
		require.NoError(t, err)
	}
	rp := relayPool(t)
	var n atomic.Int64
	r, err := o.NewRelay(rp, outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
		n.Add(int64(len(b)))
		return make([]error, len(b))
	}), outbox.RelayConfig{PollInterval: 10 * time.Millisecond, Logger: quiet(t)})
	require.NoError(t, err)
	runUntilDrained(t, ctx, pool, o, r, 30*time.Second)
	require.EqualValues(t, 50, n.Load())

	// Every connection the relay's pool holds, acquired at once.
	var conns []*pgxpool.Conn
	for range rp.Stat().IdleConns() {
		c, err := rp.Acquire(ctx)
		require.NoError(t, err)
		conns = append(conns, c)
	}
	require.NotEmpty(t, conns)
	for _, c := range conns {
		var setting string
		require.NoError(t, c.QueryRow(ctx, `SHOW synchronous_commit`).Scan(&setting))
		assert.Equal(t, "on", setting)
		c.Release()
	}
}

// TestAckLeavesLateCommitInBatchGap: a message whose transaction commits
// while the batch around it (by seq) is being published was not in that
// batch, so its seq is a gap in the batch's seqs; the acknowledgement must
// not delete it, and it is published next. Deleting the batch's seq range
// instead of its rows would lose it.
func TestAckLeavesLateCommitInBatchGap(t *testing.T) {
	ctx := tctx(t, time.Minute)
	pool, o := setup(t, outbox.Config{})
	_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: "before"})
	require.NoError(t, err)
	late, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer late.Rollback(ctx)
	_, err = o.Enqueue(ctx, late, outbox.Message{Topic: "t", Key: "late"})
	require.NoError(t, err)
	for _, k := range []string{"after1", "after2"} {
		_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: k})
		require.NoError(t, err)
	}

	var mu sync.Mutex
	var batches [][]string
	var commitOnce sync.Once
	pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
		var keys []string
		for _, r := range b {
			keys = append(keys, r.Key)
		}
		mu.Lock()
		batches = append(batches, keys)
		mu.Unlock()
		// The late transaction commits between the fetch and the ack.
		commitOnce.Do(func() { assert.NoError(t, late.Commit(ctx)) }) // not require: this is the relay's goroutine
		return make([]error, len(b))
	})
	r, err := o.NewRelay(relayPool(t), pub, outbox.RelayConfig{PollInterval: 10 * time.Millisecond, Logger: quiet(t)})
	require.NoError(t, err)
	runUntilDrained(t, ctx, pool, o, r, 30*time.Second)

	mu.Lock()
	defer mu.Unlock()
	require.GreaterOrEqual(t, len(batches), 2, "batches %v", batches)
	assert.Equal(t, []string{"before", "after1", "after2"}, batches[0])
	assert.Equal(t, []string{"late"}, slices.Concat(batches[1:]...))
}
