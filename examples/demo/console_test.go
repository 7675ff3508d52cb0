package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"os"
	"regexp"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/examples/orders/ordersvc"
	"github.com/dimmer-dev/dimmer/flags"
)

// The demo's console is wired as dimmer ui: its chart samples are kept in
// the demo's schema, so a console started again draws what the one before
// it sampled, and the store's changes reach the pages as events.
func TestConsoleKeepsItsChartsAcrossARestart(t *testing.T) {
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	schema := "dimmer_demo_console_" + randomHex(4)
	cfg, err := pgxpool.ParseConfig(url)
	require.NoError(t, err)
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	if err := pool.Ping(ctx); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("Postgres unavailable at %s: %v", url, err)
		}
		t.Skipf("Postgres unavailable at %s: %v", url, err)
	}
	_, err = pool.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize())
	require.NoError(t, err)
	t.Cleanup(func() {
		_, err := pool.Exec(context.Background(), "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
		assert.NoError(t, err)
	})
	var out bytes.Buffer
	d := &demo{out: &out, start: time.Now(), pool: pool}
	d.shared, err = ordersvc.Open(pool, schema, slog.New(slog.DiscardHandler))
	require.NoError(t, err)
	require.NoError(t, d.shared.Install(ctx))
	d.shared.Fleet = console.ShareFleet(d.shared.Flags)
	d.wd = flags.WatchdogConfig{Window: time.Second, MinSamples: 10}
	d.ctrl, err = flags.NewController(d.shared.Flags, flags.WithFleet(d.shared.Fleet), flags.WithGuards(d.shared.Guards(d.wd)...), flags.WithControllerLogger(slog.New(slog.DiscardHandler)))
	require.NoError(t, err)
	_, err = d.ctrl.Set(ctx, flags.Request{Migration: ordersvc.Migration, Stage: flags.DualWrite, Actor: "test", Reason: "a migration to chart", Force: true})
	require.NoError(t, err)
	t.Setenv("DIMMER_DEMO_UI", "127.0.0.1:0")
	t.Setenv("DIMMER_UI_TOKEN", "console-test-token-0123456789")

	stop, err := d.serveConsole(ctx)
	require.NoError(t, err)
	stored := func() (n int) {
		require.NoError(t, pool.QueryRow(ctx, "SELECT count(*) FROM console_samples WHERE migration = $1", ordersvc.Migration).Scan(&n))
		return n
	}
	require.Eventually(t, func() bool { return stored() >= 2 }, 10*time.Second, 50*time.Millisecond, "the sampler stores its samples")
	stop()

	restarted := time.Now()
	stop, err = d.serveConsole(ctx)
	require.NoError(t, err)
	defer stop()
	addrs := regexp.MustCompile(`console: (http://\S+/)`).FindAllStringSubmatch(out.String(), -1)
	require.Len(t, addrs, 2, out.String())
	get := func(path string) *http.Response {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, addrs[1][1]+path, nil)
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer console-test-token-0123456789")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		return resp
	}
	resp := get("api/m/" + ordersvc.Migration)
	var m struct {
		History []console.Sample `json:"history"`
	}
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&m))
	resp.Body.Close()
	require.NotEmpty(t, m.History)
	assert.True(t, m.History[0].At.Before(restarted), "the restarted console draws the samples of the one before it: %v", m.History)

	ectx, ecancel := context.WithTimeout(ctx, time.Second)
	defer ecancel()
	req, err := http.NewRequestWithContext(ectx, http.MethodGet, addrs[1][1]+"api/events", nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer console-test-token-0123456789")
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode, "the store's changes are streamed to the pages")
}
