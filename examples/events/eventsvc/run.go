package eventsvc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/open-feature/go-sdk/openfeature/isolated"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/streams"
)

const (
	migration = "order-events"
	topic     = "order-events"
	customers = 40
)

// Config is what a run needs.
type Config struct {
	PostgresURL, Schema string
	Rate                int // events per second
	// Out receives the narrative, one line per step (ignored when Say is set).
	Out io.Writer
	// Say, when set, receives the narrative instead of Out.
	Say    func(format string, args ...any)
	Logger *slog.Logger
	// Tick, when set, is called about once a second while the move runs.
	Tick func(Tick)
}

// Tick is the state of the move at one moment.
type Tick struct {
	Stage              flags.Stage
	Produced, Consumed int64
	GroupOn            flags.Side // where the consumer group has committed
	Lag                int64      // the group's lag there, the highest of any partition
	RepairsPending     int64      // copies still to replay on the other cluster
}

// Move is one of the consumer's moves between clusters, and what the
// ledger saw of the records handled after it, until the next move.
type Move struct {
	To flags.Side // new: a cutover; old: a rollback
	// Keys is how many customers had events on both sides of the move;
	// Resumed how many of those continued at exactly their next event.
	Keys, Resumed           int
	Skipped, ProcessedTwice int
	Pause                   time.Duration // last record on one cluster to the first on the other
}

// Rollback reports whether the move went back to the old cluster.
func (m Move) Rollback() bool { return m.To == flags.Old }

// Step is one line of the report: a stage reached and what it cost.
type Step struct {
	Stage                   flags.Stage
	Why                     string
	Produced, Consumed      int64
	GroupOn                 flags.Side
	Lag, MirrorLag          int64
	Skipped, ProcessedTwice int
}

// Report is the validation report.
type Report struct {
	Steps                             []Step
	Produced, Consumed                int64
	Skipped, ProcessedTwice, Disorder int
	Repairs                           int64
	Cutovers                          int64
	Pauses                            []time.Duration
	Moves                             []Move
}

// OK reports whether every record was processed once, in key order, and
// every move resumed each customer at its next event.
func (r Report) OK() bool {
	for _, m := range r.Moves {
		if m.Skipped != 0 || m.ProcessedTwice != 0 || m.Resumed != m.Keys {
			return false
		}
	}
	return r.Skipped == 0 && r.ProcessedTwice == 0 && r.Disorder == 0
}

// ledger is the consumer service's state: per customer, the total and the
// last sequence number seen, and how often each event was applied. It also
// notes, per move of the consumer (epoch), how each customer resumed and
// which events were handled twice or jumped over.
type ledger struct {
	mu     sync.Mutex
	totals map[string]int64
	last   map[string]int
	epochs map[string]int64 // the epoch of each customer's last event
	times  map[string]int
	disord int
	n      atomic.Int64

	epoch   func() int64 // the consumer's moves so far
	moves   map[int64]*Move
	gaps    []gap
	twiceAt map[int64]int
}

// gap is a run of a customer's events jumped over when the event after it
// was handled in epoch: skipped unless they arrive later.
type gap struct {
	epoch    int64
	cust     string
	from, to int
}

