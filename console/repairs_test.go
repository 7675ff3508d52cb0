package console_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
)

func TestRepairBacklogAndDeadLetters(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	walk(t, e)
	ob, err := outbox.New(outbox.Config{Schema: e.store.Schema(), Buckets: 4})
	require.NoError(t, err)
	require.NoError(t, ob.Install(ctx(t), e.pool))
	topic := dualwrite.RepairTopic("orders")
	var accept atomic.Bool
	pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
		errs := make([]error, len(b))
		for i, r := range b {
			if (r.Key == "order-7" && !accept.Load()) || r.Key == "user-1" {
				errs[i] = errors.New("new store rejected the row")
			}
		}
		return errs
	})
	enqueue := func(topic, key string, n int) {
		tx, err := e.pool.Begin(ctx(t))
		require.NoError(t, err)
		for range n {
			_, err = ob.Enqueue(ctx(t), tx, outbox.Message{Topic: topic, Key: key, Payload: []byte(`{"id":7}`)})
			require.NoError(t, err)
		}
		require.NoError(t, tx.Commit(ctx(t)))
	}
	enqueue(topic, "order-7", 3) // the first dies, two wait behind it
	enqueue(topic, "order-8", 1)
	enqueue("dimmer.repair.users", "user-1", 1) // another migration's
	relay, err := ob.NewRelay(e.pool, pub, outbox.RelayConfig{PollInterval: 10 * time.Millisecond, MaxAttempts: 1, Logger: quiet})
	require.NoError(t, err)
	rctx, stop := context.WithCancel(ctx(t))
	done := make(chan struct{})
	go func() { defer close(done); _ = relay.Run(rctx) }()
	t.Cleanup(func() { stop(); <-done })
	pending := func(topic string) outbox.Stats {
		st, err := ob.TopicStats(ctx(t), e.pool, topic)
		require.NoError(t, err)
		return st
	}
	require.Eventually(t, func() bool { return pending(topic).Pending == 3 && pending(topic).Dead == 1 }, 20*time.Second, 10*time.Millisecond)

	srv, err := console.New(e.ctrl, e.store, token, console.WithActions(), console.WithRepairs(console.OutboxRepairs(ob, e.pool)), console.WithLogger(quiet))
	require.NoError(t, err)
	e.http = httptest.NewServer(srv)
	t.Cleanup(e.http.Close)

	m := migrationData(t, e)
	require.NotNil(t, m.Repairs)
	assert.Equal(t, topic, m.Repairs.Topic)
	assert.Equal(t, int64(3), m.Repairs.Pending)
	assert.Equal(t, int64(1), m.Repairs.Dead)
	require.Len(t, m.Repairs.DeadLetters, 1)
	d := m.Repairs.DeadLetters[0]
	assert.Equal(t, "order-7", d.Key)
	assert.Equal(t, 2, d.Waiting)
	assert.Contains(t, d.LastError, "new store rejected the row")
	assert.Contains(t, alertTexts(m.Alerts), "1 dead letters in the repair log dimmer.repair.orders: retry or skip them")

	act := func(action string, form url.Values) response {
		return e.do(t, nil, "POST", "/m/orders/"+action, form, true, nil)
	}
	// users' dead letter is not orders' to touch.
	require.Eventually(t, func() bool { return pending("dimmer.repair.users").Dead == 1 }, 20*time.Second, 10*time.Millisecond)
	other, err := ob.DeadLetters(ctx(t), e.pool, "dimmer.repair.users", 10)
	require.NoError(t, err)
	r := act("dead-skip", url.Values{"id": {other[0].ID.String()}, "reason": {"wrong page"}})
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.Equal(t, int64(1), pending("dimmer.repair.users").Dead, "nothing skipped")
	r = act("dead-retry", url.Values{"id": {"not-a-uuid"}, "reason": {"x"}})
	assert.Equal(t, http.StatusBadRequest, r.status)

	accept.Store(true)
	r = act("dead-retry", url.Values{"id": {d.ID}, "reason": {"new store fixed"}})
	require.Equal(t, http.StatusOK, r.status, r.body)
	require.Eventually(t, func() bool { return pending(topic).Pending == 0 }, 20*time.Second, 10*time.Millisecond,
		"the retried letter and the two it held back are delivered")

	r = act("dead-skip", url.Values{"id": {d.ID}, "reason": {"again"}})
	assert.Equal(t, http.StatusBadRequest, r.status, "no longer a dead letter")
	accept.Store(false)
	enqueue(topic, "order-7", 1)
	require.Eventually(t, func() bool { return pending(topic).Dead == 1 }, 20*time.Second, 10*time.Millisecond)
	dead, err := ob.DeadLetters(ctx(t), e.pool, topic, 10)
	require.NoError(t, err)
	r = act("dead-skip", url.Values{"id": {dead[0].ID.String()}, "reason": {"row was deleted since"}})
	require.Equal(t, http.StatusOK, r.status, r.body)
	assert.Contains(t, r.body, "(key order-7) skipped")
	assert.Equal(t, int64(0), pending(topic).Pending)

	// The retry and the skip are on the migration's timeline, with the
	// operator and the reason; the refused attempts are not.
	var actions []flags.AuditEntry
	for _, a := range e.audit(t, "orders") {
		if a.Outcome == console.ActionOutcome {
			actions = append(actions, a)
		}
	}
	require.Len(t, actions, 2)
	assert.Equal(t, "dead letter "+dead[0].ID.String(), actions[0].From)
	assert.Equal(t, "skipped (key order-7)", actions[0].To)
	assert.Equal(t, "row was deleted since", actions[0].Reason)
	assert.Equal(t, "dead letter "+d.ID, actions[1].From)
	assert.Equal(t, "retried", actions[1].To)
	assert.Equal(t, "new store fixed", actions[1].Reason)
	assert.Equal(t, "token (console)", actions[1].Actor)
	m = migrationData(t, e)
	assert.Equal(t, "skipped (key order-7)", m.Timeline[0].To)
}
