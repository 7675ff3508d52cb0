package outbox_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/internal/benchgoal"
	"github.com/dimmer-dev/dimmer/outbox"
)

// BenchmarkEnqueueCost: a transaction with a business insert + Enqueue
// against the same transaction with a hand-written INSERT into an
// outbox-shaped table. The two alternate transaction by transaction (which
// goes first alternates too), so both see the same load on this shared
// machine, and each is summarised by its interquartile mean: a commit's
// fsync stalls now and then for reasons unrelated to either variant, and
// those stalls would otherwise decide the ratio.
func BenchmarkEnqueueCost(b *testing.B) {
	pool, o := setup(b, outbox.Config{})
	ctx := tctx(b, 10*time.Minute)
	_, err := pool.Exec(ctx, `CREATE TABLE biz (id bigserial PRIMARY KEY, v text);
CREATE TABLE plain_outbox (seq bigserial PRIMARY KEY, id uuid, key text, topic text, payload bytea, headers jsonb, created_at timestamptz DEFAULT now())`)
	require.NoError(b, err)
	payload := make([]byte, 256)
	const n = 2000
	var times [2][]time.Duration
	run := func(variant, i int) {
		key := fmt.Sprint("user-", i%5000)
		start := time.Now()
		require.NoError(b, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `INSERT INTO biz (v) VALUES ($1)`, key); err != nil {
				return err
			}
			if variant == 0 {
				_, err := o.Enqueue(ctx, tx, outbox.Message{Topic: "users", Key: key, Payload: payload})
				return err
			}
			_, err := tx.Exec(ctx, `INSERT INTO plain_outbox (id, key, topic, payload, headers) VALUES ($1, $2, $3, $4, $5)`,
				uuid.Must(uuid.NewV7()), key, "users", payload, nil)
			return err
		}))
		times[variant] = append(times[variant], time.Since(start))
	}
	for i := range n {
		first := i % 2
		run(first, i)
		run(1-first, i)
	}
	iqm := func(ds []time.Duration) float64 {
		ds = slices.Clone(ds)
		slices.Sort(ds)
		var sum time.Duration
		mid := ds[len(ds)/4 : len(ds)*3/4]
		for _, d := range mid {
			sum += d
		}
		return float64(sum) / float64(len(mid))
	}
	withOutbox, plain := iqm(times[0]), iqm(times[1])
	b.Logf("interquartile mean per transaction: with Enqueue %v, with a plain INSERT %v",
		time.Duration(withOutbox), time.Duration(plain))
	benchgoal.Report(b, "outbox_enqueue_cost_ratio", withOutbox/plain, "x", benchgoal.AtMost, 1.1)
}

const (
	drainMessages = 100_000
	drainKeys     = 20_000
)

// fill writes drainMessages rows straight into the outbox table (COPY), with
// the buckets Enqueue would compute.
func fill(b *testing.B, ctx context.Context, o *outbox.Outbox, pool interface {
	CopyFrom(context.Context, pgx.Identifier, []string, pgx.CopyFromSource) (int64, error)
}, topic string, payload []byte) {
	c := o.Config()
	rows := make([][]any, drainMessages)
	for i := range rows {
		key := fmt.Sprint("k", i%drainKeys)
		rows[i] = []any{uuid.Must(uuid.NewV7()), int32(o.Bucket(key)), key, key, topic, payload}
	}
	_, err := pool.CopyFrom(ctx, pgx.Identifier{c.Schema, c.Table}, []string{"id", "bucket", "lane", "key", "topic", "payload"}, pgx.CopyFromRows(rows))
	require.NoError(b, err)
}

