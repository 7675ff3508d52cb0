package inbox_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/inbox"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
	"github.com/dimmer-dev/dimmer/outbox/redissink"
)

func tctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// fixture: an outbox with n messages, an inbox, and an "applied" table the
// consumer's effect goes to.
func fixture(t *testing.T, pub outbox.Publisher, topic string, n int) (*pgxpool.Pool, *inbox.Inbox) {
	ctx := tctx(t)
	pool, schema := dimmertest.Schema(t)
	o, err := outbox.New(outbox.Config{Schema: schema, Buckets: 4})
	require.NoError(t, err)
	require.NoError(t, o.Install(ctx, pool))
	in, err := inbox.New(schema, "")
	require.NoError(t, err)
	require.NoError(t, in.Install(ctx, pool))
	require.NoError(t, in.Install(ctx, pool), "idempotent")
	_, err = pool.Exec(ctx, `CREATE TABLE applied (id text, n int NOT NULL DEFAULT 1)`)
	require.NoError(t, err)
	for i := range n {
		_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: topic, Key: fmt.Sprint("k", i%3), Payload: []byte(fmt.Sprint(i))})
		require.NoError(t, err)
	}
	r, err := o.NewRelay(pool, pub, outbox.RelayConfig{PollInterval: 10 * time.Millisecond})
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	require.Eventually(t, func() bool {
		s, err := o.Stats(ctx, pool, "")
		require.NoError(t, err)
		return s.Pending == 0
	}, 20*time.Second, 10*time.Millisecond)
	require.NoError(t, r.Shutdown(ctx))
	<-done
	return pool, in
}

// handle applies one message exactly once: the inbox mark and the effect
// share the transaction.
func handle(ctx context.Context, pool *pgxpool.Pool, in *inbox.Inbox, id string) (first bool, err error) {
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		first, err = in.Mark(ctx, tx, "billing", id)
		if err != nil || !first {
			return err
		}
		_, err = tx.Exec(ctx, `INSERT INTO applied (id) VALUES ($1)`, id)
		return err
	})
	return first, err
}

func assertOnce(t *testing.T, pool *pgxpool.Pool, n int) {
	var rows, distinct int
	require.NoError(t, pool.QueryRow(tctx(t), `SELECT count(*), count(DISTINCT id) FROM applied`).Scan(&rows, &distinct))
	assert.Equal(t, n, rows, "every message applied exactly once")
	assert.Equal(t, n, distinct)
}

func TestMarkValidation(t *testing.T) {
	t.Parallel()
	in, err := inbox.New("", "")
	require.NoError(t, err)
	_, err = in.Mark(context.Background(), nil, "c", "m")
	require.ErrorIs(t, err, inbox.ErrInvalid)
}

// TestKafkaConsumerCrash: a franz-go group consumer applies every record and
// crashes before committing offsets; its successor gets them all again and
// the inbox skips each one.
func TestKafkaConsumerCrash(t *testing.T) {
	t.Parallel()
	ctx := tctx(t)
	seeds := strings.Split(os.Getenv("DIMMER_KAFKA_BROKERS"), ",")
	if seeds[0] == "" {
		c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(3))
		require.NoError(t, err)
		defer c.Close()
		seeds = c.ListenAddrs()
	}
	topic := dimmertest.Name("inbox_")
	prod, err := kgo.NewClient(append(kafkasink.ClientOptions(seeds...), kgo.AllowAutoTopicCreation())...)
	require.NoError(t, err)
	defer prod.Close()
	pub, err := kafkasink.New(prod)
	require.NoError(t, err)
	const n = 30
	pool, in := fixture(t, pub, topic, n)

	consume := func(want int) (firsts, repeats int) {
		cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumerGroup("billing-"+topic), kgo.ConsumeTopics(topic),
			kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.DisableAutoCommit())
		require.NoError(t, err)
		defer cl.Close() // the crash: offsets never committed
		seen := 0
		for seen < want {
			fs := cl.PollFetches(ctx)
			require.NoError(t, ctx.Err())
			fs.EachRecord(func(r *kgo.Record) {
				seen++
				var id string
				for _, h := range r.Headers {
					if h.Key == outbox.HeaderMessageID {
						id = string(h.Value)
					}
				}
				first, err := handle(ctx, pool, in, id)
				require.NoError(t, err)
				if first {
					firsts++
				} else {
					repeats++
				}
			})
		}
		return firsts, repeats
	}
	f, r := consume(n)
	assert.Equal(t, n, f)
	assert.Zero(t, r)
	f, r = consume(n) // redelivered after the crash
	assert.Zero(t, f)
	assert.Equal(t, n, r)
	assertOnce(t, pool, n)
}

// TestRedisGroupCrash: a Redis Streams group consumer applies entries and
// crashes before XACK; another consumer claims the pending entries, and the
// inbox skips them.
func TestRedisGroupCrash(t *testing.T) {
	t.Parallel()
	ctx := tctx(t)
	rdb, prefix := dimmertest.Redis(t)
	pub, err := redissink.New(rdb, redissink.WithStreamPrefix(prefix), redissink.WithMaxLen(10000))
	require.NoError(t, err)
	const n = 20
	pool, in := fixture(t, pub, "orders", n)
	stream := pub.Stream("orders")
	require.NoError(t, rdb.XGroupCreate(ctx, stream, "billing", "0").Err())

	process := func(msgs []redis.XMessage, ack bool) (firsts int) {
		for _, m := range msgs {
			first, err := handle(ctx, pool, in, m.Values["id"].(string))
			require.NoError(t, err)
			if first {
				firsts++
			}
			if ack {
				require.NoError(t, rdb.XAck(ctx, stream, "billing", m.ID).Err())
			}
		}
		return firsts
	}
	res, err := rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: "billing", Consumer: "c1", Streams: []string{stream, ">"}, Count: n}).Result()
	require.NoError(t, err)
	require.Len(t, res[0].Messages, n)
	assert.Equal(t, "0", res[0].Messages[0].Values["payload"])
	assert.Equal(t, n, process(res[0].Messages, false)) // c1 crashes: no XACK

	claimed, _, err := rdb.XAutoClaim(ctx, &redis.XAutoClaimArgs{Stream: stream, Group: "billing", Consumer: "c2", MinIdle: 0, Start: "0", Count: n}).Result()
	require.NoError(t, err)
	require.Len(t, claimed, n, "every entry was pending")
	assert.Zero(t, process(claimed, true), "all redelivered entries are recognised")
	pendingN, err := rdb.XPending(ctx, stream, "billing").Result()
	require.NoError(t, err)
	assert.Zero(t, pendingN.Count)
	assertOnce(t, pool, n)

	deleted, err := in.Prune(ctx, pool, time.Hour)
	require.NoError(t, err)
	assert.Zero(t, deleted, "recent entries are kept")
}
