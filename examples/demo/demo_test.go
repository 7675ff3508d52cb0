package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
)

// The demo's scenario as a test, on the real servers: every stage under
// load, a fault on the new store during live, the watchdog's rollback,
// replayed repairs, complete and contract — and the invariants of the
// validation report asserted one by one.
func TestMigrationUnderLoadWithFaultAndRollback(t *testing.T) {
	t.Parallel()
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	probe, err := pgx.Connect(context.Background(), url)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("Postgres unavailable at %s: %v", url, err)
		}
		t.Skipf("Postgres unavailable at %s: %v", url, err)
	}
	probe.Close(context.Background())
	if logicalURL() == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("DIMMER_LOGICAL_POSTGRES_URL is not set (CI=true makes this a failure)")
		}
		t.Skip("DIMMER_LOGICAL_POSTGRES_URL is not set (the CDC path needs it): run through scripts/need-logical-pg.sh")
	}

	p := params{Orders: 1500, Customers: 150, Instances: 3, Workers: 6, Pause: 30 * time.Millisecond,
		MaxRequests: 100000, Window: 3 * time.Second, MinSamples: 40, CanaryHold: 2500 * time.Millisecond, Timeout: 240 * time.Second,
		EventsRate: 100, CDCRows: 5000} // the events' repairs replay at a pace -race on a busy machine keeps up with
	var out bytes.Buffer
	rep, err := run(t.Context(), p, &out)
	t.Log("\n" + out.String())
	require.NoError(t, err)
	rep.print(&out)

	assert.Regexp(t, `console: http://127\.0\.0\.1:\d+/`, out.String(), "the demo serves the console and says where")
	assert.Empty(t, rep.Failures, "every invariant of the report holds")
	assert.True(t, rep.ChecksumsEqual)
	assert.Positive(t, rep.RowsCompared)
	assert.Zero(t, rep.NonAuthErrors, "client-visible errors caused by the non-authoritative side")
	assert.Zero(t, rep.Unexpected)
	assert.Zero(t, rep.StaleReads)
	assert.Positive(t, rep.AckedWrites)
	assert.Zero(t, rep.Lost, "acknowledged writes lost")
	assert.Zero(t, rep.EventsMissing)
	assert.Equal(t, flags.Shadow, rep.RolledBackTo, "the watchdog stepped live back to shadow")
	assert.Positive(t, rep.FaultToRollback)
	assert.Less(t, rep.FaultToRollback, 20*time.Second)
	assert.Positive(t, rep.RepairsRecorded, "the fault must leave repairs, or replay is not tested")
	assert.Zero(t, rep.RepairsPending)
	assert.Zero(t, rep.RepairsDead)
	assert.True(t, rep.Contracted)
	require.Len(t, rep.Canaries, 2, "a canary before each step to live (before and after the incident)")
	for _, c := range rep.Canaries {
		assert.Equal(t, flags.Live, c.Stage)
		assert.Equal(t, float64(canaryPercent), c.Percent)
		assert.GreaterOrEqual(t, c.Health.Ops, int64(p.MinSamples), "the canary's keys gave the watchdogs their minimum sample")
		assert.Zero(t, c.Health.Errors, "the canary ran clean (the fault comes later)")
	}
	assert.Zero(t, rep.LiveWithoutCanary, "the audit log shows a canary before every step to live")
	assert.Regexp(t, `(?m)^\s+[0-9.]+s  shadow \(live 25%\)\s+[0-9]+ req/s`, out.String(), "the canary shows in the timeline")
	assert.Contains(t, out.String(), "CANARY")
	assert.Contains(t, out.String(), "ROLLBACK to shadow")
	assert.Contains(t, out.String(), "CONTRACT")

	// The order-events topic's move, after the orders migration.
	require.NotNil(t, rep.Events, "the events move ran")
	e := rep.Events
	assert.Positive(t, e.Produced)
	assert.Equal(t, e.Produced, e.Consumed, "every event produced was consumed")
	assert.Zero(t, e.Skipped)
	assert.Zero(t, e.ProcessedTwice)
	assert.Zero(t, e.Disorder, "per-key order violations")
	require.GreaterOrEqual(t, len(e.Moves), 3, "to new, back on the rollback, to new again")
	for i, m := range e.Moves {
		assert.Positive(t, m.Keys, "move %d", i+1)
		assert.Equal(t, m.Keys, m.Resumed, "move %d: every customer resumed at its next event", i+1)
		assert.Zero(t, m.Skipped, "move %d", i+1)
		assert.Zero(t, m.ProcessedTwice, "move %d", i+1)
	}
	assert.True(t, e.Moves[1].Rollback(), "the second move is the watchdog's rollback to old")
	var stages []string
	for _, s := range e.Steps {
		stages = append(stages, s.Stage.String())
	}
	assert.Equal(t, []string{"off", "dualwrite", "shadow", "live", "shadow", "shadow", "live", "rampdown", "complete", "complete"}, stages,
		"a step recorded at every stage, the rollback and the heal")
	report := out.String()
	assert.Regexp(t, `(?m)^\s+[0-9.]+s  events live\s+[0-9]+ events/s  consumed [0-9]+\s+group on new\s+lag [0-9]+`, report, "the move shows in the timeline")
	assert.Contains(t, report, "» events: fault: the new cluster takes produce requests and answers none")
	assert.Regexp(t, `(?m)^   events produced, consumed\s+([0-9]+), ([0-9]+) `, report)
	assert.Regexp(t, `(?m)^   events skipped\s+0$`, report)
	assert.Regexp(t, `(?m)^   events processed twice\s+0$`, report)
	assert.Regexp(t, `(?m)^   events per-key order violations\s+0$`, report)
	assert.Regexp(t, `(?m)^   events cutover 1 to new\s+skipped 0, processed twice 0; `, report)
	assert.Regexp(t, `(?m)^   events rollback 2 to old\s+skipped 0, processed twice 0; `, report)
	assert.Regexp(t, `(?m)^   events cutover 3 to new\s+skipped 0, processed twice 0; `, report)
	assert.Regexp(t, `(?m)^   events lag at live\s+[0-9]+ \(group on new\); .*; consumers move to new first$`, report)
	assert.Regexp(t, `(?m)^   events lag at shadow\s+[0-9]+ \(group on old\); .*; skipped 0, processed twice 0; watchdog rolled back`, report)
	assert.Regexp(t, `(?m)^   events lag at complete\s+0 \(group on new\); produced ([0-9]+), consumed ([0-9]+); skipped 0, processed twice 0; done$`, report)
	// The invoices table's move by CDC, after the events.
	require.NotNil(t, rep.CDC, "the CDC move ran")
	c := rep.CDC
	assert.GreaterOrEqual(t, c.Copied, int64(p.CDCRows))
	assert.Positive(t, c.Streamed)
	assert.Positive(t, c.WritesOld)
	assert.Positive(t, c.WritesNew)
	assert.Zero(t, c.Lost)
	assert.Zero(t, c.AppliedTwice)
	assert.Equal(t, flags.Complete, c.Cutover.State.Stage)
	assert.Zero(t, c.SlotsLeft)
	assert.Zero(t, c.DatabasesLeft)
	assert.Contains(t, report, "» cdc: fenced cutover at ")
	assert.Regexp(t, `(?m)^   cdc invoices rows copied, changes streamed [0-9]+, [0-9]+ \(lag commit to applied: p50 \S+, p99 \S+\)$`, report)
	assert.Regexp(t, `(?m)^   cdc invoices cutover write pause\s+[0-9.]+[µm]?s \(drain \S+, catch-up to lag 0 \S+, flip \S+\); `, report)
	assert.Regexp(t, `(?m)^   cdc invoices acknowledged writes\s+[0-9]+ to old, [0-9]+ to new; lost 0, applied twice 0$`, report)
	assert.Regexp(t, `(?m)^   cdc invoices left behind\s+0 slots or publications, 0 databases$`, report)
	assert.Contains(t, report, "== every invariant holds")

	// Nothing is left behind.
	conn, err := pgx.Connect(context.Background(), url)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	schema := between(out.String(), "schema ", ":")
	require.NotEmpty(t, schema)
	var n int
	require.NoError(t, conn.QueryRow(context.Background(), `SELECT count(*) FROM pg_namespace WHERE nspname = $1`, schema).Scan(&n))
	assert.Zero(t, n, "schema %s dropped", schema)
}

func between(s, from, to string) string {
	_, rest, ok := strings.Cut(s, "» "+from)
	if !ok {
		return ""
	}
	v, _, _ := strings.Cut(rest, to)
	return v
}
