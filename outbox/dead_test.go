package outbox_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/outbox"
)

// TestPoisonBlocksOnlyItsKey: a message the broker keeps refusing is retried
// with backoff, becomes a dead letter after MaxAttempts and holds back only
// the later messages of its own key; retry and skip release them in order.
func TestPoisonBlocksOnlyItsKey(t *testing.T) {
	forEachLayout(t, func(t *testing.T, partitions int) {
		pool, o := setup(t, outbox.Config{Buckets: 4, Partitions: partitions})
		ctx := tctx(t, 30*time.Second)
		var mu sync.Mutex
		var got []string
		poisonOK := false
		pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
			mu.Lock()
			defer mu.Unlock()
			errs := make([]error, len(b))
			for i, r := range b {
				if string(r.Payload) == "poison" && !poisonOK {
					errs[i] = errors.New("schema registry rejects the payload")
					continue
				}
				got = append(got, r.Key+":"+string(r.Payload))
			}
			return errs
		})
		r, err := o.NewRelay(pool, pub, outbox.RelayConfig{PollInterval: 10 * time.Millisecond, MaxAttempts: 3,
			BackoffMin: 5 * time.Millisecond, BackoffMax: 20 * time.Millisecond, Logger: quiet(t)})
		require.NoError(t, err)
		done := make(chan struct{})
		go func() { defer close(done); _ = r.Run(ctx) }()
		defer func() { require.NoError(t, r.Shutdown(ctx)); <-done }()

		enq := func(key, payload string) uuid.UUID {
			id, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: key, Payload: []byte(payload)})
			require.NoError(t, err)
			return id
		}
		enq("bad", "1")
		poison := enq("bad", "poison")
		enq("bad", "3")
		for i := range 20 {
			enq(fmt.Sprint("good", i%4), fmt.Sprint(i))
		}
		var dead []outbox.DeadLetter
		require.Eventually(t, func() bool {
			dead, err = o.DeadLetters(ctx, pool, "", 10)
			require.NoError(t, err)
			return len(dead) == 1
		}, 10*time.Second, 10*time.Millisecond)
		assert.Equal(t, poison, dead[0].ID)
		assert.Equal(t, 3, dead[0].Attempts)
		assert.Equal(t, 1, dead[0].Waiting, "bad:3 waits behind it")
		assert.Contains(t, dead[0].LastError, "schema registry")
		require.Eventually(t, func() bool {
			s, err := o.Stats(ctx, pool, "")
			require.NoError(t, err)
			return s.Pending == 2 && s.Dead == 1
		}, 10*time.Second, 10*time.Millisecond, "every other key drained")
		mu.Lock()
		assert.Len(t, got, 21)
		assert.Equal(t, "bad:1", got[0][:5])
		assert.NotContains(t, got, "bad:3")
		mu.Unlock()

		require.ErrorIs(t, o.RetryDead(ctx, pool, uuid.New()), outbox.ErrNotDead)
		_, err = o.SkipDead(ctx, pool, uuid.New())
		require.ErrorIs(t, err, outbox.ErrNotDead)

		// Retry: published now, then what it held back, in order.
		mu.Lock()
		poisonOK = true
		mu.Unlock()
		require.NoError(t, o.RetryDead(ctx, pool, poison))
		waitDrained(t, pool, o, 10*time.Second)
		mu.Lock()
		assert.Equal(t, []string{"bad:poison", "bad:3"}, got[len(got)-2:])
		poisonOK = false
		mu.Unlock()

		// Skip: the next poison is dropped on the operator's word, the rest flows.
		p2 := enq("bad", "poison")
		enq("bad", "5")
		require.Eventually(t, func() bool {
			d, err := o.DeadLetters(ctx, pool, "t", 10)
			require.NoError(t, err)
			return len(d) == 1
		}, 10*time.Second, 10*time.Millisecond)
		rec, err := o.SkipDead(ctx, pool, p2)
		require.NoError(t, err)
		assert.Equal(t, "poison", string(rec.Payload))
		assert.Equal(t, 1, rec.Waiting, "bad:5 was held back by it")
		assert.NotEmpty(t, rec.LastError)
		assert.False(t, rec.DeadAt.IsZero())
		waitDrained(t, pool, o, 10*time.Second)
		mu.Lock()
		assert.Equal(t, "bad:5", got[len(got)-1])
		mu.Unlock()
	})
}

// TestCrowdedPrefixStillFlows: a dead letter with a long backlog behind it
// and a hot key fill the front of the queue many times over the batch
// size; every other key is still delivered, each in its order.
func TestCrowdedPrefixStillFlows(t *testing.T) {
	forEachLayout(t, func(t *testing.T, partitions int) {
		pool, o := setup(t, outbox.Config{Buckets: 2, Partitions: min(partitions, 2)})
		ctx := tctx(t, 30*time.Second)
		var mu sync.Mutex
		got := map[string][]string{}
		pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
			mu.Lock()
			defer mu.Unlock()
			errs := make([]error, len(b))
			seen := map[string]bool{}
			for i, r := range b {
				if seen[r.Key] {
					t.Errorf("two messages of key %q in one batch", r.Key)
				}
				seen[r.Key] = true
				if r.Key == "bad" {
					errs[i] = errors.New("rejected")
					continue
				}
				got[r.Key] = append(got[r.Key], string(r.Payload))
			}
			return errs
		})
		want := map[string][]string{}
		send := func(key string, n int) {
			tx, err := pool.Begin(ctx)
			require.NoError(t, err)
			for i := range n {
				_, err := o.Enqueue(ctx, tx, outbox.Message{Topic: "t", Key: key, Payload: []byte(fmt.Sprint(i))})
				require.NoError(t, err)
				if key != "bad" {
					want[key] = append(want[key], fmt.Sprint(i))
				}
			}
			require.NoError(t, tx.Commit(ctx))
		}
		send("bad", 200) // its head dies at once; 199 wait behind it
		send("hot", 100)
		for i := range 30 {
			send(fmt.Sprint("cold", i), 2)
		}
		r, err := o.NewRelay(pool, pub, outbox.RelayConfig{BatchSize: 8, PollInterval: 10 * time.Millisecond, MaxAttempts: 1, Logger: quiet(t)})
		require.NoError(t, err)
		done := make(chan struct{})
		go func() { defer close(done); _ = r.Run(ctx) }()
		defer func() { require.NoError(t, r.Shutdown(ctx)); <-done }()
		require.Eventually(t, func() bool {
			s, err := o.Stats(ctx, pool, "")
			require.NoError(t, err)
			return s.Pending == 200
		}, 20*time.Second, 10*time.Millisecond, "everything but the dead key drains")
		mu.Lock()
		defer mu.Unlock()
		assert.Equal(t, want, got, "every other key delivered once, in order")
		dead, err := o.DeadLetters(ctx, pool, "", 10)
		require.NoError(t, err)
		require.Len(t, dead, 1)
		assert.Equal(t, 199, dead[0].Waiting)
	})
}