// BenchmarkRelayThroughput drains a fixed backlog to Kafka (kfake) with 1
// and with 4 relays, and a hand-written relay loop (select 500, produce,
// delete; no order, no leases) as the upper bound, in the same run.
func BenchmarkRelayThroughput(b *testing.B) {
	seeds := brokers(b)
	drain := dimmertest.Name("drain_")
	createTopic(b, seeds, drain, 16)
	ctx := tctx(b, 20*time.Minute)
	payload := make([]byte, 100)

	handWritten := func() float64 {
		pool, _ := setup(b, outbox.Config{})
		_, err := pool.Exec(ctx, `CREATE TABLE hw (seq bigserial PRIMARY KEY, key text, payload bytea)`)
		require.NoError(b, err)
		rows := make([][]any, drainMessages)
		for i := range rows {
			rows[i] = []any{fmt.Sprint("k", i%drainKeys), payload}
		}
		_, err = pool.CopyFrom(ctx, pgx.Identifier{"hw"}, []string{"key", "payload"}, pgx.CopyFromRows(rows))
		require.NoError(b, err)
		cl, _ := producer(b, seeds)
		start := time.Now()
		for {
			rs, err := pool.Query(ctx, `SELECT seq, key, payload FROM hw ORDER BY seq LIMIT 500`)
			require.NoError(b, err)
			var seqs []int64
			var recs []*kgo.Record
			var seq int64
			var key string
			var p []byte
			_, err = pgx.ForEachRow(rs, []any{&seq, &key, &p}, func() error {
				seqs = append(seqs, seq)
				recs = append(recs, &kgo.Record{Topic: drain, Key: []byte(key), Value: slices.Clone(p)})
				return nil
			})
			require.NoError(b, err)
			if len(seqs) == 0 {
				break
			}
			require.NoError(b, cl.ProduceSync(ctx, recs...).FirstErr())
			_, err = pool.Exec(ctx, `DELETE FROM hw WHERE seq = ANY($1)`, seqs)
			require.NoError(b, err)
		}
		return drainMessages / time.Since(start).Seconds()
	}
	relays := func(n int) float64 {
		pool, o := setup(b, outbox.Config{})
		var wg sync.WaitGroup
		var rs []*outbox.Relay
		// Done is watched through the publishers (polling count(*) would
		// compete with the relays for the two cores); the table is checked
		// empty once every message was acknowledged by the broker.
		var acked atomic.Int64
		all := make(chan struct{})
		for i := range n {
			_, kp := producer(b, seeds)
			pub := outbox.PublisherFunc(func(c context.Context, batch []outbox.Record) []error {
				res := kp.Publish(c, batch)
				ok := int64(0)
				for _, err := range res {
					if err == nil {
						ok++
					}
				}
				if acked.Add(ok) >= drainMessages && acked.Load()-ok < drainMessages {
					close(all)
				}
				return res
			})
			rp := relayPool(b)
			defer rp.Close()
			r, err := o.NewRelay(rp, pub, outbox.RelayConfig{ID: fmt.Sprint("bench-", i), LeaseTTL: time.Second, Logger: quiet(b)})
			require.NoError(b, err)
			rs = append(rs, r)
			wg.Add(1)
			go func() { defer wg.Done(); _ = r.Run(ctx) }()
		}
		// The relays share the buckets evenly before the backlog lands, so
		// the figure is the steady state of n relays, not their start-up.
		require.Eventually(b, func() bool {
			for _, r := range rs {
				if len(r.Buckets()) != o.Config().Buckets/n {
					return false
				}
			}
			return true
		}, 30*time.Second, 10*time.Millisecond)
		fill(b, ctx, o, pool, drain, payload)
		_, err := pool.Exec(ctx, `ANALYZE `+o.Config().Schema+`.outbox`)
		require.NoError(b, err)
		start := time.Now()
		_, err = pool.Exec(ctx, `SELECT pg_notify($1, '')`, o.Channel()) // as Enqueue would
		require.NoError(b, err)
		<-all
		for pending(b, pool, o) > 0 {
			time.Sleep(time.Millisecond)
		}
		rate := drainMessages / time.Since(start).Seconds()
		for _, r := range rs {
			require.NoError(b, r.Shutdown(ctx))
		}
		wg.Wait()
		return rate
	}
	// Interleaved rounds, so a change in the machine's load (it is shared)
	// weighs on the baseline and the relays alike.
	var hwT, oneT, fourT float64
	for range 3 {
		hwT += drainMessages / handWritten()
		oneT += drainMessages / relays(1)
		fourT += drainMessages / relays(4)
	}
	hw, one, four := 3*drainMessages/hwT, 3*drainMessages/oneT, 3*drainMessages/fourT
	b.Logf("hand-written %.0f msg/s, 1 relay %.0f msg/s, 4 relays %.0f msg/s", hw, one, four)
	benchgoal.Report(b, "outbox_relay1_throughput", one, "msg/s", benchgoal.AtLeast, 50000)
	benchgoal.Report(b, "outbox_relay4_throughput", four, "msg/s", benchgoal.AtLeast, 50000)
	benchgoal.Report(b, "outbox_relay1_vs_handwritten", one/hw, "x", benchgoal.AtLeast, 0.5)
	benchgoal.Report(b, "outbox_relay4_vs_handwritten", four/hw, "x", benchgoal.AtLeast, 0.5)
}

