package outbox_test

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

func tctx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// brokers returns DIMMER_KAFKA_BROKERS when set, else an in-process kfake
// cluster on loopback closed with the test.
func brokers(t testing.TB) []string {
	if b := os.Getenv("DIMMER_KAFKA_BROKERS"); b != "" {
		return strings.Split(b, ",")
	}
	c, err := kfake.NewCluster(kfake.NumBrokers(1))
	require.NoError(t, err)
	t.Cleanup(c.Close)
	return c.ListenAddrs()
}

func createTopic(t testing.TB, seeds []string, topic string, partitions int32) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	require.NoError(t, err)
	defer cl.Close()
	resp, err := kadm.NewClient(cl).CreateTopic(tctx(t, 10*time.Second), partitions, 1, nil, topic)
	require.NoError(t, err)
	require.NoError(t, resp.Err)
	// On a real cluster (DIMMER_KAFKA_BROKERS) the topic would outlive the
	// test; on kfake this is harmless.
	t.Cleanup(func() {
		cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
		if err != nil {
			return
		}
		defer cl.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = kadm.NewClient(cl).DeleteTopic(ctx, topic)
	})
}

func producer(t testing.TB, seeds []string) (*kgo.Client, *kafkasink.Publisher) {
	cl, err := kgo.NewClient(kafkasink.ClientOptions(seeds...)...)
	require.NoError(t, err)
	t.Cleanup(cl.Close)
	p, err := kafkasink.New(cl)
	require.NoError(t, err)
	return cl, p
}

// consumeAll reads every record of topic from the start up to the end
// offsets at call time.
func consumeAll(t testing.TB, seeds []string, topic string) []*kgo.Record {
	ctx := tctx(t, 60*time.Second)
	admin, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	require.NoError(t, err)
	defer admin.Close()
	ends, err := kadm.NewClient(admin).ListEndOffsets(ctx, topic)
	require.NoError(t, err)
	var total int64
	ends.Each(func(o kadm.ListedOffset) { total += o.Offset })
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer cl.Close()
	var out []*kgo.Record
	for int64(len(out)) < total {
		fs := cl.PollFetches(ctx)
		require.NoError(t, ctx.Err(), "consumed %d of %d records", len(out), total)
		fs.EachError(func(_ string, _ int32, err error) { require.NoError(t, err) })
		out = append(out, fs.Records()...)
	}
	return out
}

func header(r *kgo.Record, name string) string {
	for _, h := range r.Headers {
		if h.Key == name {
			return string(h.Value)
		}
	}
	return ""
}

// setup installs an outbox in a fresh schema.
func setup(t testing.TB, cfg outbox.Config) (*pgxpool.Pool, *outbox.Outbox) {
	pool, schema := dimmertest.Schema(t)
	cfg.Schema = schema
	o, err := outbox.New(cfg)
	require.NoError(t, err)
	require.NoError(t, o.Install(tctx(t, 30*time.Second), pool))
	return pool, o
}

// relayPool opens a pool of the relay's own (to kill it abruptly).
func relayPool(t testing.TB) *pgxpool.Pool {
	cfg, err := pgxpool.ParseConfig(dimmertest.PostgresURL())
	require.NoError(t, err)
	cfg.MaxConns = 4
	p, err := pgxpool.NewWithConfig(tctx(t, 10*time.Second), cfg)
	require.NoError(t, err)
	t.Cleanup(p.Close)
	return p
}

func pending(t testing.TB, pool *pgxpool.Pool, o *outbox.Outbox) int {
	var n int
	c := o.Config()
	require.NoError(t, pool.QueryRow(tctx(t, 10*time.Second), `SELECT count(*) FROM `+c.Schema+`.`+c.Table).Scan(&n))
	return n
}

// runUntilDrained runs r until o's table is empty, then shuts it down.
func runUntilDrained(t testing.TB, ctx context.Context, pool *pgxpool.Pool, o *outbox.Outbox, r *outbox.Relay, within time.Duration) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	waitDrained(t, pool, o, within)
	require.NoError(t, r.Shutdown(ctx))
	<-done
}

func waitDrained(t testing.TB, pool *pgxpool.Pool, o *outbox.Outbox, within time.Duration) {
	deadline := time.Now().Add(within)
	for {
		n := pending(t, pool, o)
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("outbox not drained after %v: %d rows left", within, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type tlog struct{ t testing.TB }

func (w tlog) Write(p []byte) (int, error) { w.t.Log(strings.TrimSpace(string(p))); return len(p), nil }

// quiet logs warnings and errors through t.Log.
func quiet(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlog{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// forEachLayout runs test, in parallel, on a plain table (partitions 1) and
// on one of 4 partitions (Config.Partitions; a test of fewer buckets uses
// fewer).
func forEachLayout(t *testing.T, test func(t *testing.T, partitions int)) {
	t.Parallel()
	for _, layout := range []struct {
		name       string
		partitions int
	}{{"plain", 1}, {"partitioned", 4}} {
		t.Run(layout.name, func(t *testing.T) {
			t.Parallel()
			test(t, layout.partitions)
		})
	}
}
