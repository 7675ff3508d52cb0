package chaos_test

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/chaos"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

// ledger is an outbox fed by writers that number each key's messages in
// commit order: the same transaction bumps the key's counter (its row lock
// orders same-key writers) and enqueues the counter's value as the payload.
// Per key the stream must then carry 1, 2, 3... as first deliveries.
type ledger struct {
	pool  *pgxpool.Pool
	o     *outbox.Outbox
	topic string
	keys  []string
}

func newLedger(t *testing.T, ctx context.Context, buckets, nkeys int) *ledger {
	pool, schema := dimmertest.Schema(t)
	o, err := outbox.New(outbox.Config{Schema: schema, Buckets: buckets})
	require.NoError(t, err)
	require.NoError(t, o.Install(ctx, pool))
	_, err = pool.Exec(ctx, `CREATE TABLE counters (key text PRIMARY KEY, n int NOT NULL DEFAULT 0)`)
	require.NoError(t, err)
	l := &ledger{pool: pool, o: o, topic: "ledger"}
	for i := range nkeys {
		l.keys = append(l.keys, fmt.Sprintf("acct-%02d", i))
	}
	_, err = pool.Exec(ctx, `INSERT INTO counters (key) SELECT unnest($1::text[])`, l.keys)
	require.NoError(t, err)
	return l
}

// write commits one message for key and returns its number.
func (l *ledger) write(ctx context.Context, key string) (int, error) {
	var n int
	err := pgx.BeginFunc(ctx, l.pool, func(tx pgx.Tx) error {
		if err := tx.QueryRow(ctx, `UPDATE counters SET n = n + 1 WHERE key = $1 RETURNING n`, key).Scan(&n); err != nil {
			return err
		}
		_, err := l.o.Enqueue(ctx, tx, outbox.Message{Topic: l.topic, Key: key, Payload: []byte(strconv.Itoa(n))})
		return err
	})
	return n, err
}

// writers commit messages on random keys until stop is closed.
func (l *ledger) writers(ctx context.Context, t *testing.T, n int, stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	for g := range n {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 3))
			for {
				select {
				case <-stop:
					return
				case <-time.After(time.Duration(1+rng.IntN(4)) * time.Millisecond):
				}
				if _, err := l.write(ctx, l.keys[rng.IntN(len(l.keys))]); err != nil {
					t.Errorf("writer: %v", err)
					return
				}
			}
		})
	}
	return &wg
}

func (l *ledger) pending(t *testing.T, ctx context.Context) outbox.Stats {
	st, err := l.o.Stats(ctx, l.pool, "")
	require.NoError(t, err)
	return st
}

// left counts the messages among ids still in the outbox.
func (l *ledger) left(t *testing.T, ctx context.Context, ids []string) int {
	var n int
	require.NoError(t, l.pool.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{l.o.Config().Schema, l.o.Config().Table}.Sanitize()+
		` WHERE id = ANY($1::uuid[])`, ids).Scan(&n))
	return n
}

// committed is, per key, how many messages were committed.
func (l *ledger) committed(t *testing.T, ctx context.Context) map[string]int {
	rows, err := l.pool.Query(ctx, `SELECT key, n FROM counters`)
	require.NoError(t, err)
	out := map[string]int{}
	var k string
	var n int
	_, err = pgx.ForEachRow(rows, []any{&k, &n}, func() error { out[k] = n; return nil })
	require.NoError(t, err)
	return out
}

// delivery is what a consumer saw of one key's stream.
type delivery struct {
	first []int          // first deliveries, in stream order
	dups  map[string]int // repeated message IDs and how often
}