func (l *ledger) apply(_ context.Context, rec *kgo.Record) error {
	var cust string
	var seq, cents int
	if _, err := fmt.Sscanf(string(rec.Value), "%s %d %d", &cust, &seq, &cents); err != nil {
		return fmt.Errorf("malformed event %q: %w", rec.Value, err)
	}
	var e int64
	if l.epoch != nil {
		e = l.epoch()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	id := cust + " " + fmt.Sprint(seq)
	l.times[id]++
	last := l.last[cust]
	if e > 0 && last > 0 && l.epochs[cust] != e {
		m := l.moves[e]
		if m == nil {
			m = &Move{}
			l.moves[e] = m
		}
		m.Keys++
		if seq == last+1 {
			m.Resumed++
		}
	}
	if l.times[id] > 1 {
		l.twiceAt[e]++
	}
	switch {
	case seq <= last:
		l.disord++
	case seq > last+1:
		l.gaps = append(l.gaps, gap{epoch: e, cust: cust, from: last + 1, to: seq - 1})
	}
	l.last[cust] = seq
	l.epochs[cust] = e
	l.totals[cust] += int64(cents)
	l.n.Add(1)
	return nil
}

// Run performs the whole move and returns the report.
func Run(ctx context.Context, cfg Config) (Report, error) {
	var rep Report
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	say := cfg.Say
	if say == nil {
		if cfg.Out == nil {
			cfg.Out = io.Discard
		}
		say = func(format string, args ...any) { fmt.Fprintf(cfg.Out, format+"\n", args...) }
	}
	if cfg.Rate <= 0 {
		return rep, fmt.Errorf("eventsvc: Rate must be positive, got %d", cfg.Rate)
	}

	// Postgres: the flag store and the outbox holding stream repairs.
	admin, err := pgxpool.New(ctx, cfg.PostgresURL)
	if err != nil {
		return rep, err
	}
	defer admin.Close()
	if _, err := admin.Exec(ctx, `DROP SCHEMA IF EXISTS `+cfg.Schema+` CASCADE; CREATE SCHEMA `+cfg.Schema); err != nil {
		return rep, err
	}
	defer admin.Exec(context.WithoutCancel(ctx), `DROP SCHEMA IF EXISTS `+cfg.Schema+` CASCADE`) //nolint:errcheck
	pcfg, err := pgxpool.ParseConfig(cfg.PostgresURL)
	if err != nil {
		return rep, err
	}
	pcfg.ConnConfig.RuntimeParams["search_path"] = cfg.Schema
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return rep, err
	}
	defer pool.Close()
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(cfg.Schema), pgflags.WithLogger(cfg.Logger))
	if err != nil {
		return rep, err
	}
	if err := store.Install(ctx); err != nil {
		return rep, err
	}
	ctrl, err := flags.NewController(store, flags.WithControllerLogger(cfg.Logger))
	if err != nil {
		return rep, err
	}
	provider, err := pgflags.NewProvider(pool, pgflags.WithSchema(cfg.Schema), pgflags.WithResyncInterval(time.Second), pgflags.WithLogger(cfg.Logger))
	if err != nil {
		return rep, err
	}
	api := isolated.NewAPI()
	if err := api.SetProviderAndWait(ctx, provider); err != nil {
		return rep, err
	}
	defer api.Shutdown(context.WithoutCancel(ctx)) //nolint:errcheck
	source, err := flags.NewSource(api.NewClient(), flags.Off)
	if err != nil {
		return rep, err
	}
	ob, err := outbox.New(outbox.Config{Schema: cfg.Schema, Table: "stream_repairs", Buckets: 8})
	if err != nil {
		return rep, err
	}
	if err := ob.Install(ctx, pool); err != nil {
		return rep, err
	}
	repairs, err := streams.NewOutboxRepairLog(ob, pool, migration)
	if err != nil {
		return rep, err
	}

	// Two clusters; the new one can be made to take produce requests and
	// answer none (a blackhole).
	oldC, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, topic))
	if err != nil {
		return rep, err
	}
	defer oldC.Close()
	newC, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, topic))
	if err != nil {
		return rep, err
	}
	defer newC.Close()
	var down atomic.Bool
	var healMu sync.Mutex
	healed := make(chan struct{})
	newC.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		newC.KeepControl()
		if down.Load() {
			healMu.Lock()
			h := healed
			healMu.Unlock()
			newC.SleepControl(func() { <-h })
		}
		return nil, nil, false
	})
	heal := func() {
		healMu.Lock()
		defer healMu.Unlock()
		if down.Swap(false) {
			close(healed)
			healed = make(chan struct{})
		}
	}
	defer heal()
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldC.ListenAddrs()...)}, []kgo.Opt{kgo.SeedBrokers(newC.ListenAddrs()...)}

	wd, err := flags.NewWatchdog(ctrl, flags.WatchdogConfig{Window: 20 * time.Second, Interval: 500 * time.Millisecond, MinSamples: 50, MaxMismatchRate: 0.05, Cooldown: 10 * time.Minute},
		flags.WithWatchdogLogger(cfg.Logger))
	if err != nil {
		return rep, err
	}
	wd.Start()
	defer wd.Close(context.WithoutCancel(ctx)) //nolint:errcheck

	prod, err := streams.NewProducer(migration, topic, source, oldOpts, newOpts, streams.WithRepairLog(repairs),
		streams.WithCopyTimeout(2*time.Second), streams.WithProducerLogger(cfg.Logger))
	if err != nil {
		return rep, err
	}
	var repairClients [3]*kgo.Client
	for side, o := range map[flags.Side][]kgo.Opt{flags.Old: oldOpts, flags.New: newOpts} {
		cl, err := kgo.NewClient(append(o, kgo.RecordPartitioner(kgo.ManualPartitioner()))...)
		if err != nil {
			return rep, err
		}
		defer cl.Close()
		repairClients[side] = cl
	}
	relay, err := streams.NewRepairRelay(ob, pool, outbox.RelayConfig{PollInterval: 100 * time.Millisecond, Logger: cfg.Logger},
		repairClients[flags.Old], repairClients[flags.New])
	if err != nil {
		return rep, err
	}
	shadow, err := streams.NewShadow(streams.ShadowConfig{Migration: migration, Topic: topic, Old: oldOpts, New: newOpts,
		Source: source, Grace: 2 * time.Second, Observer: wd, Logger: cfg.Logger})
	if err != nil {
		return rep, err
	}
	var adm [2]*kadm.Client // old, new: where the group stands, for the report
	for i, o := range [][]kgo.Opt{oldOpts, newOpts} {
		cl, err := kgo.NewClient(o...)
		if err != nil {
			return rep, err
		}
		defer cl.Close()
		adm[i] = kadm.NewClient(cl)
	}
	l := &ledger{totals: map[string]int64{}, last: map[string]int{}, epochs: map[string]int64{}, times: map[string]int{},
		moves: map[int64]*Move{}, twiceAt: map[int64]int{}}
	cons, err := streams.NewConsumer(streams.ConsumerConfig{Migration: migration, Topic: topic, Group: "customer-totals",
		Old: oldOpts, New: newOpts, Source: source, Handler: l.apply, PollTimeout: 100 * time.Millisecond, Logger: cfg.Logger})
	if err != nil {
		return rep, err
	}
	defer cons.Close()
	l.epoch = func() int64 { return cons.Stats().Cutovers }

	// The services run until the end of the move.
	rctx, stopAll := context.WithCancel(ctx)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	wg.Go(func() {
		if err := relay.Run(rctx); err != nil && !errors.Is(err, context.Canceled) {
			errs <- fmt.Errorf("repair relay: %w", err)
		}
	})
	wg.Go(func() {
		if err := shadow.Run(rctx); err != nil {
			errs <- fmt.Errorf("shadow: %w", err)
		}
	})
	wg.Go(func() {
		if err := cons.Run(rctx); err != nil {
			errs <- fmt.Errorf("consumer: %w", err)
		}
	})
	var produced atomic.Int64
	if cfg.Tick != nil {
		wg.Go(func() {
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-rctx.Done():
					return
				case <-t.C:
				}
				st, _ := source.Stage(rctx, migration, "customer-totals")
				tk := Tick{Stage: st, Produced: produced.Load(), Consumed: l.n.Load()}
				if gs, err := statusOf(rctx, adm); err == nil {
					tk.GroupOn, tk.Lag = gs.group, gs.lag
				}
				tk.RepairsPending, _ = repairs.Pending(rctx)
				if rctx.Err() == nil {
					cfg.Tick(tk)
				}
			}
		})
	}
	var events []string
	var evMu sync.Mutex
	pctx, stopProducing := context.WithCancel(rctx)
	var pwg sync.WaitGroup
	pwg.Go(func() {
		seq := map[string]int{}
		tick := time.NewTicker(time.Second / time.Duration(cfg.Rate))
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-pctx.Done():
				return
			case <-tick.C:
			}
			cust := fmt.Sprintf("cust-%02d", i%customers)
			seq[cust]++
			v := fmt.Sprintf("%s %d %d", cust, seq[cust], 100+i%900)
			if _, err := prod.Produce(pctx, &kgo.Record{Key: []byte(cust), Value: []byte(v)}); err != nil {
				if pctx.Err() == nil {
					errs <- fmt.Errorf("producer: %w", err)
				}
				return
			}
			evMu.Lock()
			events = append(events, fmt.Sprintf("%s %d", cust, seq[cust]))
			evMu.Unlock()
			produced.Add(1)
		}
	})
	fail := func(err error) (Report, error) {
		stopProducing()
		pwg.Wait()
		stopAll()
		wg.Wait()
		_ = prod.Close(context.WithoutCancel(ctx))
		return rep, err
	}
	check := func() error {
		select {
		case err := <-errs:
			return err
		default:
			return nil
		}
	}
	wait := func(what string, d time.Duration, cond func() bool) error {
		deadline := time.Now().Add(d)
		for !cond() {
			if err := check(); err != nil {
				return err
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("timed out after %s waiting for %s", d, what)
			}
			time.Sleep(50 * time.Millisecond)
		}
		return nil
	}
	stageIs := func(s flags.Stage) func() bool {
		return func() bool { st, _ := source.Stage(ctx, migration, "customer-totals"); return st == s }
	}
	// Processed twice is known when it happens; skipped only once the
	// consumer has caught up at the end, so the steps get it then.
	twiceSoFar := func() (twice int) {
		evMu.Lock()
		defer evMu.Unlock()
		l.mu.Lock()
		defer l.mu.Unlock()
		for _, e := range events {
			if n := l.times[e]; n > 1 {
				twice += n - 1
			}
		}
		return twice
	}
	record := func(why string) {
		st, _ := source.Stage(ctx, migration, "customer-totals")
		s := Step{Stage: st, Why: why, Produced: produced.Load(), Consumed: l.n.Load()}
		if gs, err := statusOf(ctx, adm); err == nil {
			s.GroupOn, s.Lag = gs.group, gs.lag
		}
		s.ProcessedTwice = twiceSoFar()
		rep.Steps = append(rep.Steps, s)
		say("%-9s %-44s produced %5d consumed %5d group on %-4s lag %3d twice %d", s.Stage, why, s.Produced, s.Consumed, s.GroupOn, s.Lag, s.ProcessedTwice)
	}
	advance := func(why string, to flags.Stage) error {
		if _, err := ctrl.Advance(ctx, migration, "events-example", why); err != nil {
			return err
		}
		if err := wait("the provider to serve "+to.String(), 10*time.Second, stageIs(to)); err != nil {
			return err
		}
		time.Sleep(time.Second) // a second of load in the new stage
		record(why)
		return nil
	}

	say("moving topic %s between clusters under %d events/s", topic, cfg.Rate)
	time.Sleep(time.Second)
	record("start")
	for _, s := range []struct {
		to  flags.Stage
		why string
	}{{flags.DualWrite, "producers write both clusters"}, {flags.Shadow, "compare new with old"}, {flags.Live, "consumers move to new first"}} {
		if err := advance(s.why, s.to); err != nil {
			return fail(err)
		}
	}
	say("fault: the new cluster takes produce requests and answers none")
	down.Store(true)
	if err := wait("the watchdog to roll back", 60*time.Second, stageIs(flags.Shadow)); err != nil {
		return fail(err)
	}
	time.Sleep(time.Second)
	record("watchdog rolled back: new lost records")
	heal()
	if err := wait("repairs replayed", 60*time.Second, func() bool {
		n, err := repairs.Pending(ctx)
		return err == nil && n == 0 && prod.Stats().RepairingPartitions == 0
	}); err != nil {
		return fail(err)
	}
	record("healed; repairs replayed on new")
	for _, s := range []struct {
		to  flags.Stage
		why string
	}{{flags.Live, "consumers move to new again"}, {flags.RampDown, "producers take new's acknowledgement"}, {flags.Complete, "new only"}} {
		if err := advance(s.why, s.to); err != nil {
			return fail(err)
		}
	}
	stopProducing()
	pwg.Wait()
	if err := prod.Close(ctx); err != nil {
		return fail(err)
	}
	total := produced.Load()
	if err := wait("the consumer to catch up", 60*time.Second, func() bool { return l.n.Load() >= total }); err != nil {
		return fail(err)
	}
	time.Sleep(300 * time.Millisecond)
	stopAll()
	wg.Wait()
	if err := check(); err != nil {
		return rep, err
	}
	record("done")

	evMu.Lock()
	l.mu.Lock()
	for _, e := range events {
		switch n := l.times[e]; {
		case n == 0:
			rep.Skipped++
		case n > 1:
			rep.ProcessedTwice += n - 1
		}
	}
	rep.Disorder = l.disord
	for i := range rep.Steps {
		for _, e := range events[:min(len(events), int(rep.Steps[i].Produced))] {
			if l.times[e] == 0 {
				rep.Steps[i].Skipped++
			}
		}
	}
	cs := cons.Stats()
	// The consumer started on old (stage off), so its moves alternate:
	// to new, back to old, to new again.
	for e := int64(1); e <= cs.Cutovers; e++ {
		m := Move{To: flags.New}
		if e%2 == 0 {
			m.To = flags.Old
		}
		if lm := l.moves[e]; lm != nil {
			m.Keys, m.Resumed = lm.Keys, lm.Resumed
		}
		m.ProcessedTwice = l.twiceAt[e]
		for _, g := range l.gaps {
			if g.epoch != e {
				continue
			}
			for seq := g.from; seq <= g.to; seq++ {
				if l.times[g.cust+" "+fmt.Sprint(seq)] == 0 {
					m.Skipped++
				}
			}
		}
		if len(cs.Pauses) == int(cs.Cutovers) {
			m.Pause = cs.Pauses[e-1]
		}
		rep.Moves = append(rep.Moves, m)
	}
	l.mu.Unlock()
	evMu.Unlock()
	rep.Produced, rep.Consumed, rep.Repairs, rep.Cutovers, rep.Pauses = total, cs.Processed, prod.Stats().Repairs, cs.Cutovers, cs.Pauses
	var pauses []string
	for _, p := range cs.Pauses {
		pauses = append(pauses, p.Round(time.Millisecond).String())
	}
	say("validation: produced %d, consumed %d, skipped %d, processed twice %d, per-key order violations %d, repairs %d, consumer moves %d (pauses %s)",
		rep.Produced, rep.Consumed, rep.Skipped, rep.ProcessedTwice, rep.Disorder, rep.Repairs, rep.Cutovers, strings.Join(pauses, ", "))
	for i, m := range rep.Moves {
		kind := "cutover"
		if m.Rollback() {
			kind = "rollback"
		}
		say("move %d to %s (%s): %d of %d customers resumed at their next event, skipped %d, processed twice %d",
			i+1, m.To, kind, m.Resumed, m.Keys, m.Skipped, m.ProcessedTwice)
	}
	return rep, nil
}

type groupPos struct {
	group flags.Side
	lag   int64
}

// statusOf reads where the consumer group stands, through admin clients
// kept for the whole run.
func statusOf(ctx context.Context, adm [2]*kadm.Client) (groupPos, error) {
	var pos groupPos
	st, err := streams.GroupStatus(ctx, adm[0], adm[1], topic, "customer-totals", "")
	if err != nil {
		return pos, err
	}
	for _, p := range st.Partitions {
		if p.GroupOn != flags.NoSide {
			pos.group = p.GroupOn
		}
	}
	pos.lag = st.MaxGroupLag()
	return pos, nil
}
