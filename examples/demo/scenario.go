package main

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/chaos"
	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/examples/events/eventsvc"
	"github.com/dimmer-dev/dimmer/examples/orders/ordersvc"
	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

// params size a run. The demo and its test use the same scenario; the test
// a smaller one.
type params struct {
	Orders, Customers int           // legacy history
	Instances         int           // service instances (a fleet)
	Workers           int           // load generator workers
	Pause             time.Duration // between a worker's requests
	MaxRequests       int64         // the load's budget
	Window            time.Duration // watchdog window
	MinSamples        int
	Hold              time.Duration // how long each stage is shown before the next step
	CanaryHold        time.Duration // the least a canary runs before every key follows
	Timeout           time.Duration // the whole run
	EventsRate        int           // order events per second while the topic moves
	CDCRows           int           // invoices in the table moved by CDC
}

var demoParams = params{Orders: 5000, Customers: 400, Instances: 3, Workers: 8, Pause: 40 * time.Millisecond,
	MaxRequests: 200000, Window: 4 * time.Second, MinSamples: 60, Hold: 5 * time.Second, CanaryHold: 5 * time.Second, Timeout: 175 * time.Second, EventsRate: 200,
	CDCRows: 20000}

// report is the validation report; failures lists every invariant broken.
type report struct {
	Requests, ClientErrors, AuthNewErrors, NonAuthErrors, Unexpected, StaleReads int64
	Compared, Transient, Lasting, LastingOutsideIncident                         int64
	RepairsRecorded, RepairsPending, RepairsDead                                 int64
	RowsCompared                                                                 int64
	ChecksumsEqual                                                               bool
	AckedOrders, AckedWrites, Lost, Ahead, EventsMissing                         int
	FaultToRollback                                                              time.Duration
	RolledBackTo                                                                 flags.Stage
	Contracted                                                                   bool
	VerifiedWithWritesHeld                                                       bool // the final verification needed the writes held
	Canaries                                                                     []canaryResult
	LiveWithoutCanary                                                            int              // full-live steps the audit log shows without a canary before them
	Events                                                                       *eventsvc.Report // the order-events topic's move, after the orders migration
	CDC                                                                          *cdcReport       // the invoices table's move by CDC, after the events move
	Notes, Failures                                                              []string
}

// canaryResult is what one canary step showed before every key followed.
type canaryResult struct {
	Stage   flags.Stage
	Percent float64
	Held    time.Duration
	Health  flags.Health // the fleet's window of the canary's stage when the rest followed
}

// counter is the demo's own observer beside the watchdogs: totals over the
// whole run, and lasting mismatches outside the incident.
type counter struct {
	compared, transient, lasting, lastingOutside, newErrs atomic.Int64
	incident                                              atomic.Bool
}

func (c *counter) Observe(o flags.Observation) {
	if o.Side == flags.New && o.Err {
		c.newErrs.Add(1)
	}
	if !o.Compared {
		return
	}
	c.compared.Add(1)
	switch {
	case o.Lasting:
		c.lasting.Add(1)
		if !c.incident.Load() {
			c.lastingOutside.Add(1)
		}
	case o.Mismatch:
		c.transient.Add(1)
	}
}

type demo struct {
	p      params
	out    io.Writer
	start  time.Time
	pool   *pgxpool.Pool
	shared *ordersvc.Shared
	ctrl   *flags.Controller
	wd     flags.WatchdogConfig
	fleet  []*ordersvc.Instance
	faults *chaos.Injector
	obs    *counter
	load   *load

	mu       sync.Mutex
	progress string // backfill bar
	events   map[string]bool
}

func (d *demo) say(format string, args ...any) {
	fmt.Fprintf(d.out, "%6.1fs  » "+format+"\n", append([]any{time.Since(d.start).Seconds()}, args...)...)
}

