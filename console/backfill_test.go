package console_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/console"
)

func TestBackfillProgressAndPauseResume(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	walk(t, e)
	schema := e.store.Schema()
	_, err := e.pool.Exec(ctx(t), `CREATE TABLE orders (id bigint PRIMARY KEY, cents bigint, version bigint NOT NULL);
CREATE TABLE orders_v2 (id bigint PRIMARY KEY, amount numeric, version bigint NOT NULL);
INSERT INTO orders SELECT g, g * 100, 1 FROM generate_series(1, 500) g`)
	require.NoError(t, err)
	bf, err := backfill.New(e.pool, backfill.WithSchema(schema), backfill.WithFlagStore(e.store), backfill.WithLogger(quiet))
	require.NoError(t, err)
	require.NoError(t, bf.Install(ctx(t)))
	job := backfill.Job{Name: "orders-v2", Migration: "orders", Spec: backfill.Spec{
		Source: backfill.Table{Schema: schema, Name: "orders"}, Target: backfill.Table{Schema: schema, Name: "orders_v2"},
		Key: []string{"id"}, Columns: []string{"id", "amount", "version"}, Exprs: map[string]string{"amount": "cents / 100.0"},
		VersionColumn: "version",
	}}
	_, err = bf.Run(ctx(t), job)
	require.NoError(t, err)
	_, err = bf.Verify(ctx(t), job, backfill.VerifyOptions{})
	require.NoError(t, err)

	srv, err := console.New(e.ctrl, e.store, token, console.WithActions(), console.WithBackfills(bf), console.WithLogger(quiet))
	require.NoError(t, err)
	e.http = httptest.NewServer(srv)
	t.Cleanup(e.http.Close)

	m := migrationData(t, e)
	require.Len(t, m.Backfills, 1)
	b := m.Backfills[0]
	assert.Equal(t, "orders-v2", b.Name)
	assert.True(t, b.Done)
	assert.Equal(t, "done", b.State)
	assert.Equal(t, int64(500), b.RowsDone)
	assert.InDelta(t, 100, b.Percent, 1e-9)
	assert.True(t, b.VerifiedOK)
	assert.False(t, b.Stale)
	assert.True(t, strings.HasPrefix(b.Verified, "ok at epoch 0"), b.Verified)

	act := func(action string, form url.Values) response {
		return e.do(t, nil, "POST", "/m/orders/"+action, form, true, map[string]string{"X-Dimmer-Operator": "bob"})
	}
	r := act("backfill-pause", url.Values{"job": {"orders-v2"}, "reason": {"db is hot"}})
	require.Equal(t, http.StatusOK, r.status, r.body)
	assert.Contains(t, r.body, "backfill orders-v2 paused")
	st, err := bf.Status(ctx(t), "orders-v2")
	require.NoError(t, err)
	assert.True(t, st.Paused)
	assert.Equal(t, "db is hot (bob (console))", st.PauseReason, "the operator is recorded with the reason")
	m = migrationData(t, e)
	assert.True(t, m.Backfills[0].Paused)
	assert.Contains(t, alertTexts(m.Alerts), "backfill orders-v2 is paused: db is hot (bob (console))")

	r = act("backfill-resume", url.Values{"job": {"orders-v2"}, "reason": {"quiet again"}})
	require.Equal(t, http.StatusOK, r.status, r.body)
	st, err = bf.Status(ctx(t), "orders-v2")
	require.NoError(t, err)
	assert.False(t, st.Paused)

	// Both are in the migration's audit log and on its timeline, with who
	// and why; the refused attempts below are not.
	audit := e.audit(t, "orders")
	require.GreaterOrEqual(t, len(audit), 2)
	for i, want := range []struct{ to, reason string }{{"resumed", "quiet again"}, {"paused", "db is hot"}} {
		got := audit[i]
		assert.Equal(t, console.ActionOutcome, got.Outcome)
		assert.Equal(t, "backfill orders-v2", got.From)
		assert.Equal(t, want.to, got.To)
		assert.Equal(t, "bob (console)", got.Actor)
		assert.Equal(t, want.reason, got.Reason)
		assert.Equal(t, e.state(t, "orders").Revision, got.Revision)
	}
	m = migrationData(t, e)
	assert.Equal(t, "resumed", m.Timeline[0].To)
	assert.Contains(t, e.do(t, nil, "GET", "/m/orders", nil, true, nil).body, `<span class="move">backfill orders-v2 → paused</span> by <span class="actor">bob (console)</span>: <span class="reason">db is hot</span>`)

	r = act("backfill-pause", url.Values{"job": {"users-v2"}, "reason": {"x"}})
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.Contains(t, r.body, `orders has no backfill job &#34;users-v2&#34;`)
	r = act("backfill-pause", url.Values{"job": {"orders-v2"}})
	assert.Equal(t, http.StatusBadRequest, r.status, "a reason is required")

	page := e.do(t, nil, "GET", "/m/orders", nil, true, nil)
	assert.Contains(t, page.body, `id="backfill"`)
	var ov console.Overview
	r = e.do(t, nil, "GET", "/api/overview", nil, true, nil)
	require.NoError(t, json.Unmarshal([]byte(r.body), &ov))
	assert.Empty(t, ov.BackfillError)
	assert.Len(t, e.audit(t, "orders"), len(audit), "refused and invalid actions add nothing")
}