// BenchmarkLatency: commit-to-ack at a steady 1,000 msg/s, and the pickup of
// a single message after silence, with LISTEN/NOTIFY wake-ups (the poll is
// left at 1s, so polling cannot be what delivers).
func BenchmarkLatency(b *testing.B) {
	seeds := brokers(b)
	lat := dimmertest.Name("lat_")
	createTopic(b, seeds, lat, 8)
	ctx := tctx(b, 5*time.Minute)
	pool, o := setup(b, outbox.Config{})
	_, kp := producer(b, seeds)
	var mu sync.Mutex
	committed := map[uuid.UUID]time.Time{}
	acked := map[uuid.UUID]time.Time{}
	pub := outbox.PublisherFunc(func(c context.Context, batch []outbox.Record) []error {
		res := kp.Publish(c, batch)
		now := time.Now()
		mu.Lock()
		for i, r := range batch {
			if res[i] == nil {
				acked[r.ID] = now
			}
		}
		mu.Unlock()
		return res
	})
	r, err := o.NewRelay(pool, pub, outbox.RelayConfig{PollInterval: time.Second, Logger: quiet(b)})
	require.NoError(b, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	defer func() { _ = r.Shutdown(ctx); <-done }()
	require.Eventually(b, func() bool { return len(r.Buckets()) > 0 }, 10*time.Second, time.Millisecond)

	send := func(i int) {
		id := uuid.Must(uuid.NewV7())
		require.NoError(b, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			_, err := o.Enqueue(ctx, tx, outbox.Message{ID: id, Topic: lat, Key: fmt.Sprint("k", i%500), Payload: []byte("x")})
			return err
		}))
		mu.Lock()
		committed[id] = time.Now()
		mu.Unlock()
	}
	p99 := func() time.Duration {
		mu.Lock()
		defer mu.Unlock()
		var lat []time.Duration
		for id, t0 := range committed {
			lat = append(lat, acked[id].Sub(t0))
		}
		clear(committed)
		clear(acked)
		slices.Sort(lat)
		v := lat[len(lat)*99/100]
		return v
	}
	wait := func() {
		require.Eventually(b, func() bool {
			mu.Lock()
			defer mu.Unlock()
			for id := range committed {
				if _, ok := acked[id]; !ok {
					return false
				}
			}
			return true
		}, 30*time.Second, time.Millisecond)
	}
	// Steady 1,000 msg/s for 3 s.
	tick := time.NewTicker(time.Millisecond)
	for i := range 3000 {
		<-tick.C
		send(i)
	}
	tick.Stop()
	wait()
	steady := p99()
	// Idle pickup: one message after 100 ms of silence, 100 times.
	for i := range 100 {
		time.Sleep(100 * time.Millisecond)
		send(i)
		wait()
	}
	idle := p99()
	b.Logf("commit-to-ack p99 at 1,000 msg/s: %v; idle pickup p99: %v", steady, idle)
	benchgoal.Report(b, "outbox_commit_to_ack_p99", float64(steady)/float64(time.Millisecond), "ms", benchgoal.AtMost, 25)
	benchgoal.Report(b, "outbox_idle_pickup_p99", float64(idle)/float64(time.Millisecond), "ms", benchgoal.AtMost, 20)
}
