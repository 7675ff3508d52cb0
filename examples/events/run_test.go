package main

import (
	"context"
	"log/slog"
	"os"
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
	rep, err := Run(ctx, Config{PostgresURL: url, Schema: "dimmer_events_test", Rate: 200, Out: os.Stdout, Logger: logger})
	require.NoError(t, err)
	require.True(t, rep.OK(), "%+v", rep)
	require.Positive(t, rep.Produced)
	require.Equal(t, rep.Produced, rep.Consumed)
	require.GreaterOrEqual(t, rep.Cutovers, int64(3), "to new, back on the rollback, to new again")
}
