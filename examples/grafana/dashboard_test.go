package grafana_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http/httptest"
	"os"
	"regexp"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// Every metric the dashboard queries is served by the console, with the
// labels the dashboard groups by.
func TestDashboardQueriesServedMetrics(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("dimmer-migrations.json")
	require.NoError(t, err)
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	require.NoError(t, json.Unmarshal(raw, &dash))
	require.NotEmpty(t, dash.Panels)

	// A console over a store with a migration in a rollout and a fleet
	// publishing windows, so every series exists.
	ctx := context.Background()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	pool, schema := dimmertest.Schema(t)
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema), pgflags.WithLogger(quiet))
	require.NoError(t, err)
	require.NoError(t, store.Install(ctx))
	// Built as dimmer ui builds it: one fleet read per request, samples
	// kept in the store's schema.
	fleet := console.ShareFleet(store)
	samples, err := console.PostgresSamples(pool, schema)
	require.NoError(t, err)
	require.NoError(t, samples.Install(ctx))
	ctrl, err := flags.NewController(store, flags.WithFleet(fleet), flags.WithControllerLogger(quiet))
	require.NoError(t, err)
	// The fleet barrier lets the rollout through once an instance applied
	// the current revision.
	require.NoError(t, store.Heartbeat(ctx, flags.Instance{ID: "api-1", Applied: map[string]int64{"orders": 0}}, time.Minute))
	_, err = ctrl.Rollout(ctx, "orders", flags.DualWrite, 10, "alice", "canary")
	require.NoError(t, err)
	hb, _ := json.Marshal(flags.Health{Ops: 10, Errors: 1, Compared: 10, Mismatches: 2, Lasting: 1, P99: time.Millisecond})
	require.NoError(t, store.Heartbeat(ctx, flags.Instance{ID: "api-1", Applied: map[string]int64{"orders": 1},
		Attributes: map[string]string{"dimmer.health/orders/dualwrite": string(hb)}}, time.Minute))
	srv, err := console.New(ctrl, fleet, "dashboard-token-0123456789", console.WithLogger(quiet), console.WithSampleStore(samples))
	require.NoError(t, err)
	reg := prometheus.NewRegistry()
	exp, err := otelprom.New(otelprom.WithRegisterer(reg))
	require.NoError(t, err)
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
	defer mp.Shutdown(ctx)
	_, err = srv.RegisterMetrics(mp.Meter("github.com/dimmer-dev/dimmer/console"))
	require.NoError(t, err)
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	served := map[string]string{}
	for _, m := range regexp.MustCompile(`(?m)^(dimmer_\w+)\{([^}]*)\}`).FindAllStringSubmatch(rec.Body.String(), -1) {
		served[m[1]] = m[2]
	}
	require.NotEmpty(t, served, rec.Body.String())

	metricRE := regexp.MustCompile(`\b(dimmer_\w+)`)
	queried := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			for _, name := range metricRE.FindAllString(tg.Expr, -1) {
				queried++
				labels, ok := served[name]
				if assert.True(t, ok, "panel %q queries %s, which the console does not serve (served: %v)", p.Title, name, keys(served)) &&
					regexp.MustCompile(`migration=~"\$migration"`).MatchString(tg.Expr) {
					assert.Contains(t, labels, `migration="orders"`, "panel %q filters %s by migration", p.Title, name)
				}
			}
		}
	}
	assert.GreaterOrEqual(t, queried, 10)
}

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
