package ordersvc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/open-feature/go-sdk/openfeature"
	"github.com/open-feature/go-sdk/openfeature/isolated"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/chaos"
	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
	"github.com/dimmer-dev/dimmer/shadowread"
)

// Shared is what every instance of the service shares: the database and
// dimmer's stores in it. Install creates them once, at deploy time.
type Shared struct {
	Pool   *pgxpool.Pool // search_path: Schema
	Schema string

	Flags *pgflags.Store
	// Fleet is the instance registry the guards read: Flags, unless a
	// console shares one read per request (console.ShareFleet, as the demo does).
	Fleet     flags.FleetStore
	Registry  *expandcontract.Registry
	Backfill  *backfill.Backfiller
	Events    *outbox.Outbox // business events, relayed to Kafka
	Repairs   *outbox.Outbox // dualwrite's repair log, replayed by the repair relay
	Heartbeat time.Duration  // instance heartbeat interval (default 1s)
}

// Open builds the shared stores over pool, whose search_path is schema (the
// service's tables and dimmer's live there).
func Open(pool *pgxpool.Pool, schema string, logger *slog.Logger) (*Shared, error) {
	if pool == nil {
		return nil, errors.New("ordersvc: pool is nil")
	}
	if logger == nil {
		logger = slog.Default()
	}
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	if err != nil {
		return nil, err
	}
	bf, err := backfill.New(pool, backfill.WithSchema(schema), backfill.WithFlagStore(store), backfill.WithLogger(logger))
	if err != nil {
		return nil, err
	}
	reg, err := expandcontract.NewRegistry(pool, expandcontract.WithSchema(schema),
		expandcontract.WithFleet(store), expandcontract.WithFlagStore(store),
		expandcontract.WithVerifier(expandcontract.GuardVerifier(bf.Guard(), store)),
		expandcontract.WithLogger(logger))
	if err != nil {
		return nil, err
	}
	events, err := outbox.New(outbox.Config{Schema: schema, Table: "order_events"})
	if err != nil {
		return nil, err
	}
	repairs, err := outbox.New(outbox.Config{Schema: schema, Table: "order_repairs"})
	if err != nil {
		return nil, err
	}
	return &Shared{Pool: pool, Schema: schema, Flags: store, Fleet: store, Registry: reg, Backfill: bf, Events: events, Repairs: repairs, Heartbeat: time.Second}, nil
}

// Install creates the legacy table and every dimmer store (idempotent), and
// registers the schema plan.
func (s *Shared) Install(ctx context.Context) error {
	return errors.Join(
		InstallLegacy(ctx, s.Pool),
		s.Flags.Install(ctx),
		s.Registry.Install(ctx),
		s.Backfill.Install(ctx),
		s.Events.Install(ctx, s.Pool),
		s.Repairs.Install(ctx, s.Pool),
		s.Registry.Register(ctx, "orders-service", Plan()),
	)
}

// Guards are the controller's go/no-go checks for this migration, beside
// the fleet barrier: a verified backfill before shadow, a clean fleet-wide
// window before live and rampdown, an empty repair log before complete —
// and before live too, because live makes new authoritative and a key whose
// repair is still pending would then be served (and overwritten) stale.
// A rollout (a canary: a share of keys served the next stage) is finished
// only once those keys gave the fleet's watchdogs enough operations in that
// stage, under the thresholds ([flags.CanaryGuard]).
func (s *Shared) Guards(wd flags.WatchdogConfig) []flags.Guard {
	return []flags.Guard{
		flags.CanaryGuard(s.Fleet, wd),
		s.Backfill.Guard(),
		flags.HealthGuard(s.Fleet, wd),
		dualwrite.NoPendingRepairsGuard(s.Repairs, s.Pool),
		flags.NewGuard("no-pending-repairs-before-live", flags.Entering(flags.Live), func(ctx context.Context, _ flags.Transition) error {
			st, err := s.Repairs.Stats(ctx, s.Pool, dualwrite.RepairTopic(Migration))
			if err != nil {
				return err
			}
			if st.Pending > 0 {
				return fmt.Errorf("%d repairs pending (%d dead): new would become authoritative while behind", st.Pending, st.Dead)
			}
			return nil
		}),
	}
}

// Config is one instance's configuration.
type Config struct {
	ID, Build string
	// Controller moves the stage; the watchdog rolls back through it.
	Controller *flags.Controller
	Watchdog   flags.WatchdogConfig
	// Kafka produces the order events (acks=all, idempotent: see
	// kafkasink.ClientOptions). Nil: events stay in the outbox.
	Kafka *kgo.Client
	// NewFaults, when set, is put in front of every new-side call (writes,
	// reads, repairs): the demo's fault on the new store.
	NewFaults *chaos.Injector
	// Observer also receives every observation (the demo's counters).
	Observer flags.Observer
	Logger   *slog.Logger
}

