package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/dimmer-dev/dimmer/examples/events/eventsvc"
)

// moveEvents runs the events example after the orders migration: an
// order-events topic moved to another Kafka cluster under load, with a
// fault on the new cluster and the watchdog's rollback. Its narrative joins
// the demo's timeline and its report the demo's.
func (d *demo) moveEvents(ctx context.Context, rep *report) error {
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	d.say("events: an order-events producer and a per-customer totals consumer move to another Kafka cluster")
	var lastProduced int64
	er, err := eventsvc.Run(ctx, eventsvc.Config{PostgresURL: url, Schema: "dimmer_demo_events_" + randomHex(4), Rate: d.p.EventsRate,
		Say: func(format string, args ...any) { d.say("events: "+format, args...) },
		Tick: func(t eventsvc.Tick) {
			fmt.Fprintf(d.out, "%6.1fs  %-18s %4d events/s  consumed %-6d group on %-4s lag %-4d repairs pending %d\n",
				time.Since(d.start).Seconds(), "events "+t.Stage.String(), t.Produced-lastProduced, t.Consumed, t.GroupOn, t.Lag, t.RepairsPending)
			lastProduced = t.Produced
		}})
	if err != nil {
		return fmt.Errorf("events: %w", err)
	}
	rep.Events = &er
	return nil
}

// validateEvents adds the events move's invariants to rep.Failures.
func validateEvents(rep *report) {
	fail := func(ok bool, format string, args ...any) {
		if !ok {
			rep.Failures = append(rep.Failures, "events: "+fmt.Sprintf(format, args...))
		}
	}
	e := rep.Events
	if e == nil {
		fail(false, "the topic move did not run")
		return
	}
	fail(e.Produced > 0, "no event was produced")
	fail(e.Consumed == e.Produced, "%d events consumed of %d produced", e.Consumed, e.Produced)
	fail(e.Skipped == 0, "%d events skipped", e.Skipped)
	fail(e.ProcessedTwice == 0, "%d events processed twice", e.ProcessedTwice)
	fail(e.Disorder == 0, "%d per-key order violations", e.Disorder)
	cutovers, rollbacks := 0, 0
	for i, m := range e.Moves {
		if m.Rollback() {
			rollbacks++
		} else {
			cutovers++
		}
		fail(m.Keys > 0 && m.Resumed == m.Keys, "move %d to %s: %d of %d customers resumed at their next event", i+1, m.To, m.Resumed, m.Keys)
		fail(m.Skipped == 0, "move %d to %s: %d events skipped", i+1, m.To, m.Skipped)
		fail(m.ProcessedTwice == 0, "move %d to %s: %d events processed twice", i+1, m.To, m.ProcessedTwice)
	}
	fail(cutovers >= 2 && rollbacks >= 1, "the consumer moved to new %d times and back %d times: want a cutover, a rollback, a cutover", cutovers, rollbacks)
	for _, s := range e.Steps {
		fail(s.Skipped == 0 && s.ProcessedTwice == 0, "at %s (%s): %d skipped, %d processed twice", s.Stage, s.Why, s.Skipped, s.ProcessedTwice)
	}
}

func printEvents(w io.Writer, e *eventsvc.Report) {
	if e == nil {
		return
	}
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	p("   events produced, consumed                  %d, %d (copies replayed on new after the fault: %d)", e.Produced, e.Consumed, e.Repairs)
	p("   events skipped                             %d", e.Skipped)
	p("   events processed twice                     %d", e.ProcessedTwice)
	p("   events per-key order violations            %d", e.Disorder)
	for i, m := range e.Moves {
		kind := "cutover"
		if m.Rollback() {
			kind = "rollback"
		}
		p("   %-43sskipped %d, processed twice %d; %d of %d customers resumed at their next event; pause %v",
			fmt.Sprintf("events %s %d to %s", kind, i+1, m.To), m.Skipped, m.ProcessedTwice, m.Resumed, m.Keys, m.Pause.Round(time.Millisecond))
	}
	for _, s := range e.Steps {
		p("   %-43s%d (group on %s); produced %d, consumed %d; skipped %d, processed twice %d; %s",
			"events lag at "+s.Stage.String(), s.Lag, s.GroupOn, s.Produced, s.Consumed, s.Skipped, s.ProcessedTwice, s.Why)
	}
}