func run(ctx context.Context, p params, out io.Writer) (*report, error) {
	if logicalURL() == "" { // the CDC move, last, needs it: say so before the rest runs
		return nil, errors.New("DIMMER_LOGICAL_POSTGRES_URL is not set: run the demo through `make demo` (scripts/need-logical-pg.sh starts a server with wal_level=logical)")
	}
	ctx, cancel := context.WithTimeout(ctx, p.Timeout)
	defer cancel()
	// The timeline and the events write lines from two goroutines.
	out = &lockedWriter{w: out}
	d := &demo{p: p, out: out, start: time.Now(), obs: &counter{}, events: map[string]bool{}}
	quiet := slog.New(slog.DiscardHandler)

	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	schema := "dimmer_demo_" + randomHex(4)
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("DIMMER_POSTGRES_URL: %w", err)
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	cfg.MaxConns = 40
	d.pool, err = pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer d.pool.Close()
	if _, err := d.pool.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize()); err != nil {
		return nil, fmt.Errorf("create schema %s: %w", schema, err)
	}
	defer func() {
		c, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if _, err := d.pool.Exec(c, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
			fmt.Fprintf(out, "could not drop schema %s: %v\n", schema, err)
		}
	}()

	d.shared, err = ordersvc.Open(d.pool, schema, quiet)
	if err != nil {
		return nil, err
	}
	d.shared.Heartbeat = 250 * time.Millisecond
	if err := d.shared.Install(ctx); err != nil {
		return nil, err
	}
	if err := ordersvc.Seed(ctx, d.pool, p.Orders, p.Customers); err != nil {
		return nil, err
	}
	if _, err := d.shared.Registry.Expand(ctx, ordersvc.Migration, expandcontract.Request{Actor: "deploy", Reason: "normalise orders"}); err != nil {
		return nil, err
	}
	d.say("schema %s: %d legacy orders over %d customers; plan %s expanded (orders, order_lines)", schema, p.Orders, p.Customers, ordersvc.Migration)

	// Kafka: franz-go's in-process cluster unless brokers are given.
	brokers := strings.FieldsFunc(os.Getenv("DIMMER_KAFKA_BROKERS"), func(r rune) bool { return r == ',' })
	if len(brokers) == 0 {
		cluster, err := kfake.NewCluster(kfake.SeedTopics(1, ordersvc.EventsTopic))
		if err != nil {
			return nil, err
		}
		defer cluster.Close()
		brokers = cluster.ListenAddrs()
	}
	producer, err := kgo.NewClient(kafkasink.ClientOptions(brokers...)...)
	if err != nil {
		return nil, err
	}
	defer producer.Close()
	consumer, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(ordersvc.EventsTopic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		return nil, err
	}
	defer consumer.Close()
	consumeCtx, stopConsume := context.WithCancel(ctx)
	var bg sync.WaitGroup
	defer bg.Wait()
	defer stopConsume()
	bg.Go(func() { d.consume(consumeCtx, consumer) })

	d.wd = flags.WatchdogConfig{Window: p.Window, Interval: 200 * time.Millisecond, MinSamples: p.MinSamples,
		MaxMismatchRate: 0.02, MaxErrorRate: 0.05, Cooldown: 2 * time.Minute}
	// As dimmer ui: the console's page and the guards it runs for the next
	// step read the fleet registry once per request, not once each.
	d.shared.Fleet = console.ShareFleet(d.shared.Flags)
	d.ctrl, err = flags.NewController(d.shared.Flags, flags.WithFleet(d.shared.Fleet),
		flags.WithGuards(d.shared.Guards(d.wd)...), flags.WithControllerLogger(quiet))
	if err != nil {
		return nil, err
	}
	d.faults, err = chaos.NewInjector("orders-new-store", chaos.WithSeed(7))
	if err != nil {
		return nil, err
	}

	var urls []string
	for i := range p.Instances {
		in, err := ordersvc.Start(ctx, d.shared, ordersvc.Config{ID: fmt.Sprintf("orders-%d", i+1), Controller: d.ctrl, Watchdog: d.wd,
			Kafka: producer, NewFaults: d.faults, Observer: d.obs, Logger: quiet})
		if err != nil {
			return nil, err
		}
		defer func() {
			c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = in.Close(c)
		}()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		srv := &http.Server{Handler: in.Handler(), ReadHeaderTimeout: 5 * time.Second}
		bg.Go(func() { _ = srv.Serve(ln) })
		defer srv.Close()
		d.fleet = append(d.fleet, in)
		urls = append(urls, "http://"+ln.Addr().String())
	}
	d.say("%d instances serving on %s", len(urls), strings.Join(urls, " "))
	stopConsole, err := d.serveConsole(ctx)
	if err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	defer stopConsole()

	var seeds []string
	rows, err := d.pool.Query(ctx, `SELECT id::text FROM orders_legacy ORDER BY random() LIMIT 400`)
	if err != nil {
		return nil, err
	}
	if seeds, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		return nil, err
	}
	d.load = newLoad(urls, p.Workers, p.Pause, p.MaxRequests)
	loadCtx, stopLoad := context.WithCancel(ctx)
	defer stopLoad()
	var loadWG sync.WaitGroup
	loadWG.Go(func() { d.load.run(loadCtx, seeds, p.Customers) })
	tlCtx, stopTimeline := context.WithCancel(ctx)
	defer stopTimeline()
	var tlWG sync.WaitGroup
	tlWG.Go(func() { d.timeline(tlCtx) })

	rep := &report{}
	err = d.migrate(ctx, rep)
	stopLoad()
	loadWG.Wait()
	stopTimeline()
	tlWG.Wait()
	if err != nil {
		return rep, err
	}
	if err := d.validate(ctx, rep); err != nil {
		return rep, err
	}
	if err := d.moveEvents(ctx, rep); err != nil {
		return rep, err
	}
	validateEvents(rep)
	if err := d.moveByCDC(ctx, rep); err != nil {
		return rep, err
	}
	validateCDC(rep)
	return rep, nil
}

