package flags_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/open-feature/go-sdk/openfeature"
	"github.com/open-feature/go-sdk/openfeature/memprovider"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

func postgresURL() string {
	if u := os.Getenv("DIMMER_POSTGRES_URL"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
}

// exampleStore opens a Postgres flag store in a throwaway schema.
func exampleStore(ctx context.Context, schema string) (*pgflags.Store, func(), error) {
	schema += "_" + strconv.Itoa(os.Getpid()) // two test runs at once keep apart
	pool, err := pgxpool.New(ctx, postgresURL())
	if err != nil {
		return nil, nil, err
	}
	drop := func() {
		_, _ = pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
	}
	drop() // a run killed midway may have left it
	cleanup := func() { drop(); pool.Close() }
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema), pgflags.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	if err == nil {
		err = store.Install(ctx)
	}
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	return store, cleanup, nil
}

// The routing table: what each stage writes, serves and compares.
func ExampleStage() {
	for _, s := range flags.Stages() {
		fmt.Printf("%-9s writes old=%-5v new=%-5v authoritative=%s reads=%s compared=%s\n",
			s, s.Writes(flags.Old), s.Writes(flags.New), s.Authoritative(), s.Reads(), s.Compared())
	}
	// Output:
	// off       writes old=true  new=false authoritative=old reads=old compared=none
	// dualwrite writes old=true  new=true  authoritative=old reads=old compared=none
	// shadow    writes old=true  new=true  authoritative=old reads=old compared=new
	// live      writes old=true  new=true  authoritative=new reads=new compared=old
	// rampdown  writes old=true  new=true  authoritative=new reads=new compared=none
	// complete  writes old=false new=true  authoritative=new reads=new compared=none
}

// Evaluating the stage per entity through any OpenFeature provider (here the
// SDK's in-memory one).
func ExampleSource() {
	ctx := context.Background()
	provider := memprovider.NewInMemoryProvider(map[string]memprovider.InMemoryFlag{
		"orders": {Key: "orders", State: memprovider.Enabled, DefaultVariant: "on",
			Variants: map[string]any{"on": "shadow"}},
	})
	if err := openfeature.SetProviderAndWait(provider); err != nil {
		fmt.Println(err)
		return
	}
	source, err := flags.NewSource(openfeature.NewDefaultClient(), flags.Off,
		flags.WithSourceLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	if err != nil {
		fmt.Println(err)
		return
	}
	stage, err := source.Stage(ctx, "orders", "customer-42")
	fmt.Println(stage, err)

	// A flag never set reads as off, without an error.
	stage, err = source.Stage(ctx, "invoices", "customer-42")
	fmt.Println(stage, errors.Is(err, flags.ErrFlagUnavailable))
	// Output:
	// shadow <nil>
	// off false
}

// Advancing a migration through the guarded controller, a refused jump, and
// a rollback.
func ExampleController() {
	ctx := context.Background()
	store, cleanup, err := exampleStore(ctx, "dimmer_example_controller")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer cleanup()
	backfilled := false
	ctrl, err := flags.NewController(store,
		flags.WithControllerLogger(slog.New(slog.NewTextHandler(io.Discard, nil))),
		flags.WithGuards(flags.NewGuard("backfill-verified", flags.Entering(flags.Shadow),
			func(ctx context.Context, t flags.Transition) error {
				if !backfilled {
					return errors.New("run and verify the backfill first")
				}
				return nil
			})))
	if err != nil {
		fmt.Println(err)
		return
	}
	st, _ := ctrl.Advance(ctx, "orders", "alice", "start dual writes")
	fmt.Println("now", st.Stage)

	_, err = ctrl.Advance(ctx, "orders", "alice", "shadow please")
	fmt.Println(err)

	backfilled = true
	st, _ = ctrl.Advance(ctx, "orders", "alice", "backfill verified")
	fmt.Println("now", st.Stage)

	st, _ = ctrl.Set(ctx, flags.Request{Migration: "orders", Stage: flags.Off, Actor: "bob", Reason: "incident 12"})
	fmt.Println("now", st.Stage, "epoch", st.Epoch)

	entries, _ := store.Audit(ctx, "orders", 0)
	for _, e := range entries {
		fmt.Println(e.Outcome, e.From, "->", e.To, "by", e.Actor+":", e.Reason)
	}
	// Output:
	// now dualwrite
	// orders: transition dualwrite -> shadow refused:
	//   - backfill-verified: run and verify the backfill first
	// now shadow
	// now off epoch 1
	// applied shadow -> off by bob: incident 12
	// applied dualwrite -> shadow by alice: backfill verified
	// refused dualwrite -> shadow by alice: shadow please
	// applied off -> dualwrite by alice: start dual writes
}

// An instance joins the fleet; the fleet barrier holds the next step until
// it has applied the current revision.
func ExampleHeartbeater() {
	ctx := context.Background()
	store, cleanup, err := exampleStore(ctx, "dimmer_example_heartbeater")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer cleanup()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctrl, _ := flags.NewController(store, flags.WithFleet(store), flags.WithControllerLogger(quiet))

	applied := map[string]int64{} // a provider's Revisions method in a service
	hb, err := flags.NewHeartbeater(store, "api-1", "v1.4.2", func() map[string]int64 { return applied })
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := hb.Start(ctx); err != nil {
		fmt.Println(err)
		return
	}
	defer hb.Close(ctx)

	st, _ := ctrl.Advance(ctx, "orders", "alice", "start dual writes")
	_, err = ctrl.Advance(ctx, "orders", "alice", "too soon")
	fmt.Println(err)

	applied["orders"] = st.Revision // the provider saw the flip
	_ = hb.Beat(ctx)
	st, _ = ctrl.Advance(ctx, "orders", "alice", "fleet caught up")
	fmt.Println("now", st.Stage)
	// Output:
	// orders: transition dualwrite -> shadow refused:
	//   - fleet-acknowledged: 1 of 1 instances have not applied revision 1: api-1 at revision 0
	// now shadow
}

// The watchdog steps a migration back when lasting mismatches cross the
// threshold, and audits why.
func ExampleWatchdog() {
	ctx := context.Background()
	store, cleanup, err := exampleStore(ctx, "dimmer_example_watchdog")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer cleanup()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctrl, _ := flags.NewController(store, flags.WithControllerLogger(quiet))
	for range 3 {
		_, _ = ctrl.Advance(ctx, "orders", "alice", "step")
	}
	wd, err := flags.NewWatchdog(ctrl, flags.WatchdogConfig{MinSamples: 100, MaxMismatchRate: 0.01},
		flags.WithWatchdogLogger(quiet))
	if err != nil {
		fmt.Println(err)
		return
	}
	time.Sleep(time.Second) // observations start after the last change's slot

	// What shadowread reports in live: old compared with new, 5 % differ.
	for i := range 200 {
		wd.Observe(flags.Observation{Migration: "orders", Stage: flags.Live, Op: flags.Read, Side: flags.Old,
			Compared: true, Mismatch: i%20 == 0, Lasting: i%20 == 0})
	}
	for _, trip := range wd.Judge(ctx) { // Start runs Judge every Interval
		fmt.Println(trip.Stage, "->", trip.State.Stage, ":", trip.Reason)
	}
	entries, _ := store.Audit(ctx, "orders", 1)
	fmt.Println(entries[0].Actor, entries[0].From, "->", entries[0].To)
	// Output:
	// live -> shadow : lasting mismatch rate 5.00% over 200 comparisons > 1.00%
	// watchdog live -> shadow
}
