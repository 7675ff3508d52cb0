package kafkasink_test

import (
	"context"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

func cluster(t *testing.T, topics ...string) []string {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1))
	require.NoError(t, err)
	t.Cleanup(c.Close)
	seeds := c.ListenAddrs()
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	require.NoError(t, err)
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, topic := range topics {
		resp, err := kadm.NewClient(cl).CreateTopic(ctx, 3, 1, nil, topic)
		require.NoError(t, err)
		require.NoError(t, resp.Err)
	}
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
	seeds := cluster(t, "prod.orders", "prod.audit")
	cl, err := kgo.NewClient(kafkasink.ClientOptions(seeds...)...)
	require.NoError(t, err)
	defer cl.Close()
	p, err := kafkasink.New(cl, kafkasink.WithTopicMap(func(t string) string { return "prod." + t }))
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

	consumer, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumeTopics("prod.orders", "prod.audit"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer consumer.Close()
	got := map[string]*kgo.Record{}
	for len(got) < 2 {
		fs := consumer.PollFetches(ctx)
		require.NoError(t, ctx.Err())
		fs.EachRecord(func(r *kgo.Record) { got[r.Topic] = r })
	}
	o := got["prod.orders"]
	assert.Equal(t, []byte("order-7"), o.Key)
	assert.Equal(t, []byte(`{"total":3}`), o.Value)
	assert.Equal(t, []kgo.RecordHeader{
		{Key: outbox.HeaderMessageID, Value: []byte(ids[0].String())},
		{Key: "a-type", Value: []byte("created")},
		{Key: "z-trace", Value: []byte("t1")},
	}, o.Headers)
	a := got["prod.audit"]
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
