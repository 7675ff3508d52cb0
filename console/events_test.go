package console_test

import (
	"bufio"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/open-feature/go-sdk/openfeature"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/flags/redisflags"
)

// A stage change reaches an open page's event stream through the store's
// notification, without waiting for the next poll; the stream ends when
// Run does.
func TestEventsAnnounceStageChanges(t *testing.T) {
	t.Parallel()
	base := newEnv(t)
	prov, err := pgflags.NewProvider(base.pool, pgflags.WithSchema(base.store.Schema()), pgflags.WithLogger(quiet))
	require.NoError(t, err)
	require.NoError(t, prov.InitWithContext(ctx(t), openfeature.EvaluationContext{}))
	t.Cleanup(prov.Shutdown)
	srv, err := console.New(base.ctrl, base.store, token, console.WithLogger(quiet),
		console.WithRefresh(time.Hour), console.WithChanges(prov.EventChannel()))
	require.NoError(t, err)
	e := base
	e.http = httptest.NewServer(srv)
	t.Cleanup(e.http.Close)

	page := e.do(t, nil, "GET", "/", nil, true, nil)
	assert.Contains(t, page.body, `data-events="/api/events"`)
	assert.Equal(t, http.StatusUnauthorized, e.do(t, nil, "GET", "/api/events", nil, false, nil).status)

	runCtx, stop := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- srv.Run(runCtx) }()
	defer func() { stop(); <-ran }()

	req, err := http.NewRequestWithContext(ctx(t), "GET", e.http.URL+"/api/events", nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := e.http.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	lines := make(chan string, 16)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	next := func() (string, bool) {
		select {
		case l, ok := <-lines:
			return l, ok
		case <-time.After(10 * time.Second):
			t.Fatal("no event within 10s")
			return "", false
		}
	}
	l, _ := next()
	require.Equal(t, "retry: 3600000", l, "the stream opens with the reconnect delay")

	e.beat(t, "api-0", "orders", 0, nil)
	_, err = e.ctrl.Advance(ctx(t), "orders", "alice", "start")
	require.NoError(t, err)
	for {
		l, ok := next()
		require.True(t, ok, "stream ended before the change")
		if l == "event: change" {
			l, _ = next()
			assert.Equal(t, `data: ["orders"]`, l)
			break
		}
	}

	stop()
	for {
		l, ok := next()
		if !ok {
			break
		}
		assert.True(t, l == "" || strings.HasPrefix(l, ":") || strings.HasPrefix(l, "event:") || strings.HasPrefix(l, "data:"), l)
	}
}

// A Redis store pushes its changes too: its provider follows the store's
// pub/sub channel, and the console streams them like Postgres's.
func TestEventsFromARedisStore(t *testing.T) {
	t.Parallel()
	client, prefix := dimmertest.Redis(t)
	store, err := redisflags.NewStore(client, redisflags.WithPrefix(prefix), redisflags.WithLogger(quiet))
	require.NoError(t, err)
	ctrl, err := flags.NewController(store, flags.WithControllerLogger(quiet))
	require.NoError(t, err)
	prov, err := redisflags.NewProvider(client, redisflags.WithPrefix(prefix), redisflags.WithLogger(quiet))
	require.NoError(t, err)
	require.NoError(t, prov.InitWithContext(ctx(t), openfeature.EvaluationContext{}))
	t.Cleanup(prov.Shutdown)
	srv, err := console.New(ctrl, store, token, console.WithLogger(quiet),
		console.WithRefresh(time.Hour), console.WithChanges(prov.EventChannel()))
	require.NoError(t, err)
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)

	runCtx, stop := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- srv.Run(runCtx) }()
	defer func() { stop(); <-ran }()
	req, err := http.NewRequestWithContext(ctx(t), "GET", hs.URL+"/api/events", nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := hs.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	sc := bufio.NewScanner(resp.Body)
	require.True(t, sc.Scan())
	require.Equal(t, "retry: 3600000", sc.Text())

	// No poll happens within the hour: only the pushed event can arrive.
	_, err = ctrl.Set(ctx(t), flags.Request{Migration: "orders", Stage: flags.DualWrite, Actor: "alice", Reason: "start"})
	require.NoError(t, err)
	got := make(chan string, 1)
	go func() {
		for sc.Scan() {
			if sc.Text() == "event: change" && sc.Scan() {
				got <- sc.Text()
				return
			}
		}
	}()
	select {
	case l := <-got:
		assert.Equal(t, `data: ["orders"]`, l)
	case <-time.After(10 * time.Second):
		t.Fatal("no change event within 10s")
	}
}
