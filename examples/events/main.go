// Command events moves an order-events topic from one Kafka cluster to
// another under load, with package streams: a producer service writes
// order events per customer through a streams.Producer, a consumer service
// keeps per-customer totals through a streams.Consumer, and the topic's
// stage flag (Postgres provider) goes off -> dualwrite -> shadow -> live,
// where the new cluster stops answering: the shadow comparison feeds the
// watchdog, which rolls the flag back to shadow; once the cluster is healed
// and the repairs replayed, the flag goes on to complete.
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
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	rep, err := Run(ctx, Config{PostgresURL: url, Schema: "dimmer_events_example", Rate: 200, Out: os.Stdout})
	if err != nil {
		fmt.Fprintln(os.Stderr, "events:", err)
		os.Exit(1)
	}
	if !rep.OK() {
		os.Exit(1)
	}
}