// Rows edited by hand into something the relay cannot publish hold back
// their own key only: headers that are not an object of strings (or an
// empty topic) make the row a dead letter at once, without a publish, and
// the operator can list and skip it; a row whose bucket was edited out of
// range is never published (no lease fences its acknowledgement, so it
// would be published again and again).
func TestHandEditedRowsHoldOnlyTheirKey(t *testing.T) {
	forEachLayout(t, func(t *testing.T, partitions int) {
		pool, o := setup(t, outbox.Config{Buckets: 4, Partitions: partitions})
		ctx := tctx(t, 30*time.Second)
		var mu sync.Mutex
		published := map[string]int{}
		pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
			mu.Lock()
			defer mu.Unlock()
			for _, r := range b {
				published[r.Key+":"+string(r.Payload)]++
			}
			return make([]error, len(b))
		})
		enq := func(key, payload string) uuid.UUID {
			id, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: key, Payload: []byte(payload), Headers: map[string]string{"h": "v"}})
			require.NoError(t, err)
			return id
		}
		table := o.Config().Schema + "." + o.Config().Table
		edit := func(id uuid.UUID, set string) {
			_, err := pool.Exec(ctx, `UPDATE `+table+` SET `+set+` WHERE id = $1`, id)
			require.NoError(t, err)
		}
		badHeaders := enq("a", "1")
		enq("a", "2")
		edit(badHeaders, `headers = '[1, 2, 3]'`)
		noTopic := enq("b", "1")
		edit(noTopic, `topic = ''`)
		outOfRange := enq("c", "1")
		if partitions > 1 {
			// A partitioned table has no place for such a row at all.
			_, err := pool.Exec(ctx, `UPDATE `+table+` SET bucket = 9999 WHERE id = $1`, outOfRange)
			require.ErrorContains(t, err, "no partition")
			_, err = pool.Exec(ctx, `DELETE FROM `+table+` WHERE id = $1`, outOfRange)
			require.NoError(t, err)
		} else {
			edit(outOfRange, `bucket = 9999`)
		}
		for i := range 10 {
			enq(fmt.Sprint("good", i), "1")
		}

		r, err := o.NewRelay(pool, pub, outbox.RelayConfig{PollInterval: 10 * time.Millisecond, Logger: quiet(t)})
		require.NoError(t, err)
		done := make(chan struct{})
		go func() { defer close(done); _ = r.Run(ctx) }()
		defer func() { require.NoError(t, r.Shutdown(ctx)); <-done }()

		var dead []outbox.DeadLetter
		require.Eventually(t, func() bool {
			mu.Lock()
			good := 0
			for i := range 10 {
				good += published[fmt.Sprint("good", i)+":1"]
			}
			mu.Unlock()
			dead, err = o.DeadLetters(ctx, pool, "", 10)
			require.NoError(t, err)
			return good == 10 && len(dead) == 2
		}, 10*time.Second, 10*time.Millisecond, "the other keys flow; the two broken rows are dead letters")
		byID := map[uuid.UUID]outbox.DeadLetter{}
		for _, d := range dead {
			byID[d.ID] = d
		}
		assert.Contains(t, byID[badHeaders].LastError, "not published: headers are not a JSON object of strings")
		assert.Equal(t, 1, byID[badHeaders].Waiting, "a:2 waits behind it")
		assert.Nil(t, byID[badHeaders].Headers)
		assert.Equal(t, "[1, 2, 3]", byID[badHeaders].RawHeaders, "what made it dead is shown as stored")
		assert.Contains(t, byID[noTopic].LastError, "not published: the topic is empty")
		time.Sleep(200 * time.Millisecond) // many cycles
		mu.Lock()
		assert.Zero(t, published["a:1"]+published["a:2"]+published["b:1"], "nothing of the broken keys was published")
		assert.Zero(t, published["c:1"], "the row outside every bucket is not published")
		mu.Unlock()

		rec, err := o.SkipDead(ctx, pool, badHeaders)
		require.NoError(t, err, "a dead letter with broken headers can be skipped, and is returned")
		assert.Equal(t, badHeaders, rec.ID)
		assert.Equal(t, "[1, 2, 3]", rec.RawHeaders, "the operator's record keeps the broken headers")
		require.Eventually(t, func() bool {
			mu.Lock()
			defer mu.Unlock()
			return published["a:2"] == 1
		}, 5*time.Second, 10*time.Millisecond, "the key flows again once the broken row is skipped")
	})
}
