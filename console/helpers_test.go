package console_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

const token = "test-token-0123456789abcdef"

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// env is a console over a fresh Postgres flag store, with the CLI's fleet
// barrier and fleet health guard.
type env struct {
	pool  *pgxpool.Pool
	store *pgflags.Store
	ctrl  *flags.Controller
	srv   *console.Server
	http  *httptest.Server
}

func newEnv(t testing.TB, opts ...console.Option) *env {
	t.Helper()
	pool, schema := dimmertest.Schema(t)
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema), pgflags.WithLogger(quiet))
	require.NoError(t, err)
	require.NoError(t, store.Install(ctx(t)))
	// As dimmer ui does: the guards and the console share one read of the
	// fleet per data request.
	fleet := console.ShareFleet(store)
	ctrl, err := flags.NewController(store, flags.WithFleet(fleet),
		flags.WithGuards(flags.HealthGuard(fleet, flags.WatchdogConfig{MinSamples: 100})),
		flags.WithControllerLogger(quiet))
	require.NoError(t, err)
	srv, err := console.New(ctrl, fleet, token, append([]console.Option{console.WithLogger(quiet)}, opts...)...)
	require.NoError(t, err)
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	return &env{pool: pool, store: store, ctrl: ctrl, srv: srv, http: hs}
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// beat registers an instance that applied revision rev of migration, with
// optional watchdog windows as attributes.
func (e *env) beat(t testing.TB, id, migration string, rev int64, attrs map[string]string) {
	t.Helper()
	require.NoError(t, e.store.Heartbeat(ctx(t), flags.Instance{
		ID: id, Build: "v1.2.3", Applied: map[string]int64{migration: rev}, Attributes: attrs,
		StartedAt: time.Now().Add(-time.Hour), SeenAt: time.Now(),
	}, time.Minute))
}

// health is the attribute a watchdog publishes for a migration's stage.
func health(migration string, stage flags.Stage, h flags.Health) map[string]string {
	b, _ := json.Marshal(h)
	return map[string]string{"dimmer.health/" + migration + "/" + stage.String(): string(b)}
}

type response struct {
	status int
	body   string
	header http.Header
}

// do sends a request with the bearer token when bearer is true.
func (e *env) do(t testing.TB, client *http.Client, method, path string, form url.Values, bearer bool, hdr map[string]string) response {
	t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequestWithContext(ctx(t), method, e.http.URL+path, body)
	require.NoError(t, err)
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	if bearer {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	if client == nil {
		client = e.http.Client()
	}
	resp, err := client.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return response{resp.StatusCode, string(b), resp.Header}
}

// login returns a client holding a session cookie for operator.
func (e *env) login(t *testing.T, operator string) *http.Client {
	t.Helper()
	jar, err := cookiejar.New(nil)
	require.NoError(t, err)
	c := e.http.Client()
	c.Jar = jar
	r := e.do(t, c, "POST", "/login", url.Values{"token": {token}, "operator": {operator}, "next": {"/"}}, false, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	return c
}

func (e *env) state(t *testing.T, migration string) flags.State {
	t.Helper()
	st, err := e.store.Load(ctx(t), migration)
	require.NoError(t, err)
	return st
}

func (e *env) audit(t *testing.T, migration string) []flags.AuditEntry {
	t.Helper()
	a, err := e.store.Audit(ctx(t), migration, 0)
	require.NoError(t, err)
	return a
}
