package eventsvc

import (
	"context"
	"log/slog"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The whole move under load: every event processed once, in order per
// customer, through two cutovers and an automatic rollback.
func TestEventsMove(t *testing.T) {
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var logger *slog.Logger
	if os.Getenv("EVENTS_DEBUG") != "" {
		logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	var ticks atomic.Int64
	rep, err := Run(ctx, Config{PostgresURL: url, Schema: "dimmer_events_test", Rate: 100, Out: os.Stdout, Logger: logger, // a rate the repair relay outpaces under -race on a busy machine
		Tick: func(Tick) { ticks.Add(1) }})
	require.NoError(t, err)
	require.Positive(t, ticks.Load(), "the timeline hook is called while the move runs")
	require.True(t, rep.OK(), "%+v", rep)
	require.Positive(t, rep.Produced)
	require.Equal(t, rep.Produced, rep.Consumed)
	require.GreaterOrEqual(t, rep.Cutovers, int64(3), "to new, back on the rollback, to new again")
	require.Len(t, rep.Moves, int(rep.Cutovers))
	rollbacks := 0
	for i, m := range rep.Moves {
		require.Positive(t, m.Keys, "move %d: customers had events on both sides of it", i+1)
		require.Equal(t, m.Keys, m.Resumed, "move %d: every customer resumed at its next event", i+1)
		require.Zero(t, m.Skipped, "move %d", i+1)
		require.Zero(t, m.ProcessedTwice, "move %d", i+1)
		if m.Rollback() {
			rollbacks++
		}
	}
	require.Equal(t, 1, rollbacks, "the watchdog's rollback moved the consumer back to old once")
	for _, s := range rep.Steps {
		require.Zero(t, s.Skipped, "step %s (%s)", s.Stage, s.Why)
		require.Zero(t, s.ProcessedTwice, "step %s (%s)", s.Stage, s.Why)
	}
}
