package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/open-feature/go-sdk/openfeature"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// serveConsole serves the operator console (read-only) over the demo's
// flag store while the demo runs, so the migration, the fault and the
// watchdog's rollback can be watched in a browser. It listens on
// DIMMER_DEMO_UI (default 127.0.0.1:8080, or a free loopback port when that
// one is taken) with the token DIMMER_UI_TOKEN, or a fresh one it prints.
// The returned function stops it.
func (d *demo) serveConsole(ctx context.Context) (stop func(), err error) {
	token, login := os.Getenv("DIMMER_UI_TOKEN"), "log in with DIMMER_UI_TOKEN"
	if token == "" {
		// A throwaway token for this run only, so it is shown.
		token = randomHex(16)
		login = "log in with token " + token
	}
	// As dimmer ui: the chart samples are kept beside the flags (table
	// console_samples of the demo's schema), so a console restarted
	// mid-run draws what came before, and the store's notifications show a
	// new stage at once.
	samples, err := console.PostgresSamples(d.pool, d.shared.Schema)
	if err != nil {
		return nil, err
	}
	if err := samples.Install(ctx); err != nil {
		return nil, err
	}
	changes, err := pgflags.NewProvider(d.pool, pgflags.WithSchema(d.shared.Schema), pgflags.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		return nil, err
	}
	if err := changes.InitWithContext(ctx, openfeature.EvaluationContext{}); err != nil {
		return nil, fmt.Errorf("flag store notifications: %w", err)
	}
	srv, err := console.New(d.ctrl, d.shared.Fleet, token, console.WithThresholds(d.wd),
		console.WithBackfills(d.shared.Backfill), console.WithRepairs(console.OutboxRepairs(d.shared.Repairs, d.pool)),
		console.WithSchemaPlans(d.shared.Registry), console.WithSampleStore(samples), console.WithChanges(changes.EventChannel()),
		console.WithRefresh(time.Second), console.WithHistory(time.Second, 600), console.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		changes.Shutdown()
		return nil, err
	}
	addr := os.Getenv("DIMMER_DEMO_UI")
	if addr == "" {
		addr = "127.0.0.1:8080"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil && os.Getenv("DIMMER_DEMO_UI") == "" {
		ln, err = net.Listen("tcp", "127.0.0.1:0")
	}
	if err != nil {
		changes.Shutdown()
		return nil, err
	}
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 5 * time.Second}
	sampleCtx, stopSampling := context.WithCancel(ctx)
	served, sampled := make(chan error, 1), make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	go func() { sampled <- srv.Run(sampleCtx) }()
	d.say("console: http://%s/ (%s; read-only)", ln.Addr(), login)
	return func() {
		stopSampling()
		<-sampled
		c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = hs.Shutdown(c)
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			d.say("console stopped: %v", err)
		}
		changes.Shutdown()
	}, nil
}
