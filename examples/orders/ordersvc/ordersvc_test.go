package ordersvc_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/chaos"
	"github.com/dimmer-dev/dimmer/examples/orders/ordersvc"
	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
)

func setup(t *testing.T) (*ordersvc.Shared, *ordersvc.Instance, *chaos.Injector, *flags.Controller) {
	t.Helper()
	ctx := t.Context()
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	schema := "dimmer_orders_test_" + hex.EncodeToString(b)
	cfg, err := pgxpool.ParseConfig(url)
	require.NoError(t, err)
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		if os.Getenv("CI") == "true" {
			t.Fatalf("Postgres unavailable: %v", err)
		}
		t.Skipf("Postgres unavailable: %v", err)
	}
	_, err = pool.Exec(ctx, "CREATE SCHEMA "+schema)
	require.NoError(t, err)
	t.Cleanup(func() {
		_, _ = pool.Exec(context.Background(), "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
		pool.Close()
	})
	quiet := slog.New(slog.DiscardHandler)
	shared, err := ordersvc.Open(pool, schema, quiet)
	require.NoError(t, err)
	require.NoError(t, shared.Install(ctx))
	wd := flags.WatchdogConfig{Window: time.Second, MinSamples: 1000}
	ctrl, err := flags.NewController(shared.Flags, flags.WithGuards(shared.Guards(wd)...))
	require.NoError(t, err)

	// A build needing the new tables refuses to start before expand.
	_, err = ordersvc.Start(ctx, shared, ordersvc.Config{ID: "too-early", Controller: ctrl, Watchdog: wd, Logger: quiet})
	var inc *expandcontract.IncompatibleError
	require.ErrorAs(t, err, &inc)

	_, err = shared.Registry.Expand(ctx, ordersvc.Migration, expandcontract.Request{Actor: "test"})
	require.NoError(t, err)
	faults, err := chaos.NewInjector("new")
	require.NoError(t, err)
	in, err := ordersvc.Start(ctx, shared, ordersvc.Config{ID: "test", Controller: ctrl, Watchdog: wd, NewFaults: faults, Logger: quiet})
	require.NoError(t, err)
	t.Cleanup(func() { _ = in.Close(context.Background()) })
	return shared, in, faults, ctrl
}

func do(t *testing.T, h http.Handler, method, path, body string) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, path, strings.NewReader(body)))
	return rec
}

// The API on the legacy table (off), bad input named, then dual writes in
// dualwrite where a failed new-side write is a repair the relay replays.
func TestAPIAndRepairs(t *testing.T) {
	t.Parallel()
	shared, in, faults, ctrl := setup(t)
	ctx := t.Context()
	h := in.Handler()

	rec := do(t, h, "POST", "/orders", `{"customer_id":"c1","lines":[{"sku":"tea","qty":2,"price_cents":350}]}`)
	require.Equal(t, http.StatusCreated, rec.Code, rec.Body.String())
	assert.Equal(t, "off", rec.Header().Get(ordersvc.HeaderStage))
	id := between(rec.Body.String(), `"id":"`, `"`)
	rec = do(t, h, "POST", "/orders/"+id+"/lines", `{"sku":"cake","qty":1,"price_cents":420}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	assert.Contains(t, rec.Body.String(), `"total_cents":1120`)
	assert.Contains(t, rec.Body.String(), `"version":2`)
	rec = do(t, h, "GET", "/customers/c1/orders", "")
	assert.Contains(t, rec.Body.String(), `"sku":"cake"`)

	for _, c := range []struct{ path, body, want string }{
		{"/orders", `{"customer_id":"","lines":[]}`, "customer_id: is required"},
		{"/orders", `{"customer_id":"c1","lines":[{"sku":"x","qty":0}]}`, "lines[0].qty: must be positive, got 0"},
		{"/orders", `{"customer_id":"c1","colour":"red"}`, "malformed JSON body"},
		{"/orders/" + id + "/lines", `{"sku":"","qty":1}`, "sku: is required"},
	} {
		rec := do(t, h, "POST", c.path, c.body)
		assert.Equal(t, http.StatusBadRequest, rec.Code, c.body)
		assert.Contains(t, rec.Body.String(), c.want)
	}
	assert.Equal(t, http.StatusNotFound, do(t, h, "GET", "/orders/00000000-0000-0000-0000-000000000000", "").Code)
	assert.Equal(t, http.StatusNotFound, do(t, h, "GET", "/orders/not-a-uuid", "").Code)

	// dualwrite: the new side is down; the caller sees no error and the
	// write becomes a repair, replayed once the new side is back.
	_, err := ctrl.Set(ctx, flags.Request{Migration: ordersvc.Migration, Stage: flags.DualWrite, Actor: "test", Reason: "test"})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return in.Stage(ctx, id) == flags.DualWrite }, 5*time.Second, 20*time.Millisecond)
	faults.Down(true, nil)
	rec = do(t, h, "POST", "/orders/"+id+"/lines", `{"sku":"jam","qty":3,"price_cents":100}`)
	require.Equal(t, http.StatusOK, rec.Code, rec.Body.String())
	st, err := shared.Repairs.Stats(ctx, shared.Pool, "")
	require.NoError(t, err)
	assert.Positive(t, st.Pending, "the missed write is a pending repair")
	var n int
	require.NoError(t, shared.Pool.QueryRow(ctx, `SELECT count(*) FROM order_lines WHERE order_id = $1`, id).Scan(&n))
	assert.Zero(t, n, "the new side missed the write")
	faults.Heal()
	require.Eventually(t, func() bool {
		var v int64
		err := shared.Pool.QueryRow(ctx, `SELECT version FROM orders WHERE id = $1`, id).Scan(&v)
		return err == nil && v == 3
	}, 15*time.Second, 50*time.Millisecond, "the repair relay brings the new side up to date")
	var lines []string
	rows, err := shared.Pool.Query(ctx, `SELECT sku FROM order_lines WHERE order_id = $1 ORDER BY line_no`, id)
	require.NoError(t, err)
	lines, err = pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Equal(t, []string{"tea", "cake", "jam"}, lines)
}

func between(s, from, to string) string {
	_, rest, _ := strings.Cut(s, from)
	v, _, _ := strings.Cut(rest, to)
	return v
}