// checkStream reads the topic from the start to its end offsets and
// asserts, per key, that the first deliveries are exactly 1..committed in
// order (nothing lost, commit order kept) and that every repeat is of a
// message delivered before (at least once, never reordered). It returns
// the repeated message IDs.
func checkStream(t *testing.T, ctx context.Context, seeds []string, topic string, committed map[string]int) (dups map[string]int, records int) {
	t.Helper()
	admin, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	require.NoError(t, err)
	defer admin.Close()
	ends, err := kadm.NewClient(admin).ListEndOffsets(ctx, topic)
	require.NoError(t, err)
	var total int64
	ends.Each(func(o kadm.ListedOffset) { total += o.Offset })
	cons, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer cons.Close()
	got := map[string]*delivery{}
	for int64(records) < total {
		fs := cons.PollFetches(ctx)
		require.NoError(t, ctx.Err(), "consumed %d of %d records", records, total)
		fs.EachError(func(_ string, _ int32, err error) { require.NoError(t, err) })
		fs.EachRecord(func(r *kgo.Record) {
			records++
			d := got[string(r.Key)]
			if d == nil {
				d = &delivery{dups: map[string]int{}}
				got[string(r.Key)] = d
			}
			n, err := strconv.Atoi(string(r.Value))
			require.NoError(t, err)
			var id string
			for _, h := range r.Headers {
				if h.Key == outbox.HeaderMessageID {
					id = string(h.Value)
				}
			}
			switch {
			case n == len(d.first)+1:
				d.first = append(d.first, n)
			case n <= len(d.first):
				d.dups[id]++ // a repeat of a message already delivered
			default:
				t.Errorf("key %s: message %d delivered before message %d (commit order broken or a message lost)", r.Key, n, len(d.first)+1)
			}
		})
	}
	dups = map[string]int{}
	for key, want := range committed {
		d := got[key]
		if d == nil {
			d = &delivery{}
		}
		assert.Len(t, d.first, want, "key %s: every committed message delivered", key)
		for id, c := range d.dups {
			dups[id] += c
		}
	}
	return dups, records
}

// fencedCounter counts the relays' "ack fenced off" warnings: the one
// event besides a killed relay after which at-least-once allows a repeat.
type fencedCounter struct {
	slog.Handler
	n *atomic.Int64
}

func (f fencedCounter) Handle(ctx context.Context, r slog.Record) error {
	if strings.Contains(r.Message, "fenced off") {
		f.n.Add(1)
	}
	return f.Handler.Handle(ctx, r)
}

func (f fencedCounter) WithAttrs(as []slog.Attr) slog.Handler {
	return fencedCounter{f.Handler.WithAttrs(as), f.n}
}

func (f fencedCounter) WithGroup(name string) slog.Handler {
	return fencedCounter{f.Handler.WithGroup(name), f.n}
}

type tlog struct{ t *testing.T }

func (w tlog) Write(p []byte) (int, error) { w.t.Log(strings.TrimSpace(string(p))); return len(p), nil }

func relayLogger(t *testing.T, fenced *atomic.Int64) *slog.Logger {
	return slog.New(fencedCounter{slog.NewTextHandler(tlog{t}, &slog.HandlerOptions{Level: slog.LevelWarn}), fenced})
}

func kafkaPublisher(t *testing.T, opts ...kgo.Opt) *kafkasink.Publisher {
	cl, err := kgo.NewClient(opts...)
	require.NoError(t, err)
	t.Cleanup(cl.Close)
	p, err := kafkasink.New(cl)
	require.NoError(t, err)
	return p
}