// migrate drives the stages with the controller, as an operator would.
func (d *demo) migrate(ctx context.Context, rep *report) error {
	if _, err := d.shared.Registry.Migrate(ctx, ordersvc.Migration, expandcontract.Request{Actor: "operator", Reason: "dual writes and backfill"}); err != nil {
		return err
	}
	if err := d.advance(ctx, flags.DualWrite, "write the normalised tables too"); err != nil {
		return err
	}
	jobs := ordersvc.BackfillJobs(d.shared.Schema, func(pr backfill.Progress) {
		d.mu.Lock()
		d.progress = fmt.Sprintf("%s %s %d/%d", strings.TrimPrefix(pr.Job, ordersvc.Migration+"-"), bar(pr.RowsDone, pr.RowsTotal), pr.RowsDone, pr.RowsTotal)
		d.mu.Unlock()
	})
	for _, j := range jobs {
		res, err := d.shared.Backfill.Run(ctx, j)
		if err != nil {
			return fmt.Errorf("backfill %s: %w", j.Name, err)
		}
		d.say("backfill %s copied %d rows", j.Name, res.Rows)
	}
	if _, err := d.verify(ctx, jobs); err != nil {
		return err
	}
	d.mu.Lock()
	d.progress = "backfill verified"
	d.mu.Unlock()
	if err := d.advance(ctx, flags.Shadow, "backfill verified"); err != nil {
		return err
	}
	if err := d.canary(ctx, rep, flags.Live, canaryPercent, "shadow reads clean"); err != nil {
		return err
	}
	if err := d.waitSamples(ctx, flags.Live); err != nil {
		return err
	}

	// The incident.
	d.obs.incident.Store(true)
	before, err := d.shared.Flags.Load(ctx, ordersvc.Migration)
	if err != nil {
		return err
	}
	if err := errors.Join(d.faults.FailRate(0.5, nil), d.faults.SetLatency(20*time.Millisecond, 10*time.Millisecond)); err != nil {
		return err
	}
	faultAt := time.Now()
	d.say("FAULT: the new store fails 50%% of calls and is 20ms slower")
	for {
		st, err := d.shared.Flags.Load(ctx, ordersvc.Migration)
		if err != nil {
			return err
		}
		if st.Revision != before.Revision {
			rep.FaultToRollback = time.Since(faultAt)
			rep.RolledBackTo = st.Stage
			entries, _ := d.shared.Flags.Audit(ctx, ordersvc.Migration, 1)
			why := ""
			if len(entries) > 0 {
				why = entries[0].Actor + ": " + entries[0].Reason
			}
			d.say("ROLLBACK to %s %v after the fault (%s)", st, rep.FaultToRollback.Round(time.Millisecond), why)
			break
		}
		if time.Since(faultAt) > 20*time.Second {
			return errors.New("the watchdog did not roll back within 20s of the fault")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	// The fault outlives the rollback a little: new is secondary now, so
	// its failures become repairs, invisible to callers.
	time.Sleep(1500 * time.Millisecond)
	d.faults.Heal()
	d.say("fault cleared (%d injected errors); repairs replay", d.faults.Stats().Errors)
	if err := d.waitRepairs(ctx, 30*time.Second); err != nil {
		return err
	}
	d.obs.incident.Store(false)
	d.say("repairs drained; waiting for a clean shadow window")

	if err := d.canary(ctx, rep, flags.Live, canaryPercent, "fault fixed, repairs replayed, shadow clean"); err != nil {
		return err
	}
	if err := d.waitSamples(ctx, flags.Live); err != nil {
		return err
	}
	if err := d.advance(ctx, flags.RampDown, "live clean"); err != nil {
		return err
	}
	v, err := d.verify(ctx, ordersvc.BackfillJobs(d.shared.Schema, nil))
	if err != nil {
		return err
	}
	if !v.OK {
		// The verifier follows the keys of a differing range until their
		// dual writes land, so the writes in flight do not fail it; should
		// a key's second write lag more than the recheck delay (a stalled
		// instance), the writes pause (reads go on) and it runs once more.
		d.load.holdWrites.Store(true)
		d.say("ranges kept changing under load: writes held (reads go on) for the final verification")
		time.Sleep(500 * time.Millisecond) // the writes in flight land
		v, err = d.verify(ctx, ordersvc.BackfillJobs(d.shared.Schema, nil))
		d.load.holdWrites.Store(false)
		if err != nil {
			return err
		}
		rep.VerifiedWithWritesHeld = true
	}
	rep.RowsCompared, rep.ChecksumsEqual = v.RowsSource, v.OK
	if err := d.waitRepairs(ctx, 10*time.Second); err != nil {
		return err
	}
	if err := d.advance(ctx, flags.Complete, "old retired"); err != nil {
		return err
	}
	// Contract while the load runs: nothing routes to old any more.
	st, err := d.shared.Registry.Contract(ctx, ordersvc.Migration, expandcontract.Request{Actor: "operator", Reason: "migration complete"})
	if err != nil {
		return fmt.Errorf("contract: %w", err)
	}
	rep.Contracted = st.Stage == expandcontract.Contracted
	d.say("CONTRACT: schema plan %s, orders_legacy dropped", st.Stage)
	time.Sleep(time.Second) // some load on the contracted schema
	return nil
}

// verify runs every job's verification; v sums them.
func (d *demo) verify(ctx context.Context, jobs []backfill.Job) (backfill.Verification, error) {
	sum := backfill.Verification{OK: true}
	for _, j := range jobs {
		var v backfill.Verification
		// Keys whose dual write is in flight are followed until it lands
		// (v.InFlight); a lasting difference is recopied by Repair
		// (version-guarded) and checked again, and a verification that
		// still differs is run again.
		for attempt := 1; ; attempt++ {
			var err error
			v, err = d.shared.Backfill.Verify(ctx, j, backfill.VerifyOptions{ChunkRows: 1000, Repair: true, RecheckDelay: 100 * time.Millisecond})
			if err != nil {
				return sum, fmt.Errorf("verify %s: %w", j.Name, err)
			}
			if v.OK || attempt == 5 {
				break
			}
			d.say("verify %s: %s; again", j.Name, strings.Join(v.Problems, "; "))
		}
		d.say("verify %s: %d rows vs %d, %d chunks, checksums equal: %v (keys with a dual write in flight: %d, ranges recopied: %d) %s",
			j.Name, v.RowsSource, v.RowsTarget, v.Chunks, v.OK, v.InFlight, v.Repaired, strings.Join(v.Problems, "; "))
		sum.OK = sum.OK && v.OK
		sum.RowsSource += v.RowsSource
		sum.RowsTarget += v.RowsTarget
	}
	return sum, nil
}

// advance waits until the next step passes its guards on their own merits
// (the fleet has the current revision, the windows hold enough clean
// samples, the backfill is verified, no repair is pending), then takes it.
func (d *demo) advance(ctx context.Context, to flags.Stage, reason string) error {
	last, err := d.ready(ctx, to)
	if err != nil {
		return err
	}
	_, err = d.set(ctx, last, flags.Request{Migration: ordersvc.Migration, Stage: to, Actor: "operator", Reason: reason})
	return err
}

// canaryPercent is the share of keys (orders, by their id) a canary serves
// the next stage. The canary-healthy guard wants the watchdog's minimum
// sample from the canary's keys within one window: at the demo's load a
// quarter of the orders gives it about three times over, a tenth only
// just (a real service with more traffic can start smaller).
const canaryPercent = 25

// canary enters stage for pct % of keys first: the step is guarded like a
// full one, the canary's keys are then served stage while the other keys
// stay where they were, for at least CanaryHold and until the fleet's watchdogs
// hold enough of the canary's operations to judge (the canary-healthy
// guard). A watchdog rollback meanwhile fails the run: nothing is wrong
// with the new store here, so a canary that does not hold is a bug. Then
// every key follows.
func (d *demo) canary(ctx context.Context, rep *report, stage flags.Stage, pct float64, reason string) error {
	status, err := d.ready(ctx, stage)
	if err != nil {
		return err
	}
	rollout := flags.Request{Migration: ordersvc.Migration, Stage: stage, Percent: pct, Actor: "operator",
		Reason: fmt.Sprintf("CANARY: %v%% of orders served %s, the rest stay; the watchdogs judge it (%s)", pct, stage, reason)}
	started := time.Now()
	st, err := d.set(ctx, status, rollout)
	if err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Until(started.Add(d.p.CanaryHold))):
	}
	final, err := d.ready(ctx, stage)
	if err != nil {
		return fmt.Errorf("canary %s: %w", st, err)
	}
	if final.State.Revision != st.Revision {
		return fmt.Errorf("canary %s was changed (now %s): the watchdog rolled it back?", st, final.State)
	}
	h, n := flags.FleetHealth(final.Instances, ordersvc.Migration, stage)
	res := canaryResult{Stage: stage, Percent: pct, Held: time.Since(started), Health: h}
	rep.Canaries = append(rep.Canaries, res)
	d.say("canary clean after %v: %d operations in %s from %d instances, %d errors, %d lasting mismatches over %d comparisons",
		res.Held.Round(100*time.Millisecond), h.Ops, stage, n, h.Errors, h.Lasting, h.Compared)
	_, err = d.set(ctx, final, flags.Request{Migration: ordersvc.Migration, Stage: stage, Actor: "operator",
		Reason: fmt.Sprintf("canary clean (%d ops, %d errors); %s", h.Ops, h.Errors, reason)})
	return err
}

