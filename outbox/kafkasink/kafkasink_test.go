package kafkasink_test

import (
	"context"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

// cluster returns DIMMER_KAFKA_BROKERS when set, else an in-process kfake
// cluster, with topics created (and deleted after the test, which matters
// on a real cluster).
func cluster(t *testing.T, topics ...string) []string {
	t.Helper()
	var seeds []string
	if b := os.Getenv("DIMMER_KAFKA_BROKERS"); b != "" {
		seeds = strings.Split(b, ",")
	} else {
		c, err := kfake.NewCluster(kfake.NumBrokers(1))
		require.NoError(t, err)
		t.Cleanup(c.Close)
		seeds = c.ListenAddrs()
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	require.NoError(t, err)
	t.Cleanup(cl.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, topic := range topics {
		resp, err := kadm.NewClient(cl).CreateTopic(ctx, 3, 1, nil, topic)
		require.NoError(t, err)
		require.NoError(t, resp.Err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = kadm.NewClient(cl).DeleteTopics(ctx, topics...)
	})
	return seeds
}

func TestClientOptionsAreDurable(t *testing.T) {
	t.Parallel()
	cl, err := kgo.NewClient(kafkasink.ClientOptions("127.0.0.1:1")...)
	require.NoError(t, err)
	defer cl.Close()
	assert.Equal(t, kgo.AllISRAcks(), cl.OptValue(kgo.RequiredAcks), "acks from all in-sync replicas")
	assert.Equal(t, false, cl.OptValue(kgo.DisableIdempotentWrite), "idempotent producer")
	assert.Equal(t, time.Duration(0), cl.OptValue(kgo.ProducerLinger), "no linger: the relay batches")
	_, err = kafkasink.New(cl)
	require.NoError(t, err)
}

func TestNewRefusesWeakProducers(t *testing.T) {
	t.Parallel()
	leader, err := kgo.NewClient(kgo.SeedBrokers("127.0.0.1:1"), kgo.RequiredAcks(kgo.LeaderAck()), kgo.DisableIdempotentWrite())
	require.NoError(t, err)
	defer leader.Close()
	_, err = kafkasink.New(leader)
	require.ErrorIs(t, err, kafkasink.ErrWeakProducer)
	assert.Contains(t, err.Error(), "RequiredAcks is LeaderAck")

	noIdem, err := kgo.NewClient(kgo.SeedBrokers("127.0.0.1:1"), kgo.DisableIdempotentWrite())
	require.NoError(t, err)
	defer noIdem.Close()
	_, err = kafkasink.New(noIdem)
	require.ErrorIs(t, err, kafkasink.ErrWeakProducer)
	assert.Contains(t, err.Error(), "DisableIdempotentWrite")

	_, err = kafkasink.New(nil)
	require.ErrorIs(t, err, kafkasink.ErrNilClient)
}

// TestPublish: record key = message key (nil when keyless), value =
// payload, the message ID header first then the headers sorted by name,
// topics mapped; each record's own outcome is reported.
func TestPublish(t *testing.T) {
	t.Parallel()
	env := dimmertest.Name("prod_") + "."
	seeds := cluster(t, env+"orders", env+"audit")
	cl, err := kgo.NewClient(kafkasink.ClientOptions(seeds...)...)
	require.NoError(t, err)
	defer cl.Close()
	p, err := kafkasink.New(cl, kafkasink.WithTopicMap(func(t string) string { return env + t }))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	ids := []uuid.UUID{uuid.New(), uuid.New()}
	batch := []outbox.Record{
		{Message: outbox.Message{ID: ids[0], Topic: "orders", Key: "order-7", Payload: []byte(`{"total":3}`),
			Headers: map[string]string{"z-trace": "t1", "a-type": "created"}}},
		{Message: outbox.Message{ID: ids[1], Topic: "audit", Payload: []byte("keyless")}},
	}
	res := p.Publish(ctx, batch)
	require.Len(t, res, 2)
	require.NoError(t, res[0])
	require.NoError(t, res[1])

	consumer, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumeTopics(env+"orders", env+"audit"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer consumer.Close()
	got := map[string]*kgo.Record{}
	for len(got) < 2 {
		fs := consumer.PollFetches(ctx)
		require.NoError(t, ctx.Err())
		fs.EachRecord(func(r *kgo.Record) { got[r.Topic] = r })
	}
	o := got[env+"orders"]
	assert.Equal(t, []byte("order-7"), o.Key)
	assert.Equal(t, []byte(`{"total":3}`), o.Value)
	assert.Equal(t, []kgo.RecordHeader{
		{Key: outbox.HeaderMessageID, Value: []byte(ids[0].String())},
		{Key: "a-type", Value: []byte("created")},
		{Key: "z-trace", Value: []byte("t1")},
	}, o.Headers)
	a := got[env+"audit"]
	assert.Nil(t, a.Key, "a keyless message has no record key")
	assert.Equal(t, []kgo.RecordHeader{{Key: outbox.HeaderMessageID, Value: []byte(ids[1].String())}}, a.Headers)

	// A publish that cannot complete reports an error for every record, so
	// the relay keeps the rows.
	done, stop := context.WithCancel(ctx)
	stop()
	res = p.Publish(done, batch)
	require.Len(t, res, 2)
	assert.Error(t, res[0])
	assert.Error(t, res[1])
}

// TestPublishReturnsAtTheDeadlineBehindAnUnresponsiveBroker: the broker
// holds every produce request unanswered. The idempotent producer never
// fails a record it has sent, so Publish must stop waiting at its context:
// every record fails with ErrNotAcknowledged and the relay can retry it.
// Once the broker answers, the records left with the client are delivered
// and a retry produced later lands after them, so per key the first copy
// comes first.
func TestPublishReturnsAtTheDeadlineBehindAnUnresponsiveBroker(t *testing.T) {
	t.Parallel()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "orders"))
	require.NoError(t, err)
	defer c.Close()
	release := make(chan struct{})
	var held atomic.Int32
	c.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		select {
		case <-release:
			return nil, nil, false // answered normally from now on
		default:
		}
		held.Add(1)
		c.SleepControl(func() { <-release })
		return nil, nil, false
	})
	cl, err := kgo.NewClient(kafkasink.ClientOptions(c.ListenAddrs()...)...)
	require.NoError(t, err)
	defer cl.Close()
	p, err := kafkasink.New(cl)
	require.NoError(t, err)

	first := outbox.Record{Message: outbox.Message{ID: uuid.Must(uuid.NewV7()), Topic: "orders", Key: "order-1", Payload: []byte("created")}}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	start := time.Now()
	errs := p.Publish(ctx, []outbox.Record{first})
	cancel()
	assert.Less(t, time.Since(start), 5*time.Second, "Publish returned at its deadline, not when the broker answered")
	require.Len(t, errs, 1)
	require.ErrorIs(t, errs[0], kafkasink.ErrNotAcknowledged)
	assert.ErrorIs(t, errs[0], context.DeadlineExceeded)
	assert.Positive(t, held.Load(), "the produce request reached the broker and was held")

	// The relay's retry of the same message, then the key's next one.
	retryCtx, cancelRetry := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancelRetry()
	next := outbox.Record{Message: outbox.Message{ID: uuid.Must(uuid.NewV7()), Topic: "orders", Key: "order-1", Payload: []byte("paid")}}
	go func() { time.Sleep(200 * time.Millisecond); close(release) }()
	for _, err := range p.Publish(retryCtx, []outbox.Record{first}) {
		require.NoError(t, err)
	}
	for _, err := range p.Publish(retryCtx, []outbox.Record{next}) {
		require.NoError(t, err)
	}

	consumer, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.ConsumeTopics("orders"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer consumer.Close()
	var got []string
	for len(got) < 3 {
		fs := consumer.PollFetches(retryCtx)
		require.NoError(t, retryCtx.Err(), "consumed %v", got)
		fs.EachRecord(func(r *kgo.Record) { got = append(got, string(r.Value)) })
	}
	assert.Equal(t, []string{"created", "created", "paid"}, got,
		"the held record was delivered after all (a duplicate of the retry), both before the key's next message")
}

// A record for a topic the cluster does not have fails with the broker's
// UNKNOWN_TOPIC_OR_PARTITION within the publish's time, not with an
// anonymous deadline: the most common cause in production says its name.
func TestPublishToUnknownTopicSaysSo(t *testing.T) {
	t.Parallel()
	seeds := cluster(t)
	cl, err := kgo.NewClient(kafkasink.ClientOptions(seeds...)...)
	require.NoError(t, err)
	defer cl.Close()
	p, err := kafkasink.New(cl)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res := p.Publish(ctx, []outbox.Record{{Message: outbox.Message{ID: uuid.New(), Topic: dimmertest.Name("ghost_"), Payload: []byte("x")}}})
	require.Len(t, res, 1)
	require.Error(t, res[0])
	assert.ErrorIs(t, res[0], kerr.UnknownTopicOrPartition, "%v", res[0])
}
