package console_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/internal/benchgoal"
)

// BenchmarkMigrationData times the data request of a migration page (GET
// /api/m/{name}: state, every check of the next step, fleet, health,
// timeline) and the live part an open page polls (GET /m/{name}?part=live,
// the same data rendered) against a Postgres store holding 50 live
// instances and 10,000 audit entries of the migration, growing during the
// run.
func BenchmarkMigrationData(b *testing.B) {
	e := newEnv(b)
	ctx := ctx(b)
	e.beat(b, "api-0", "orders", 0, nil)
	_, err := e.ctrl.Advance(ctx, "orders", "alice", "start")
	require.NoError(b, err)
	e.beat(b, "api-0", "orders", 1, nil)
	_, err = e.ctrl.Advance(ctx, "orders", "alice", "backfill verified")
	require.NoError(b, err)
	for i := range 50 {
		attrs := health("orders", flags.Shadow, flags.Health{Ops: 5000, Errors: 3, Compared: 5000, Mismatches: 9, Lasting: 1, P99: 4 * time.Millisecond})
		attrs["dimmer.schema/orders_email"] = "expanded..migrated"
		e.beat(b, fmt.Sprintf("api-%d", i), "orders", 2-int64(i%2), attrs)
	}
	// 10,000 refusals, each with its checks, as a long game day leaves.
	checks, err := json.Marshal([]flags.CheckResult{
		{Name: "one-step-forward", Passed: true, Detail: "no stage is skipped"},
		{Name: "fleet-acknowledged", Detail: "25 of 50 instances have not applied revision 2: api-1 at revision 1, api-3 at revision 1, ..."},
		{Name: "health", Passed: true, Detail: "ok"},
	})
	require.NoError(b, err)
	audit := pgx.Identifier{e.store.Schema(), "stage_audit"}.Sanitize()
	_, err = e.pool.Exec(ctx, `INSERT INTO `+audit+` (migration, at, entry)
SELECT 'orders', now() - make_interval(secs => 10000 - g), jsonb_build_object(
	'migration', 'orders', 'at', now() - make_interval(secs => 10000 - g), 'actor', 'bob (console)',
	'from', 'shadow', 'to', 'live', 'reason', 'retry ' || g, 'outcome', 'refused', 'revision', 2, 'checks', $1::jsonb)
FROM generate_series(1, 10000) g`, string(checks))
	require.NoError(b, err)
	n, err := e.store.Audit(ctx, "orders", 0)
	require.NoError(b, err)
	require.Len(b, n, 10002)

	// Each request in turn: the JSON data and the live part of the page
	// (what an open page polls, rendered by the templates).
	get := func(path string) time.Duration {
		start := time.Now()
		r := e.do(b, nil, "GET", path, nil, true, nil)
		d := time.Since(start)
		require.Equal(b, http.StatusOK, r.status, r.body)
		return d
	}
	const jsonPath, livePath = "/api/m/orders", "/m/orders?part=live"
	for range 10 { // warm the pools
		get(jsonPath)
		get(livePath)
	}
	const requests = 300
	data := make([]time.Duration, 0, requests)
	live := make([]time.Duration, 0, requests)
	b.ResetTimer()
	for i := range requests {
		if i%10 == 0 {
			// The log keeps growing during a game day: one request in ten
			// sees a new entry, so a fresh timeline is part of the p99.
			b.StopTimer()
			require.NoError(b, e.store.AppendAudit(ctx, flags.AuditEntry{Migration: "orders", Actor: "bob (console)",
				From: "shadow", To: "live", Reason: fmt.Sprintf("retry during the run %d", i), Outcome: flags.Refused, Revision: 2}))
			b.StartTimer()
		}
		if i%2 == 0 {
			data = append(data, get(jsonPath))
			live = append(live, get(livePath))
		} else {
			live = append(live, get(livePath))
			data = append(data, get(jsonPath))
		}
	}
	b.StopTimer()
	for _, m := range []struct {
		name, what string
		lat        []time.Duration
	}{{"console_migration_data_p99_ms", "data request", data}, {"console_migration_live_p99_ms", "live part of the page", live}} {
		slices.Sort(m.lat)
		p99 := m.lat[len(m.lat)*99/100]
		b.Logf("%s over %d requests: p50 %v, p99 %v, max %v", m.what, len(m.lat), m.lat[len(m.lat)/2], p99, m.lat[len(m.lat)-1])
		benchgoal.Report(b, m.name, float64(p99)/float64(time.Millisecond), "ms", benchgoal.AtMost, 50)
	}
}