// ready waits (at most 45s) until the step to stage would pass its guards,
// and returns the status that says so.
func (d *demo) ready(ctx context.Context, to flags.Stage) (flags.Status, error) {
	deadline := time.Now().Add(45 * time.Second)
	var last flags.Status
	for {
		for _, in := range d.fleet {
			if err := in.Beat(ctx); err != nil {
				return flags.Status{}, err
			}
		}
		st, err := d.ctrl.Status(ctx, ordersvc.Migration, d.shared.Flags)
		if err != nil {
			return flags.Status{}, err
		}
		last = st
		if st.Next == to && st.Ready {
			return st, nil
		}
		if time.Now().After(deadline) {
			var failed []string
			for _, c := range last.Checks {
				if !c.Passed {
					failed = append(failed, c.Name+": "+c.Detail)
				}
			}
			return last, fmt.Errorf("%s -> %s not ready after 45s: %s", last.State, to, strings.Join(failed, "; "))
		}
		select {
		case <-ctx.Done():
			return last, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// set applies r, whose checks status listed, and shows the change for Hold.
func (d *demo) set(ctx context.Context, status flags.Status, r flags.Request) (flags.State, error) {
	var names []string
	for _, c := range status.Checks {
		names = append(names, c.Name)
	}
	st, err := d.ctrl.Set(ctx, r)
	if err != nil {
		return st, err
	}
	d.say("%s (revision %d): %s [passed: %s]", st, st.Revision, r.Reason, strings.Join(names, ", "))
	select {
	case <-ctx.Done():
		return st, ctx.Err()
	case <-time.After(d.p.Hold):
	}
	return st, nil
}

// waitSamples waits until the fleet's windows hold enough new-side
// operations in stage for the watchdog to judge.
func (d *demo) waitSamples(ctx context.Context, stage flags.Stage) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		var ops int64
		for _, in := range d.fleet {
			h := in.Watchdog().Health(ordersvc.Migration, stage)
			ops += h.Ops
		}
		if ops >= int64(d.p.MinSamples*len(d.fleet)) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return fmt.Errorf("too few new-side operations in %s after 30s", stage)
}

func (d *demo) waitRepairs(ctx context.Context, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		st, err := d.shared.Repairs.Stats(ctx, d.pool, "")
		if err != nil {
			return err
		}
		if st.Pending == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d repairs still pending (%d dead) after %v", st.Pending, st.Dead, limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// consume reads the order events as a downstream service would, keeping
// each message ID once (the two copies a dual write enqueues share it).
func (d *demo) consume(ctx context.Context, cl *kgo.Client) {
	for ctx.Err() == nil {
		fs := cl.PollFetches(ctx)
		fs.EachRecord(func(r *kgo.Record) {
			for _, h := range r.Headers {
				if h.Key == outbox.HeaderMessageID {
					d.mu.Lock()
					d.events[string(h.Value)] = true
					d.mu.Unlock()
				}
			}
		})
	}
}

// timeline prints one line per second.
func (d *demo) timeline(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var lastReq int64
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, _ := d.shared.Flags.Load(ctx, ordersvc.Migration)
		req := d.load.requests.Load()
		rstats, _ := d.shared.Repairs.Stats(ctx, d.pool, "")
		d.mu.Lock()
		prog := d.progress
		d.mu.Unlock()
		fmt.Fprintf(d.out, "%6.1fs  %-18s %4d req/s  client errors %-4d  compared %-6d mismatches %d (lasting %d)  repairs pending %-4d  %s\n",
			time.Since(d.start).Seconds(), st, req-lastReq, d.load.failures.Load(), d.obs.compared.Load(),
			d.obs.transient.Load()+d.obs.lasting.Load(), d.obs.lasting.Load(), rstats.Pending, prog)
		lastReq = req
	}
}

func bar(done, total int64) string {
	const width = 20
	if total <= 0 {
		total = 1
	}
	n := min(width, int(done*width/total))
	return "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = crand.Read(b)
	return hex.EncodeToString(b)
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
