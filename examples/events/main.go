// Command events moves an order-events topic from one Kafka cluster to
// another under load, with package streams (see package eventsvc for the
// story): producers and consumers move under the stage flag, the new
// cluster stops answering during live, the watchdog rolls back, and after
// the heal and the replayed repairs the move completes.
//
//	go run ./examples/events
//
// It works in the schema dimmer_events_example of DIMMER_POSTGRES_URL
// (default: the local server) and drops it on exit. The clusters are two
// in-process kfake clusters. It ends with a validation report and exits 1
// if any record was skipped or processed twice.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/dimmer-dev/dimmer/examples/events/eventsvc"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	rep, err := eventsvc.Run(ctx, eventsvc.Config{PostgresURL: url, Schema: "dimmer_events_example", Rate: 200, Out: os.Stdout})
	if err != nil {
		fmt.Fprintln(os.Stderr, "events:", err)
		os.Exit(1)
	}
	if !rep.OK() {
		os.Exit(1)
	}
}