// Instance is one running instance of the orders service.
type Instance struct {
	cfg      Config
	shared   *Shared
	api      *openfeature.EvaluationAPI
	provider *pgflags.Provider
	source   *flags.Source
	watchdog *flags.Watchdog
	hb       *flags.Heartbeater
	writer   *dualwrite.Writer[Order, bool]
	getter   *shadowread.Reader[string, Order]
	lister   *shadowread.Reader[string, []Order]
	relays   []*outbox.Relay
	st       *stores

	runCtx context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type teeObserver []flags.Observer

func (t teeObserver) Observe(o flags.Observation) {
	for _, x := range t {
		if x != nil {
			x.Observe(o)
		}
	}
}

// Start checks the schema stage against this build's range (refusing to
// run against an incompatible one), then starts the flag provider, the
// watchdog, the heartbeat and the relays. Close stops them.
func Start(ctx context.Context, shared *Shared, cfg Config) (*Instance, error) {
	switch {
	case cfg.ID == "":
		return nil, errors.New("ordersvc: Config.ID is required")
	case cfg.Controller == nil:
		return nil, errors.New("ordersvc: Config.Controller is required")
	}
	if cfg.Build == "" {
		cfg.Build = "orders-service"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := shared.Registry.Check(ctx, Needs()); err != nil {
		return nil, err
	}
	in := &Instance{cfg: cfg, shared: shared, st: &stores{oldDB: shared.Pool, newDB: shared.Pool, events: shared.Events}}
	ok := false
	defer func() {
		if !ok {
			in.Close(context.Background())
		}
	}()
	var err error
	in.provider, err = pgflags.NewProvider(shared.Pool, pgflags.WithSchema(shared.Schema), pgflags.WithResyncInterval(2*time.Second), pgflags.WithLogger(cfg.Logger))
	if err != nil {
		return nil, err
	}
	in.api = isolated.NewAPI()
	if err := in.api.SetProviderAndWait(ctx, in.provider); err != nil {
		return nil, err
	}
	in.source, err = flags.NewSource(in.api.NewClient(), flags.Off, flags.WithSourceLogger(cfg.Logger))
	if err != nil {
		return nil, err
	}
	in.watchdog, err = flags.NewWatchdog(cfg.Controller, cfg.Watchdog, flags.WithWatchdogLogger(cfg.Logger), flags.WithStates(in.provider.Snapshot))
	if err != nil {
		return nil, err
	}
	obs := teeObserver{in.watchdog, cfg.Observer}

	// The side functions. The new side goes through the fault injector
	// when one is set, reads and writes alike.
	writeSide := func(side flags.Side) dualwrite.Func[Order, bool] {
		f := func(ctx context.Context, o Order) (bool, error) { return in.st.write(ctx, side, o, true, false) }
		if side == flags.New && cfg.NewFaults != nil {
			return attributed(side, chaos.Wrap(cfg.NewFaults, f))
		}
		return f
	}
	getSide := func(side flags.Side) shadowread.Func[string, Order] {
		f := func(ctx context.Context, id string) (Order, error) {
			o, _, err := in.st.get(ctx, side, id)
			return o, err
		}
		if side == flags.New && cfg.NewFaults != nil {
			return attributed(side, chaos.Wrap(cfg.NewFaults, f))
		}
		return f
	}
	listSide := func(side flags.Side) shadowread.Func[string, []Order] {
		f := func(ctx context.Context, c string) ([]Order, error) { return in.st.byCustomer(ctx, side, c) }
		if side == flags.New && cfg.NewFaults != nil {
			return attributed(side, chaos.Wrap(cfg.NewFaults, f))
		}
		return f
	}

	repairLog, err := dualwrite.NewOutboxRepairLog(shared.Repairs, shared.Pool, dualwrite.RepairTopic(Migration))
	if err != nil {
		return nil, err
	}
	// Sync secondary writes: when the API answers, both sides hold the
	// write or a repair is recorded, so whichever side serves the next
	// request for the order has it.
	in.writer, err = dualwrite.New(Migration, in.source, writeSide(flags.Old), writeSide(flags.New), func(o Order) string { return o.ID },
		dualwrite.WithSync(), dualwrite.WithRepairLog(repairLog), dualwrite.WithObserver(obs),
		dualwrite.WithSecondaryTimeout(500*time.Millisecond), dualwrite.WithBreakerTrip(5, 500*time.Millisecond),
		dualwrite.WithLogger(cfg.Logger))
	if err != nil {
		return nil, err
	}
	cmpOpts := []shadowread.Option{shadowread.WithObserver(obs), shadowread.WithShadowTimeout(time.Second),
		shadowread.WithRecheck(100 * time.Millisecond), shadowread.WithLogger(cfg.Logger),
		shadowread.WithReports(shadowread.SlogSink(cfg.Logger), 5*time.Second, nil)}
	in.getter, err = shadowread.New(Migration, in.source, getSide(flags.Old), getSide(flags.New), func(id string) string { return id },
		append(cmpOpts, shadowread.WithComparator(shadowread.DeepCompare[Order](shadowread.EquateEmpty())))...)
	if err != nil {
		return nil, err
	}
	// A list is keyed by its customer: with a percentage rollout a
	// customer's list moves with the customer.
	in.lister, err = shadowread.New(Migration, in.source, listSide(flags.Old), listSide(flags.New), func(c string) string { return c },
		append(cmpOpts, shadowread.WithComparator(shadowread.DeepCompare[[]Order](shadowread.EquateEmpty())))...)
	if err != nil {
		return nil, err
	}

	// Repairs re-read the authoritative side and store it on the other.
	load := func(ctx context.Context, side flags.Side, key string) (Order, bool, error) {
		if side == flags.New && cfg.NewFaults != nil {
			if err := cfg.NewFaults.Before(ctx); err != nil {
				return Order{}, false, err
			}
		}
		return in.st.get(ctx, side, key)
	}
	store := func(ctx context.Context, side flags.Side, _ string, o Order) error {
		if side == flags.New && cfg.NewFaults != nil {
			if err := cfg.NewFaults.Before(ctx); err != nil {
				return err
			}
		}
		_, err := in.st.write(ctx, side, o, false, true)
		return err
	}
	repairer, err := dualwrite.NewRepairer(Migration, in.source, load, store, dualwrite.WithRepairerLogger(cfg.Logger))
	if err != nil {
		return nil, err
	}
	rcfg := outbox.RelayConfig{ID: cfg.ID + "-repairs", PollInterval: 200 * time.Millisecond, LeaseTTL: 3 * time.Second,
		MaxAttempts: 50, BackoffMin: 50 * time.Millisecond, BackoffMax: 500 * time.Millisecond, Logger: cfg.Logger}
	repairRelay, err := dualwrite.NewRepairRelay(shared.Repairs, shared.Pool, rcfg, repairer)
	if err != nil {
		return nil, err
	}
	in.relays = append(in.relays, repairRelay)
	if cfg.Kafka != nil {
		pub, err := kafkasink.New(cfg.Kafka)
		if err != nil {
			return nil, err
		}
		evRelay, err := shared.Events.NewRelay(shared.Pool, pub, outbox.RelayConfig{ID: cfg.ID + "-events", PollInterval: 200 * time.Millisecond,
			LeaseTTL: 3 * time.Second, Logger: cfg.Logger})
		if err != nil {
			return nil, err
		}
		in.relays = append(in.relays, evRelay)
	}

	hbEvery := shared.Heartbeat
	if hbEvery <= 0 {
		hbEvery = time.Second
	}
	schemaAttrs := expandcontract.Attributes(Needs())
	in.hb, err = flags.NewHeartbeater(shared.Flags, cfg.ID, cfg.Build, in.provider.Revisions,
		flags.WithHeartbeatInterval(hbEvery), flags.WithHeartbeatLogger(cfg.Logger),
		flags.WithAttributes(func() map[string]string {
			a := in.watchdog.Attributes()
			if a == nil {
				a = map[string]string{}
			}
			maps.Copy(a, schemaAttrs())
			return a
		}))
	if err != nil {
		return nil, err
	}
	if err := in.hb.Start(ctx); err != nil {
		return nil, err
	}
	in.watchdog.Start()
	in.runCtx, in.cancel = context.WithCancel(context.Background())
	for _, r := range in.relays {
		in.wg.Go(func() { _ = r.Run(in.runCtx) })
	}
	ok = true
	return in, nil
}

// ID is the instance's id in the fleet registry.
func (in *Instance) ID() string { return in.cfg.ID }

// Watchdog is the instance's watchdog (its windows, for status displays).
func (in *Instance) Watchdog() *flags.Watchdog { return in.watchdog }

// Beat sends a heartbeat now (the fleet registry then holds this instance's
// current revisions and windows).
func (in *Instance) Beat(ctx context.Context) error { return in.hb.Beat(ctx) }

// Stage is the stage this instance evaluates for key.
func (in *Instance) Stage(ctx context.Context, key string) flags.Stage {
	st, _ := in.source.Stage(ctx, Migration, key)
	return st
}

// Close stops the relays (handing their leases back), the writer, the
// watchdog, the heartbeat (deregistering) and the flag provider.
func (in *Instance) Close(ctx context.Context) error {
	var errs []error
	for _, r := range in.relays {
		if in.cancel != nil {
			errs = append(errs, r.Shutdown(ctx))
		}
	}
	if in.cancel != nil {
		in.cancel()
		in.wg.Wait()
	}
	if in.writer != nil {
		errs = append(errs, in.writer.Shutdown(ctx))
	}
	if in.getter != nil {
		errs = append(errs, in.getter.Shutdown(ctx))
	}
	if in.lister != nil {
		errs = append(errs, in.lister.Shutdown(ctx))
	}
	if in.watchdog != nil {
		errs = append(errs, in.watchdog.Close(ctx))
	}
	if in.hb != nil {
		errs = append(errs, in.hb.Close(ctx))
	}
	if in.api != nil {
		errs = append(errs, in.api.Shutdown(ctx))
	}
	return errors.Join(errs...)
}

// attributed names side in the errors of f (an injected fault included).
func attributed[In, Out any](side flags.Side, f func(context.Context, In) (Out, error)) func(context.Context, In) (Out, error) {
	return func(ctx context.Context, in In) (Out, error) {
		out, err := f(ctx, in)
		return out, sideErr(side, err)
	}
}
