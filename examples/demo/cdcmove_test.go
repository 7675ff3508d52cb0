package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/flags"
)

// The demo's CDC path on its own, on the logical server: a table moved to
// another database by a sync and a fenced cutover under writes, nothing
// lost or applied twice, and nothing left on the server.
func TestCDCMove(t *testing.T) {
	t.Parallel()
	admin := logicalURL()
	if admin == "" {
		if os.Getenv("CI") == "true" {
			t.Fatal("DIMMER_LOGICAL_POSTGRES_URL is not set (CI=true makes this a failure)")
		}
		t.Skip("DIMMER_LOGICAL_POSTGRES_URL is not set: run through scripts/need-logical-pg.sh")
	}
	var said bytes.Buffer
	c, err := cdcMove(t.Context(), cdcConfig{AdminURL: admin, Rows: 3000, Writers: 3, Stream: time.Second, After: 500 * time.Millisecond,
		Say: func(format string, args ...any) { fmt.Fprintf(&said, format+"\n", args...) }})
	t.Log(said.String())
	require.NoError(t, err)
	var out bytes.Buffer
	printCDC(&out, &c)
	t.Log("\n" + out.String())

	assert.GreaterOrEqual(t, c.Copied, int64(3000), "the initial copy read the table (and invoices issued meanwhile)")
	assert.Positive(t, c.Streamed)
	assert.Positive(t, c.WritesOld)
	assert.Positive(t, c.WritesNew, "writers moved to the new side")
	assert.Zero(t, c.Lost)
	assert.Zero(t, c.AppliedTwice)
	assert.Zero(t, c.Held)
	assert.Equal(t, flags.Complete, c.Cutover.State.Stage)
	assert.Positive(t, c.Cutover.Pause)
	assert.LessOrEqual(t, c.LongestWait, 2*time.Second, "no writer waited past the fence's bound")
	assert.Zero(t, c.SlotsLeft)
	assert.Zero(t, c.DatabasesLeft)
	rep := &report{CDC: &c}
	validateCDC(rep)
	assert.Empty(t, rep.Failures)

	// Nothing of it in the server's postgres database either.
	conn, err := pgx.Connect(context.Background(), admin)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	var n int
	require.NoError(t, conn.QueryRow(context.Background(), `SELECT count(*) FROM pg_tables WHERE tablename IN ('invoices', 'cdc_slots', 'cdc_fences')`).Scan(&n))
	assert.Zero(t, n)
}

// The CDC part of the report fails the demo on each broken invariant,
// naming it, and passes a clean move.
func TestValidateCDC(t *testing.T) {
	t.Parallel()
	clean := func() *cdcReport {
		return &cdcReport{Copied: 100, Streamed: 50, WritesOld: 40, WritesNew: 10,
			Cutover: cdc.CutoverResult{Pause: 30 * time.Millisecond, State: flags.State{Stage: flags.Complete}}}
	}
	rep := &report{CDC: clean()}
	validateCDC(rep)
	assert.Empty(t, rep.Failures)
	var out bytes.Buffer
	printCDC(&out, rep.CDC)
	assert.Contains(t, out.String(), "   cdc invoices acknowledged writes           40 to old, 10 to new; lost 0, applied twice 0\n")
	assert.Contains(t, out.String(), "   cdc invoices cutover write pause           30ms (")

	for name, c := range map[string]struct {
		broke func(*cdcReport)
		want  string
	}{
		"lost":        {func(r *cdcReport) { r.Lost = 2 }, "cdc: 2 acknowledged writes lost"},
		"twice":       {func(r *cdcReport) { r.AppliedTwice = 1 }, "cdc: 1 writes applied twice"},
		"no new":      {func(r *cdcReport) { r.WritesNew = 0 }, "0 to the new"},
		"not flipped": {func(r *cdcReport) { r.Cutover.State.Stage = flags.RampDown }, "left the stage at rampdown"},
		"held":        {func(r *cdcReport) { r.Held = 3 }, "3 writes gave up waiting"},
		"slot left":   {func(r *cdcReport) { r.SlotsLeft = 1 }, "1 slots or publications"},
		"no stream":   {func(r *cdcReport) { r.Streamed = 0 }, "streamed 0 changes"},
	} {
		rep := &report{CDC: clean()}
		c.broke(rep.CDC)
		validateCDC(rep)
		if assert.Len(t, rep.Failures, 1, name) {
			assert.Contains(t, rep.Failures[0], c.want, name)
		}
	}
	rep = &report{}
	validateCDC(rep)
	assert.Equal(t, []string{"cdc: the invoices move by CDC did not run"}, rep.Failures)
}
