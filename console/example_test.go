package console_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// The console over a Postgres flag store, with the fleet barrier as its
// controller's guard; a script reads a migration's data with the token.
func ExampleNew() {
	ctx := context.Background()
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	schema := "dimmer_example_console_" + strconv.Itoa(os.Getpid())
	drop := func() { _, _ = pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE") }
	drop()
	defer drop()
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	store, _ := pgflags.NewStore(pool, pgflags.WithSchema(schema), pgflags.WithLogger(logger))
	if err := store.Install(ctx); err != nil {
		fmt.Println(err)
		return
	}
	// The guards and the console share one read of the fleet per page.
	fleet := console.ShareFleet(store)
	ctrl, _ := flags.NewController(store, flags.WithFleet(fleet), flags.WithControllerLogger(logger))
	_ = store.Heartbeat(ctx, flags.Instance{ID: "api-1", Applied: map[string]int64{"orders": 0}}, 60e9)
	_, _ = ctrl.Advance(ctx, "orders", "alice", "start dual writes")

	// In a service or a tool: mount it on any mux, behind TLS when remote.
	srv, err := console.New(ctrl, fleet, "a-long-random-token-from-a-secret", console.WithLogger(logger))
	if err != nil {
		fmt.Println(err)
		return
	}
	hs := httptest.NewServer(srv)
	defer hs.Close()

	req, _ := http.NewRequest("GET", hs.URL+"/api/m/orders", nil)
	req.Header.Set("Authorization", "Bearer a-long-random-token-from-a-secret")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer resp.Body.Close()
	var m console.Migration
	_ = json.NewDecoder(resp.Body).Decode(&m)
	fmt.Println(m.Name, m.Describe, "next:", m.Next, "ready:", m.Ready)
	for _, c := range m.Checks {
		fmt.Printf("  %s %v: %s\n", c.Name, c.Passed, c.Detail)
	}
	fmt.Println("timeline:", m.Timeline[0].Actor, m.Timeline[0].Reason)
	// Output:
	// orders dualwrite next: shadow ready: false
	//   one-step-forward true: no stage is skipped
	//   fleet-acknowledged false: 1 of 1 instances have not applied revision 1: api-1 at revision 0
	// timeline: alice start dual writes
}
