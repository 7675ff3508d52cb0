package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/dimmer-dev/dimmer/examples/orders/ordersvc"
	"github.com/dimmer-dev/dimmer/flags"
)

// validate checks the invariants against the final store (the normalised
// tables: the legacy one is gone) and fills rep.
func (d *demo) validate(ctx context.Context, rep *report) error {
	l := d.load
	acked, writes, notes := l.snapshot()
	rep.Requests, rep.ClientErrors = l.requests.Load(), l.failures.Load()
	rep.AuthNewErrors, rep.NonAuthErrors, rep.Unexpected, rep.StaleReads = l.authNewFailures.Load(), l.nonAuth.Load(), l.unexpected.Load(), l.staleRead.Load()
	rep.Compared, rep.Transient, rep.Lasting, rep.LastingOutsideIncident = d.obs.compared.Load(), d.obs.transient.Load(), d.obs.lasting.Load(), d.obs.lastingOutside.Load()
	rep.Notes = notes
	rep.AckedOrders, rep.AckedWrites = len(acked), len(writes)

	// Every repair ever recorded: the repair outbox's identity sequence.
	var seq string
	if err := d.pool.QueryRow(ctx, `SELECT pg_get_serial_sequence('order_repairs', 'seq')`).Scan(&seq); err != nil {
		return fmt.Errorf("repair log sequence: %w", err)
	}
	var last int64
	var called bool
	if err := d.pool.QueryRow(ctx, `SELECT last_value, is_called FROM `+seq).Scan(&last, &called); err != nil {
		return fmt.Errorf("repair log sequence: %w", err)
	}
	if called {
		rep.RepairsRecorded = last
	}
	rs, err := d.shared.Repairs.Stats(ctx, d.pool, "")
	if err != nil {
		return err
	}
	rep.RepairsPending, rep.RepairsDead = rs.Pending, rs.Dead

	// Acknowledged writes against the final store.
	rows, err := d.pool.Query(ctx, `SELECT o.id::text, o.version,
	coalesce((SELECT jsonb_agg(jsonb_build_object('sku', l.sku, 'qty', l.qty, 'price_cents', l.price_cents) ORDER BY l.line_no) FROM order_lines l WHERE l.order_id = o.id), '[]')
FROM orders o WHERE o.id = ANY($1::uuid[])`, keys(acked))
	if err != nil {
		return err
	}
	type final struct {
		version int64
		lines   []ordersvc.Line
	}
	got := map[string]final{}
	for rows.Next() {
		var id string
		var f final
		if err := rows.Scan(&id, &f.version, &f.lines); err != nil {
			rows.Close()
			return err
		}
		got[id] = f
	}
	if err := rows.Err(); err != nil {
		return err
	}
	for id, want := range acked {
		f, ok := got[id]
		switch {
		case !ok:
			rep.Lost++
			rep.Notes = append(rep.Notes, fmt.Sprintf("lost: order %s (acknowledged at version %d) is missing", id, want.Version))
		case f.version < want.Version || len(f.lines) < len(want.Lines) || !slices.Equal(f.lines[:len(want.Lines)], want.Lines):
			rep.Lost++
			rep.Notes = append(rep.Notes, fmt.Sprintf("lost: order %s acknowledged at version %d with %d lines, final version %d with %d lines", id, want.Version, len(want.Lines), f.version, len(f.lines)))
		case f.version > want.Version:
			rep.Ahead++ // a write the client saw fail did land after all
		}
	}

	// Every acknowledged write's event reached Kafka (once per message ID).
	deadline := time.Now().Add(15 * time.Second)
	for {
		missing := 0
		d.mu.Lock()
		for _, w := range writes {
			if !d.events[ordersvc.EventID(w.ID, w.Version).String()] {
				missing++
			}
		}
		d.mu.Unlock()
		rep.EventsMissing = missing
		if missing == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}

	// Every step that served live to every key came after a canary: the
	// audit log, not the demo's own bookkeeping, is the evidence.
	audit, err := d.shared.Flags.Audit(ctx, ordersvc.Migration, 0)
	if err != nil {
		return err
	}
	fullLive := 0
	for _, e := range audit {
		if e.Outcome != flags.Applied || e.To != flags.Live.String() {
			continue
		}
		fullLive++
		if !strings.Contains(e.From, "("+flags.Live.String()+" ") {
			rep.LiveWithoutCanary++
			rep.Notes = append(rep.Notes, fmt.Sprintf("revision %d: %s -> %s without a canary", e.Revision, e.From, e.To))
		}
	}

	fail := func(ok bool, format string, args ...any) {
		if !ok {
			rep.Failures = append(rep.Failures, fmt.Sprintf(format, args...))
		}
	}
	fail(rep.ChecksumsEqual && rep.RowsCompared > 0, "old and new differ at the final verification (%d rows compared)", rep.RowsCompared)
	fail(rep.NonAuthErrors == 0, "%d client-visible errors caused by the non-authoritative side", rep.NonAuthErrors)
	fail(rep.Unexpected == 0, "%d unexpected client errors", rep.Unexpected)
	fail(rep.StaleReads == 0, "%d reads older than an acknowledged write", rep.StaleReads)
	fail(rep.AckedWrites > 0, "the load generator got no write acknowledged")
	fail(rep.Lost == 0, "%d acknowledged writes lost", rep.Lost)
	fail(rep.EventsMissing == 0, "%d acknowledged writes without their event on Kafka", rep.EventsMissing)
	fail(rep.FaultToRollback > 0 && rep.RolledBackTo == flags.Shadow, "the watchdog did not roll live back to shadow (got %s)", rep.RolledBackTo)
	fail(fullLive > 0 && rep.LiveWithoutCanary == 0, "%d of %d steps to live had no canary before them", rep.LiveWithoutCanary, fullLive)
	fail(len(rep.Canaries) == fullLive, "%d canaries for %d steps to live", len(rep.Canaries), fullLive)
	fail(rep.RepairsRecorded > 0, "the fault left no repair: the run proves nothing about replay")
	fail(rep.RepairsPending == 0 && rep.RepairsDead == 0, "%d repairs pending, %d dead", rep.RepairsPending, rep.RepairsDead)
	fail(rep.Compared > 0, "no shadow comparison was made")
	fail(rep.Compared == 0 || float64(rep.LastingOutsideIncident) <= d.wd.MaxMismatchRate*float64(rep.Compared),
		"lasting mismatches outside the incident %d of %d comparisons, above %.0f%%", rep.LastingOutsideIncident, rep.Compared, 100*d.wd.MaxMismatchRate)
	fail(rep.Contracted, "the schema was not contracted")
	return nil
}

