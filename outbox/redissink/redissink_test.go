package redissink_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/redissink"
)

func rec(topic, key, payload string, headers map[string]string) outbox.Record {
	return outbox.Record{Message: outbox.Message{ID: uuid.New(), Topic: topic, Key: key, Payload: []byte(payload), Headers: headers}}
}

// TestPublishStreamPerTopic: one stream per topic (prefix + topic), one
// entry per record with the id, key, payload and h:<name> fields, in batch
// order; a record whose XADD fails gets its own error, the others succeed.
func TestPublishStreamPerTopic(t *testing.T) {
	t.Parallel()
	rdb, prefix := dimmertest.Redis(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p, err := redissink.New(rdb, redissink.WithStreamPrefix(prefix))
	require.NoError(t, err)
	assert.Equal(t, prefix+"orders", p.Stream("orders"))
	require.NoError(t, rdb.Set(ctx, prefix+"broken", "not a stream", 0).Err())

	batch := []outbox.Record{
		rec("orders", "o-1", "created", map[string]string{"type": "created", "trace": "t1"}),
		rec("payments", "p-1", "paid", nil),
		rec("broken", "b-1", "lost?", nil),
		rec("orders", "o-2", "created", nil),
	}
	res := p.Publish(ctx, batch)
	require.Len(t, res, 4)
	assert.NoError(t, res[0])
	assert.NoError(t, res[1])
	assert.ErrorContains(t, res[2], "WRONGTYPE")
	assert.NoError(t, res[3])

	orders, err := rdb.XRange(ctx, prefix+"orders", "-", "+").Result()
	require.NoError(t, err)
	require.Len(t, orders, 2)
	assert.Equal(t, map[string]any{"id": batch[0].ID.String(), "key": "o-1", "payload": "created", "h:type": "created", "h:trace": "t1"}, orders[0].Values)
	assert.Equal(t, batch[3].ID.String(), orders[1].Values["id"])
	payments, err := rdb.XRange(ctx, prefix+"payments", "-", "+").Result()
	require.NoError(t, err)
	require.Len(t, payments, 1)
	assert.Equal(t, map[string]any{"id": batch[1].ID.String(), "key": "p-1", "payload": "paid"}, payments[0].Values)
}

// TestMaxLenTrims: with WithMaxLen the stream stays near the bound however
// much is published (approximate trimming: whole stream nodes go at once).
func TestMaxLenTrims(t *testing.T) {
	t.Parallel()
	rdb, prefix := dimmertest.Redis(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p, err := redissink.New(rdb, redissink.WithStreamPrefix(prefix), redissink.WithMaxLen(50))
	require.NoError(t, err)
	untrimmed, err := redissink.New(rdb, redissink.WithStreamPrefix(prefix))
	require.NoError(t, err)
	for round := range 20 {
		var batch []outbox.Record
		for i := range 100 {
			batch = append(batch, rec("bounded", fmt.Sprint("k", i), fmt.Sprint(round, "-", i), nil))
		}
		for _, err := range p.Publish(ctx, batch) {
			require.NoError(t, err)
		}
		for i := range batch {
			batch[i].Topic = "free"
		}
		for _, err := range untrimmed.Publish(ctx, batch) {
			require.NoError(t, err)
		}
	}
	n, err := rdb.XLen(ctx, prefix+"free").Result()
	require.NoError(t, err)
	assert.Equal(t, int64(2000), n, "without MaxLen nothing is trimmed")
	n, err = rdb.XLen(ctx, prefix+"bounded").Result()
	require.NoError(t, err)
	assert.GreaterOrEqual(t, n, int64(50), "never below the bound")
	assert.LessOrEqual(t, n, int64(50+100), "at most one stream node over the bound, not 2,000")
}

func TestNewValidates(t *testing.T) {
	t.Parallel()
	_, err := redissink.New(nil)
	assert.ErrorContains(t, err, "client is nil")
	rdb, _ := dimmertest.Redis(t)
	_, err = redissink.New(rdb, redissink.WithMaxLen(0))
	assert.ErrorContains(t, err, "WithMaxLen: must be positive")
}
