package main

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"regexp"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
)

func TestUIRefusesWithoutTokenOrOffLoopback(t *testing.T) {
	s := stores(t)["postgres"]
	t.Setenv("DIMMER_UI_TOKEN", "")
	r := dimmer(t, s.args, "ui")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "DIMMER_UI_TOKEN is not set")

	t.Setenv("DIMMER_UI_TOKEN", "short")
	r = dimmer(t, s.args, "ui", "--listen", "127.0.0.1:0")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "token has 5 characters")

	t.Setenv("DIMMER_UI_TOKEN", "cli-token-0123456789abcdef")
	r = dimmer(t, s.args, "ui", "--listen", "0.0.0.0:0")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "not a loopback address")
}

// Both stores push their changes to the pages (LISTEN/NOTIFY, pub/sub).
func TestUIServesUntilCancelled(t *testing.T) {
	for _, name := range []string{"postgres", "redis"} {
		t.Run(name, func(t *testing.T) { testUIServes(t, stores(t)[name]) })
	}
}

func testUIServes(t *testing.T, s struct {
	args  []string
	fleet flags.FleetStore
}) {
	register(t, s.fleet, "api-1", 0)
	require.Equal(t, exitOK, dimmer(t, s.args, "stage", "set", "orders", "dualwrite", "--reason", "start").code)
	const token = "cli-token-0123456789abcdef"
	t.Setenv("DIMMER_UI_TOKEN", token)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	go func() {
		code := run(ctx, append(append([]string{"--actor", "tester"}, s.args...), "ui", "--listen", "127.0.0.1:0"), pw, io.Discard)
		pw.Close()
		done <- code
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	require.NoError(t, err)
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	m := regexp.MustCompile(`http://127\.0\.0\.1:\d+/`).FindString(line)
	require.NotEmpty(t, m, line)
	assert.Contains(t, line, "read-only")

	req, err := http.NewRequest("GET", m+"api/m/orders", nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Contains(t, string(body), `"describe":"dualwrite"`)

	// The store's notifications reach the pages as server-sent events.
	req, err = http.NewRequest("GET", m+"api/events", nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	assert.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"))
	first, err := bufio.NewReader(resp.Body).ReadString('\n')
	require.NoError(t, err)
	assert.Equal(t, "retry: 2000\n", first)
	resp.Body.Close()

	req, err = http.NewRequest("GET", m+"metrics", nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Regexp(t, `(?m)^dimmer_migration_stage\{.*migration="orders".*\} 1$`, string(body))
	assert.Regexp(t, `(?m)^dimmer_fleet_instances\{.*\} 1$`, string(body))

	cancel()
	select {
	case code := <-done:
		assert.Equal(t, exitOK, code, "a cancelled console shuts down cleanly")
	case <-time.After(10 * time.Second):
		t.Fatal("dimmer ui did not stop after its context ended")
	}
}

// Where the slot registry exists, the console shows the slots with an alert
// past --max-retained-wal, and their gauges on /metrics.
func TestUIShowsReplicationSlots(t *testing.T) {
	url := dimmertest.LogicalDatabase(t)
	pool := dimmertest.Pool(t, url)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := stores(t)["postgres"]
	schema := s.args[slices.Index(s.args, "--schema")+1] // the registry is in --schema, as for dimmer cdc
	slot := dimmertest.Name("s_")
	require.NoError(t, cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: slot, Purpose: "relay", Schema: schema}))
	t.Cleanup(func() { assert.NoError(t, cdc.DropSlot(context.Background(), pool, schema, slot, true)) })
	_, err := pool.Exec(ctx, `CREATE TABLE filler AS SELECT i, repeat('x', 100) AS pad FROM generate_series(1, 1000) i`)
	require.NoError(t, err)

	const token = "cli-token-0123456789abcdef"
	t.Setenv("DIMMER_UI_TOKEN", token)
	t.Setenv("DIMMER_CDC_DB", url)
	pr, pw := io.Pipe()
	done := make(chan int, 1)
	go func() {
		code := run(ctx, append(s.args, "ui", "--listen", "127.0.0.1:0", "--max-retained-wal", "1024"), pw, io.Discard)
		pw.Close()
		done <- code
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	require.NoError(t, err)
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	base := regexp.MustCompile(`http://127\.0\.0\.1:\d+/`).FindString(line)
	require.NotEmpty(t, base, line)
	get := func(path string) string {
		req, err := http.NewRequest("GET", base+path, nil)
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
		return string(body)
	}
	ov := get("api/overview")
	assert.Contains(t, ov, `"slot":"`+slot+`"`)
	assert.Regexp(t, `"level":"critical","text":"replication slot `+slot+` retains [^"]+ of WAL \(bound 1\.0 KiB`, ov)
	assert.Regexp(t, `(?m)^dimmer_cdc_slot_retained_bytes\{.*slot="`+slot+`".*\} [1-9]`, get("metrics"))

	cancel()
	select {
	case code := <-done:
		assert.Equal(t, exitOK, code)
	case <-time.After(10 * time.Second):
		t.Fatal("dimmer ui did not stop after its context ended")
	}
}