// TestRelayKilledMidBatch: two relays publish a ledger to Kafka while
// writers commit. Relay A reaches Postgres through a chaos link and is hit
// twice right after the broker acknowledged a batch and before A could
// delete its rows: first its link is blackholed (A hangs in the
// acknowledgement, a zombie, until the link heals and it comes back to
// find its leases taken), then its Run is cancelled and its connections
// reset (a crash, never shut down). Relay B takes A's buckets over each
// time. The consumed stream must hold every committed message, per key in
// commit order, and repeat only messages of the killed batches (or of a
// publish attempt that failed, which may have landed all the same).
func TestRelayKilledMidBatch(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Second)
	defer cancel()
	const buckets = 8
	led := newLedger(t, ctx, buckets, 40)
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(4, led.topic))
	require.NoError(t, err)
	defer cluster.Close()
	seeds := cluster.ListenAddrs()

	up, err := chaos.UpstreamOf(dimmertest.PostgresURL())
	require.NoError(t, err)
	link := newLink(t, up)
	u, err := chaos.ThroughLink(dimmertest.PostgresURL(), link)
	require.NoError(t, err)
	cfgA, err := pgxpool.ParseConfig(u)
	require.NoError(t, err)
	cfgA.ConnConfig.ConnectTimeout = time.Second
	cfgA.MaxConns = 4
	poolA, err := pgxpool.NewWithConfig(ctx, cfgA)
	require.NoError(t, err)

	// The kill: armed from the test, fired inside A's Publish once the
	// broker acknowledged the batch, so A's rows are still in the outbox.
	var mu sync.Mutex
	killed := map[string]bool{} // message IDs of the killed batches the broker acknowledged
	arm := make(chan func(), 1)
	fired := make(chan struct{}, 1)
	var publishedByA atomic.Int64
	attempts := &publishLog{byID: map[string][]string{}}
	kafkaA := attempts.wrap("A", kafkaPublisher(t, kafkasink.ClientOptions(seeds...)...))
	pubA := outbox.PublisherFunc(func(c context.Context, b []outbox.Record) []error {
		res := kafkaA.Publish(c, b)
		acked := 0
		for _, err := range res {
			if err == nil {
				acked++
			}
		}
		publishedByA.Add(int64(acked))
		if acked == 0 {
			return res
		}
		select {
		case kill := <-arm:
			mu.Lock()
			for i, r := range b {
				if res[i] == nil {
					killed[r.ID.String()] = true
				}
			}
			mu.Unlock()
			kill()
			fired <- struct{}{}
		default:
		}
		return res
	})
	ids := func() []string {
		mu.Lock()
		defer mu.Unlock()
		out := make([]string, 0, len(killed))
		for id := range killed {
			out = append(out, id)
		}
		return out
	}
	var fenced atomic.Int64
	rcfg := func(id string) outbox.RelayConfig {
		return outbox.RelayConfig{ID: id, LeaseTTL: 3 * time.Second, PollInterval: 50 * time.Millisecond,
			BatchSize: 16, Logger: relayLogger(t, &fenced)}
	}
	relayA, err := led.o.NewRelay(poolA, pubA, rcfg("relay-a"))
	require.NoError(t, err)
	relayB, err := led.o.NewRelay(led.pool, attempts.wrap("B", kafkaPublisher(t, kafkasink.ClientOptions(seeds...)...)), rcfg("relay-b"))
	require.NoError(t, err)
	ctxA, cancelA := context.WithCancel(ctx)
	defer cancelA()
	doneA, doneB := make(chan error, 1), make(chan error, 1)
	go func() { doneA <- relayA.Run(ctxA) }()
	go func() { doneB <- relayB.Run(ctx) }()

	stop := make(chan struct{})
	writers := led.writers(ctx, t, 4, stop)
	stopWriters := sync.OnceFunc(func() { close(stop); writers.Wait() })
	defer stopWriters()

	require.Eventually(t, func() bool {
		return len(relayA.Buckets()) == buckets/2 && len(relayB.Buckets()) == buckets/2 && publishedByA.Load() > 50
	}, 20*time.Second, 20*time.Millisecond, "the relays split the buckets and A publishes")

	// Kill 1: A's Postgres link is blackholed mid-batch.
	arm <- func() { assert.NoError(t, link.Blackhole(true)) }
	select {
	case <-fired:
	case <-time.After(20 * time.Second):
		t.Fatal("relay A published no batch to kill")
	}
	t.Logf("kill 1: A blackholed after the broker acknowledged %d messages", len(killed))
	require.Eventually(t, func() bool { return len(relayB.Buckets()) == buckets }, 20*time.Second, 20*time.Millisecond,
		"B takes over A's buckets once their leases expire")
	require.Len(t, relayA.Buckets(), buckets/2, "A is hung in its acknowledgement, unaware")
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		require.Eventually(t, cond, 20*time.Second, 20*time.Millisecond, what)
	}
	waitFor("B republishes the killed batch", func() bool { return led.left(t, ctx, ids()) == 0 })

	// A comes back: its acknowledgement died with the blackholed
	// connection, the takeover fenced it off, and it rejoins by taking a
	// fair share of buckets from B.
	require.NoError(t, link.Heal())
	before := publishedByA.Load()
	waitFor("A rejoins and publishes again", func() bool {
		return len(relayA.Buckets()) == buckets/2 && len(relayB.Buckets()) == buckets/2 && publishedByA.Load() > before+20
	})

	// Kill 2: A crashes mid-batch, never shut down.
	arm <- func() {
		cancelA()
		assert.NoError(t, link.Reset())
	}
	select {
	case <-fired:
	case <-time.After(20 * time.Second):
		t.Fatal("relay A published no batch to kill")
	}
	select {
	case err := <-doneA:
		require.ErrorIs(t, err, context.Canceled)
	case <-time.After(20 * time.Second):
		t.Fatal("relay A did not stop after its context was cancelled")
	}
	poolA.Close()
	mu.Lock()
	t.Logf("kill 2: A crashed; %d killed messages in all", len(killed))
	mu.Unlock()
	waitFor("B takes over the crashed relay's buckets", func() bool { return len(relayB.Buckets()) == buckets })

	time.Sleep(300 * time.Millisecond) // a little more traffic through B alone
	stopWriters()
	waitFor("B delivers everything", func() bool { return led.pending(t, ctx).Pending == 0 })
	require.NoError(t, relayB.Shutdown(ctx))
	require.NoError(t, <-doneB)

	committed := led.committed(t, ctx)
	total := 0
	for _, n := range committed {
		total += n
	}
	dups, records := checkStream(t, ctx, seeds, led.topic, committed)
	mu.Lock()
	defer mu.Unlock()
	repeats, outside, unexplained := 0, 0, 0
	var why []string
	for id, c := range dups {
		repeats += c
		if killed[id] {
			continue
		}
		outside += c
		if !attempts.failedOnce(id) {
			unexplained += c
			why = append(why, id+": "+strings.Join(attempts.of(id), "; "))
		}
	}
	t.Logf("%d messages committed, %d records consumed, %d repeats (%d outside the killed batches, %d of messages with a failed publish attempt), %d killed messages, %d fenced-off acks",
		total, records, repeats, outside, outside-unexplained, len(killed), fenced.Load())
	assert.Equal(t, total+repeats, records)
	assert.NotEmpty(t, killed)
	assert.Positive(t, repeats, "B republishes what the killed batches left unacknowledged")
	if fenced.Load() == 0 {
		// Besides a killed batch, a message may repeat only if one of its
		// publish attempts failed: a record the publisher reports as not
		// acknowledged (the attempt's deadline passed while the broker
		// was still writing it, kafkasink.ErrNotAcknowledged) may have
		// landed all the same, and the relay's retry then repeats it, as
		// at-least-once allows. A message acknowledged at every attempt
		// repeats only if a relay published it while another held its
		// bucket, which the fence must refuse and log.
		assert.Zero(t, unexplained, "with no fenced-off acknowledgement, only the killed batches and failed publish attempts may repeat:\n%s",
			strings.Join(why, "\n"))
	}
	assert.LessOrEqual(t, repeats-outside, len(killed), "each killed message is repeated at most once")
}

// publishLog records every publish attempt of each message (which relay,
// which outcome), to tell the repeats at-least-once allows from those it
// does not, and to show where an unexplained repeat came from.
type publishLog struct {
	mu     sync.Mutex
	byID   map[string][]string
	failed map[string]bool
}

func (l *publishLog) wrap(relay string, p outbox.Publisher) outbox.PublisherFunc {
	return func(ctx context.Context, b []outbox.Record) []error {
		start := time.Now()
		res := p.Publish(ctx, b)
		l.mu.Lock()
		defer l.mu.Unlock()
		for i, r := range b {
			id := r.ID.String()
			outcome := "acknowledged"
			if i >= len(res) || res[i] != nil {
				if l.failed == nil {
					l.failed = map[string]bool{}
				}
				l.failed[id] = true
				outcome = "failed"
				if i < len(res) {
					outcome += ": " + res[i].Error()
				}
			}
			l.byID[id] = append(l.byID[id], fmt.Sprintf("relay %s seq %d at %s in a batch of %d, %s",
				relay, r.Seq, start.Format("15:04:05.000000"), len(b), outcome))
		}
		return res
	}
}

func (l *publishLog) failedOnce(id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.failed[id]
}

func (l *publishLog) of(id string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.byID[id])
}
