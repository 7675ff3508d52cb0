// Command demo is what `make demo` runs: the orders service
// (examples/orders) taken through a whole migration under load, with a fault
// and an automatic rollback, ending with a validation report. It exits
// non-zero when an invariant fails.
//
// Three instances of the service run in this process as a fleet, sharing
// one Postgres schema (created and dropped by the run) and an in-process
// Kafka cluster (or DIMMER_KAFKA_BROKERS). A load generator on loopback
// creates orders, adds lines and reads them back. The controller advances
// the stage flag only when its guards pass on their own merits; live is
// entered through a canary (a quarter of the orders first, the rest once the
// watchdogs judged it clean); during live the new store starts failing (a chaos.Injector), the watchdogs roll
// back to shadow by themselves, the fault clears, the repairs replay, and
// the migration goes on to complete and contracts the schema.
//
// Then the events example (package eventsvc) moves an order-events topic
// to another Kafka cluster under load, with a fault on the new cluster and
// the watchdog's rollback; its timeline joins the demo's and its report
// lines (produced, consumed, skipped, processed twice at every cutover and
// rollback, per-key order violations, lag at each step) the validation
// report.
//
// Last, a billing service's invoices table moves to another database by
// change data capture instead of dual writes (package cdc, on the server
// with wal_level = logical at DIMMER_LOGICAL_POSTGRES_URL): a sync copies
// the table and streams every committed change while the service keeps
// writing only its own table, and a fenced cutover holds its writers while
// the sync's lag reaches 0 and the stage flips to complete. The report
// gives the rows copied and streamed, the lag, the write pause, and the
// writes lost or applied twice (none); the move drops its slot,
// publication and databases.
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
	rep, err := run(ctx, demoParams, os.Stdout)
	if rep != nil && err == nil {
		rep.print(os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
	if len(rep.Failures) > 0 {
		os.Exit(1)
	}
}
