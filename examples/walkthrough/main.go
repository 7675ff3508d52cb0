// Command walkthrough takes one migration through every stage against the
// real stores, the way an operator would with the dimmer CLI: three service
// instances evaluate the stage flag through the Postgres provider, heartbeat
// into the fleet registry and feed their watchdogs from a live workload; the
// controller advances stage by stage with its guards, a skipped stage is
// refused with every failed check, the operator rolls back and advances
// again, and the audit log is printed at the end.
//
// It uses DIMMER_POSTGRES_URL (default the local server), works in a schema
// of its own and drops it when done. `make demo` runs it.
package main

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/open-feature/go-sdk/openfeature"
	"github.com/open-feature/go-sdk/openfeature/isolated"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

const (
	migration = "users-email"
	rows      = 2000
	instances = 3
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "walkthrough failed:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, out io.Writer) error {
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	schema := "dimmer_walkthrough_" + randomHex(4)
	pool, err := openPool(ctx, url, schema)
	if err != nil {
		return err
	}
	defer func() {
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = pool.Exec(c, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
		pool.Close()
	}()
	p := func(format string, args ...any) { fmt.Fprintf(out, format+"\n", args...) }

	p("== set-up: schema %s on %s", schema, redact(url))
	if _, err := pool.Exec(ctx, `
		CREATE TABLE users_old (id int PRIMARY KEY, email text NOT NULL);
		CREATE TABLE users_new (id int PRIMARY KEY, email text NOT NULL);
		INSERT INTO users_old SELECT g, 'user' || g || '@example.com' FROM generate_series(1, `+fmt.Sprint(rows)+`) g`); err != nil {
		return fmt.Errorf("create tables: %w", err)
	}
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	if err != nil {
		return err
	}
	if err := store.Install(ctx); err != nil {
		return err
	}
	p("   old table users_old has %d rows, new table users_new is empty", rows)

	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	wdCfg := flags.WatchdogConfig{Window: 8 * time.Second, Interval: 200 * time.Millisecond, MinSamples: 300, MaxMismatchRate: 0.01}
	backfilled := &atomic.Bool{}
	ctrl, err := flags.NewController(store,
		flags.WithFleet(store),
		flags.WithGuards(
			backfillGuard(pool, backfilled),
			flags.HealthGuard(store, wdCfg),
		),
		flags.WithControllerLogger(quiet))
	if err != nil {
		return err
	}

	// The service fleet.
	var fleet []*instance
	for i := range instances {
		in, err := startInstance(ctx, pool, schema, store, ctrl, wdCfg, fmt.Sprintf("api-%d", i+1), quiet)
		if err != nil {
			return err
		}
		defer in.close()
		fleet = append(fleet, in)
	}
	p("   %d service instances started: Postgres flag provider, fleet heartbeat, watchdog, live workload", instances)

	show := func() error {
		st, err := ctrl.Status(ctx, migration, store)
		if err != nil {
			return err
		}
		var ok, total int64
		for _, in := range fleet {
			ok += in.ops.Load()
			total += in.ops.Load() + in.errs.Load()
		}
		if st.State.Stage == flags.Complete {
			p("   stage %s (revision %d); workload %d ops so far, %d errors; nothing left to advance", st.State, st.State.Revision, total, total-ok)
			return nil
		}
		p("   stage %s (revision %d); workload %d ops so far, %d errors; next: %s -> %s:", st.State, st.State.Revision, total, total-ok, st.State.Stage, st.Next)
		for _, ch := range st.Checks {
			mark := "PASS"
			if !ch.Passed {
				mark = "FAIL"
			}
			p("     [%s] %s: %s", mark, ch.Name, ch.Detail)
		}
		return nil
	}
	set := func(to flags.Stage, pct float64, reason string) error {
		cur, err := store.Load(ctx, migration)
		if err != nil {
			return err
		}
		if to > cur.Stage {
			// Forward steps wait for the guards to pass on their merits:
			// the fleet has the revision and enough clean comparisons.
			if err := waitReady(ctx, ctrl, store, fleet); err != nil {
				return err
			}
		}
		var st flags.State
		if pct > 0 && pct < 100 {
			st, err = ctrl.Rollout(ctx, migration, to, pct, "operator", reason)
		} else {
			st, err = ctrl.Set(ctx, flags.Request{Migration: migration, Stage: to, Actor: "operator", Reason: reason})
		}
		if err != nil {
			return err
		}
		p("-> %s (revision %d): %s", st, st.Revision, reason)
		return waitFleet(ctx, store, st.Revision)
	}

	p("\n== 1. a new migration reads as off")
	if err := show(); err != nil {
		return err
	}

	p("\n== 2. jumping from off straight to live is refused, with every failed check")
	_, err = ctrl.Set(ctx, flags.Request{Migration: migration, Stage: flags.Live, Actor: "operator", Reason: "in a hurry"})
	var refused *flags.RefusedError
	if !errors.As(err, &refused) {
		return fmt.Errorf("expected a refusal, got %v", err)
	}
	for _, line := range strings.Split(err.Error(), "\n") {
		p("   %s", line)
	}

	p("\n== 3. dualwrite: new is written too; old stays authoritative")
	if err := set(flags.DualWrite, 0, "start writing the new table"); err != nil {
		return err
	}
	p("   shadow needs a verified backfill first:")
	if err := show(); err != nil {
		return err
	}
	n, err := backfill(ctx, pool)
	if err != nil {
		return err
	}
	backfilled.Store(true)
	p("   backfill copied %d rows (an upsert that never overwrites a dual write)", n)

	p("\n== 4. shadow: new is read in the background and compared")
	if err := set(flags.Shadow, 0, "backfill verified"); err != nil {
		return err
	}
	if err := waitSamples(ctx, fleet, flags.Shadow, wdCfg.MinSamples); err != nil {
		return err
	}
	if err := show(); err != nil {
		return err
	}

	p("\n== 5. canary: live for 10%% of users (sticky by user id), shadow for the rest")
	if err := set(flags.Live, 10, "canary"); err != nil {
		return err
	}
	p("\n== 6. live: new is authoritative; old is still written and compared")
	if err := set(flags.Live, 0, "canary clean"); err != nil {
		return err
	}
	p("\n== 7. something flickers: a bug corrupts 10%% of the new rows while live")
	if _, err := pool.Exec(ctx, `UPDATE users_new SET email = 'corrupted@example.com' WHERE id % 10 = 0`); err != nil {
		return err
	}
	trip, err := waitTrip(ctx, fleet)
	if err != nil {
		return err
	}
	p("   the watchdog of %s stepped %s back by itself after %v: %s", trip.instance, trip.Stage, trip.after.Round(time.Millisecond), trip.Reason)
	st, err := store.Load(ctx, migration)
	if err != nil {
		return err
	}
	p("   stage is now %s (revision %d): reads are served from old again", st, st.Revision)
	if err := waitFleet(ctx, store, st.Revision); err != nil {
		return err
	}
	tag, err := pool.Exec(ctx, `UPDATE users_new n SET email = o.email FROM users_old o WHERE n.id = o.id AND n.email <> o.email`)
	if err != nil {
		return err
	}
	p("   the bug is fixed and %d rows are repaired from old; live again once shadow is clean over the window", tag.RowsAffected())
	if err := waitReady(ctx, ctrl, store, fleet); err != nil {
		return err
	}
	if err := set(flags.Live, 0, "repaired; shadow clean"); err != nil {
		return err
	}
	if err := waitSamples(ctx, fleet, flags.Live, wdCfg.MinSamples); err != nil {
		return err
	}
	if err := waitReady(ctx, ctrl, store, fleet); err != nil {
		return err
	}
	p("\n== 8. rampdown, then complete: old is no longer written")
	if err := set(flags.RampDown, 0, "live clean over the window"); err != nil {
		return err
	}
	if err := set(flags.Complete, 0, "old retired"); err != nil {
		return err
	}
	_, err = ctrl.Set(ctx, flags.Request{Migration: migration, Stage: flags.Live, Actor: "operator", Reason: "second thoughts"})
	if errors.As(err, &refused) {
		p("   leaving complete without proof is refused: %s", refused.Failed[0].Detail)
	}
	if err := show(); err != nil {
		return err
	}

	p("\n== 9. the audit log (newest first)")
	entries, err := store.Audit(ctx, migration, 0)
	if err != nil {
		return err
	}
	for _, e := range entries {
		forced := ""
		if e.Forced {
			forced = " (forced)"
		}
		p("   %s %-7s %-20s -> %-20s by %-8s %s%s", e.At.Format("15:04:05.000"), e.Outcome, e.From, e.To, e.Actor, e.Reason, forced)
		for _, ch := range e.Checks {
			if !ch.Passed {
				p("        failed %s: %s", ch.Name, ch.Detail)
			}
		}
	}
	var errsTotal int64
	for _, in := range fleet {
		errsTotal += in.errs.Load()
	}
	p("\n== done: %d workload errors across the walk", errsTotal)
	if errsTotal > 0 {
		return fmt.Errorf("%d workload operations failed", errsTotal)
	}
	return nil
}

func openPool(ctx context.Context, url, schema string) (*pgxpool.Pool, error) {
	admin, err := pgx.Connect(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("connect to Postgres at %s: %w", redact(url), err)
	}
	_, err = admin.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize())
	admin.Close(ctx)
	if err != nil {
		return nil, err
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	cfg.MaxConns = 20
	return pgxpool.NewWithConfig(ctx, cfg)
}

// backfillGuard is the walkthrough's stand-in for the backfill package's
// verification: every old row is in new with the same content.
func backfillGuard(pool *pgxpool.Pool, done *atomic.Bool) flags.Guard {
	return flags.NewGuard("backfill-verified", flags.Entering(flags.Shadow), func(ctx context.Context, t flags.Transition) error {
		if !done.Load() {
			return errors.New("no backfill has run since new started receiving writes")
		}
		// Rows written between the two sides of a dual write differ for a
		// moment: recheck differing rows before calling them missing.
		var missing int
		for attempt := 0; attempt < 3; attempt++ {
			err := pool.QueryRow(ctx, `SELECT count(*) FROM users_old o LEFT JOIN users_new n USING (id) WHERE n.email IS DISTINCT FROM o.email`).Scan(&missing)
			if err != nil {
				return err
			}
			if missing == 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if missing > 0 {
			return fmt.Errorf("%d rows differ between old and new", missing)
		}
		return nil
	})
}

func backfill(ctx context.Context, pool *pgxpool.Pool) (int64, error) {
	tag, err := pool.Exec(ctx, `INSERT INTO users_new SELECT id, email FROM users_old ON CONFLICT (id) DO NOTHING`)
	return tag.RowsAffected(), err
}

func waitFleet(ctx context.Context, store *pgflags.Store, rev int64) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		insts, err := store.Instances(ctx)
		if err != nil {
			return err
		}
		acked := 0
		for _, in := range insts {
			if in.Applied[migration] >= rev {
				acked++
			}
		}
		if acked == len(insts) && acked > 0 {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("fleet did not acknowledge revision %d in 10s", rev)
}

type tripSeen struct {
	flags.Trip
	instance string
	after    time.Duration
}

func waitTrip(ctx context.Context, fleet []*instance) (tripSeen, error) {
	start := time.Now()
	timeout := time.After(30 * time.Second)
	for {
		for _, in := range fleet {
			select {
			case t := <-in.trips:
				return tripSeen{Trip: t, instance: in.id, after: time.Since(start)}, nil
			default:
			}
		}
		select {
		case <-timeout:
			return tripSeen{}, errors.New("the watchdog did not roll back within 30s")
		case <-ctx.Done():
			return tripSeen{}, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func waitReady(ctx context.Context, ctrl *flags.Controller, store *pgflags.Store, fleet []*instance) error {
	deadline := time.Now().Add(40 * time.Second)
	for time.Now().Before(deadline) {
		for _, in := range fleet {
			if err := in.hb.Beat(ctx); err != nil {
				return err
			}
		}
		st, err := ctrl.Status(ctx, migration, store)
		if err != nil {
			return err
		}
		if st.Ready {
			return nil
		}
		time.Sleep(250 * time.Millisecond)
	}
	return errors.New("the next step was not ready within 40s")
}

func waitSamples(ctx context.Context, fleet []*instance, stage flags.Stage, min int) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		var compared int64
		for _, in := range fleet {
			compared += in.wd.Health(migration, stage).Compared
		}
		if compared >= int64(min) {
			// One more beat so the registry holds the sample.
			for _, in := range fleet {
				if err := in.hb.Beat(ctx); err != nil {
					return err
				}
			}
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("fewer than %d comparisons in %s after 30s", min, stage)
}

// instance is one service process: it evaluates the stage per user and
// routes a small read/write workload by the routing table of package flags.
type instance struct {
	id     string
	api    *openfeature.EvaluationAPI
	source *flags.Source
	hb     *flags.Heartbeater
	wd     *flags.Watchdog
	trips  chan flags.Trip
	ops    atomic.Int64
	errs   atomic.Int64
	stop   context.CancelFunc
	wg     sync.WaitGroup
}

func startInstance(ctx context.Context, pool *pgxpool.Pool, schema string, store *pgflags.Store, ctrl *flags.Controller, wdCfg flags.WatchdogConfig, id string, logger *slog.Logger) (*instance, error) {
	provider, err := pgflags.NewProvider(pool, pgflags.WithSchema(schema), pgflags.WithResyncInterval(2*time.Second), pgflags.WithLogger(logger))
	if err != nil {
		return nil, err
	}
	api := isolated.NewAPI()
	if err := api.SetProviderAndWait(ctx, provider); err != nil {
		return nil, err
	}
	source, err := flags.NewSource(api.NewClient(), flags.Off, flags.WithSourceLogger(logger))
	if err != nil {
		return nil, err
	}
	in := &instance{id: id, api: api, source: source, trips: make(chan flags.Trip, 4)}
	wd, err := flags.NewWatchdog(ctrl, wdCfg, flags.WithWatchdogLogger(logger), flags.WithStates(provider.Snapshot), flags.OnTrip(func(t flags.Trip) {
		if t.Err == nil {
			in.trips <- t
		}
	}))
	if err != nil {
		return nil, err
	}
	hb, err := flags.NewHeartbeater(store, id, "walkthrough", provider.Revisions,
		flags.WithHeartbeatInterval(200*time.Millisecond), flags.WithTTL(5*time.Second), flags.WithAttributes(wd.Attributes), flags.WithHeartbeatLogger(logger))
	if err != nil {
		return nil, err
	}
	if err := hb.Start(ctx); err != nil {
		return nil, err
	}
	wd.Start()
	in.hb, in.wd = hb, wd
	loopCtx, cancel := context.WithCancel(context.Background())
	in.stop = cancel
	in.wg.Add(1)
	go func() {
		defer in.wg.Done()
		for loopCtx.Err() == nil {
			if err := in.operate(loopCtx, pool); err != nil && loopCtx.Err() == nil {
				in.errs.Add(1)
			} else {
				in.ops.Add(1)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return in, nil
}

func (in *instance) operate(ctx context.Context, pool *pgxpool.Pool) error {
	id := 1 + rand.IntN(rows)
	key := fmt.Sprint(id)
	stage, _ := in.source.Stage(ctx, migration, key)
	table := map[flags.Side]string{flags.Old: "users_old", flags.New: "users_new"}
	if rand.IntN(4) == 0 {
		email := fmt.Sprintf("user%d+%s@example.com", id, randomHex(2))
		// Both tables live in one database here, so one transaction keeps
		// two racing writers of a key in the same order on both sides (the
		// authoritative row lock is taken first). Across stores, package
		// dualwrite's repairs do that job.
		return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			for _, side := range []flags.Side{stage.Authoritative(), stage.Secondary()} {
				if side == flags.NoSide {
					continue
				}
				start := time.Now()
				_, err := tx.Exec(ctx, "INSERT INTO "+table[side]+" (id, email) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET email = excluded.email", id, email)
				in.wd.Observe(flags.Observation{Migration: migration, Stage: stage, Op: flags.Write, Side: side, Latency: time.Since(start), Err: err != nil})
				if err != nil {
					return err
				}
			}
			return nil
		})
	}
	read := func(side flags.Side) (string, error) {
		var email string
		err := pool.QueryRow(ctx, "SELECT email FROM "+table[side]+" WHERE id = $1", id).Scan(&email)
		if errors.Is(err, pgx.ErrNoRows) {
			return "", nil
		}
		return email, err
	}
	served, err := read(stage.Reads())
	if err != nil {
		return err
	}
	if cmp := stage.Compared(); cmp != flags.NoSide {
		start := time.Now()
		other, err := read(cmp)
		o := flags.Observation{Migration: migration, Stage: stage, Op: flags.Read, Side: cmp, Latency: time.Since(start), Err: err != nil}
		if err == nil {
			o.Compared = true
			o.Mismatch = other != served
			if o.Mismatch {
				// A write may have landed between the two reads: look
				// again before calling it a lasting difference.
				time.Sleep(5 * time.Millisecond)
				a, errA := read(stage.Reads())
				b, errB := read(cmp)
				o.Lasting = errA != nil || errB != nil || a != b
			}
		}
		in.wd.Observe(o)
	}
	return nil
}

func (in *instance) close() {
	in.stop()
	in.wg.Wait()
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = in.wd.Close(c)
	_ = in.hb.Close(c)
	_ = in.api.Shutdown(c)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = crand.Read(b)
	return hex.EncodeToString(b)
}

func redact(u string) string {
	if i := strings.Index(u, "@"); i > 0 {
		if j := strings.Index(u, "://"); j >= 0 && strings.Contains(u[j+3:i], ":") {
			return u[:j+3] + "***" + u[i:]
		}
	}
	return u
}
