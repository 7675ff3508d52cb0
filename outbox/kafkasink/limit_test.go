package kafkasink_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

func oneTopic(t *testing.T, seeds []string, partitions int32) string {
	t.Helper()
	topic := dimmertest.Name("big_")
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	require.NoError(t, err)
	t.Cleanup(cl.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := kadm.NewClient(cl).CreateTopic(ctx, partitions, 1, nil, topic)
	require.NoError(t, err)
	require.NoError(t, resp.Err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = kadm.NewClient(cl).DeleteTopics(ctx, topic)
	})
	return topic
}

// TestEnqueueRefusesWhatTheBrokerWouldRefuse: with the publisher as the
// outbox's RecordLimit, a message whose record is exactly at the broker's
// limit (key, headers and framing counted) is enqueued and delivered, and
// one byte more is refused at Enqueue with ErrRecordTooLarge, writing
// nothing. The same one-byte-larger record produced directly is refused by
// the client as MESSAGE_TOO_LARGE: the count is the broker's, not a guess.
func TestEnqueueRefusesWhatTheBrokerWouldRefuse(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	seeds := cluster(t)
	topic := oneTopic(t, seeds, 1)
	cl, err := kgo.NewClient(kafkasink.ClientOptions(seeds...)...)
	require.NoError(t, err)
	defer cl.Close()
	pub, err := kafkasink.New(cl)
	require.NoError(t, err)
	limit := pub.MaxRecordBytes()
	require.Equal(t, kafkasink.DefaultMaxMessageBytes, limit)

	pool, schema := dimmertest.Schema(t)
	o, err := outbox.New(outbox.Config{Schema: schema, MaxPayload: 2 << 20, RecordLimit: pub})
	require.NoError(t, err)
	require.NoError(t, o.Install(ctx, pool))

	msg := func(n int) outbox.Message {
		return outbox.Message{Topic: topic, Key: "order-42", Headers: map[string]string{"content-type": "application/json"},
			Payload: []byte(strings.Repeat("x", n))}
	}
	n := limit - pub.RecordBytes(msg(0))
	for pub.RecordBytes(msg(n)) > limit {
		n--
	}
	require.Equal(t, limit, pub.RecordBytes(msg(n)), "a payload that fills the record to the limit exactly")
	t.Logf("limit %d bytes: payload %d is the largest with this key and headers (%d bytes of overhead)", limit, n, limit-n)

	enqueue := func(m outbox.Message) error {
		return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { _, err := o.Enqueue(ctx, tx, m); return err })
	}
	require.NoError(t, enqueue(msg(n)), "at the limit: accepted")
	err = enqueue(msg(n + 1))
	require.ErrorIs(t, err, outbox.ErrRecordTooLarge)
	require.ErrorIs(t, err, outbox.ErrInvalidMessage)
	var tooLarge *outbox.RecordTooLargeError
	require.True(t, errors.As(err, &tooLarge))
	assert.Equal(t, limit+1, tooLarge.Bytes)
	assert.Equal(t, limit, tooLarge.Limit)
	assert.Contains(t, err.Error(), "order-42")
	var rows int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{schema, "outbox"}.Sanitize()).Scan(&rows))
	assert.Equal(t, 1, rows, "the refused message wrote nothing")

	// The broker (through the client) agrees on both sides of the line.
	over := msg(n + 1)
	rec := &kgo.Record{Topic: topic, Key: []byte(over.Key), Value: over.Payload, Headers: []kgo.RecordHeader{
		{Key: outbox.HeaderMessageID, Value: []byte(uuid.New().String())},
		{Key: "content-type", Value: []byte("application/json")},
	}}
	require.ErrorIs(t, cl.ProduceSync(ctx, rec).FirstErr(), kerr.MessageTooLarge, "one byte over is what Kafka refuses")

	// The accepted one is delivered (not dead-lettered, not holding its key).
	r, err := o.NewRelay(pool, pub, outbox.RelayConfig{PollInterval: 20 * time.Millisecond, MaxAttempts: 1})
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = r.Run(ctx) }()
	require.Eventually(t, func() bool {
		require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{schema, "outbox"}.Sanitize()).Scan(&rows))
		return rows == 0
	}, 30*time.Second, 20*time.Millisecond, "the record at the limit is published and acknowledged")
	require.NoError(t, r.Shutdown(ctx))
	<-done
}

// TestBatchOfLargeRecordsIsSplit: one relay batch of records that together
// exceed the broker's message.max.bytes, all to one partition, is split
// into batches the broker accepts.
func TestBatchOfLargeRecordsIsSplit(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	seeds := cluster(t)
	topic := oneTopic(t, seeds, 1)
	cl, err := kgo.NewClient(kafkasink.ClientOptions(seeds...)...)
	require.NoError(t, err)
	defer cl.Close()
	pub, err := kafkasink.New(cl)
	require.NoError(t, err)
	batch := make([]outbox.Record, 6)
	for i := range batch {
		batch[i] = outbox.Record{Message: outbox.Message{ID: uuid.New(), Topic: topic, Key: string(rune('a' + i)),
			Payload: []byte(strings.Repeat("y", 400<<10))}}
	}
	for i, err := range pub.Publish(ctx, batch) {
		assert.NoError(t, err, "record %d", i)
	}
}
