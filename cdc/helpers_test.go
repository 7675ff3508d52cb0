package cdc_test

import (
	"context"
	"errors"
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

	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

func tctx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// logicalDB creates a database on the logical test server and returns its
// URL and a pool on it.
func logicalDB(t testing.TB) (string, *pgxpool.Pool) {
	url := dimmertest.LogicalDatabase(t)
	return url, dimmertest.Pool(t, url)
}

// slot creates a registered slot (and publication) named after the test's
// database and drops both when the test ends, unless the test dropped them
// itself (benchmarks drop each round's slot so rounds do not pile up).
func slot(t testing.TB, pool *pgxpool.Pool, spec cdc.SlotSpec) string {
	if spec.Slot == "" {
		spec.Slot = dimmertest.Name("s_")
	}
	require.NoError(t, cdc.CreateSlot(tctx(t, 30*time.Second), pool, spec))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := cdc.DropSlot(ctx, pool, spec.Schema, spec.Slot, true); err != nil && !errors.Is(err, cdc.ErrNoSlot) {
			t.Errorf("drop slot %s: %v", spec.Slot, err)
		}
	})
	return spec.Slot
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

func producer(t testing.TB, seeds []string) *kafkasink.Publisher {
	cl, err := kgo.NewClient(kafkasink.ClientOptions(seeds...)...)
	require.NoError(t, err)
	t.Cleanup(cl.Close)
	p, err := kafkasink.New(cl)
	require.NoError(t, err)
	return p
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

type tlog struct{ t testing.TB }

func (w tlog) Write(p []byte) (int, error) { w.t.Log(strings.TrimSpace(string(p))); return len(p), nil }

// quiet logs warnings and errors through t.Log.
func quiet(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlog{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}