func keys(m map[string]ordersvc.Order) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

func (r *report) print(w io.Writer) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	p("\n== validation report")
	p("   requests                                   %d (%d answered with an error)", r.Requests, r.ClientErrors)
	p("   errors of the new store while authoritative %d (live, before the rollback: the watchdog's evidence)", r.AuthNewErrors)
	p("   client errors caused by the non-authoritative side  %d", r.NonAuthErrors)
	p("   other client errors                        %d", r.Unexpected)
	p("   reads older than an acknowledged write     %d", r.StaleReads)
	p("   shadow comparisons                         %d: %d transient mismatches, %d lasting (%d outside the incident)", r.Compared, r.Transient, r.Lasting, r.LastingOutsideIncident)
	held := ""
	if r.VerifiedWithWritesHeld {
		held = " (with writes held: ranges kept changing under load)"
	}
	p("   rows compared at the final verification    %d, checksums equal: %v%s", r.RowsCompared, r.ChecksumsEqual, held)
	p("   repairs recorded                           %d (pending %d, dead %d)", r.RepairsRecorded, r.RepairsPending, r.RepairsDead)
	p("   acknowledged writes                        %d over %d orders; lost %d (ahead of the acknowledgement: %d)", r.AckedWrites, r.AckedOrders, r.Lost, r.Ahead)
	p("   acknowledged writes without their event    %d", r.EventsMissing)
	for i, c := range r.Canaries {
		p("   %-43s%v%% of orders for %v: %d ops, %d errors, %d lasting mismatches over %d comparisons",
			fmt.Sprintf("canary %d before %s", i+1, c.Stage), c.Percent, c.Held.Round(100*time.Millisecond), c.Health.Ops, c.Health.Errors, c.Health.Lasting, c.Health.Compared)
	}
	p("   steps to live without a canary             %d", r.LiveWithoutCanary)
	p("   fault to automatic rollback                %v (to %s)", r.FaultToRollback.Round(time.Millisecond), r.RolledBackTo)
	p("   schema contracted                          %v", r.Contracted)
	printEvents(w, r.Events)
	printCDC(w, r.CDC)
	for _, n := range r.Notes {
		p("   note: %s", n)
	}
	if len(r.Failures) == 0 {
		p("== every invariant holds")
		return
	}
	for _, f := range r.Failures {
		p("   FAILED: %s", f)
	}
}
