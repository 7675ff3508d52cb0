package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/url"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// cdcMigration is the stage flag of the invoices move.
const cdcMigration = "invoices_v2"

// cdcConfig sizes the invoices move.
type cdcConfig struct {
	// AdminURL is the logical-replication server (any database on it): the
	// move creates two databases of its own there and drops them.
	AdminURL string
	Rows     int           // invoices in the table before the sync starts
	Writers  int           // concurrent writers of the billing service
	Stream   time.Duration // how long the sync streams under writes before the cutover
	After    time.Duration // how long the writers write the new side after it
	Say      func(format string, args ...any)
	Logger   *slog.Logger
}

// cdcReport is what the move measured.
type cdcReport struct {
	Old, New string // databases (dropped at the end)
	// Copied rows by the initial copy; Streamed changes applied from the log.
	Copied, Streamed int64
	// LagP50 and LagP99: commit on the old side to applied on the new, per
	// change committed once the sync streams.
	LagP50, LagP99 time.Duration
	// Cutover is the fenced cutover's result; LongestWait the longest any
	// writer waited at the fence; Held the writes that gave up waiting
	// (retried, not lost).
	Cutover     cdc.CutoverResult
	LongestWait time.Duration
	Held        int64
	// WritesOld and WritesNew are acknowledged writes to each side; Lost
	// those acknowledged on old whose version the new side lacks;
	// AppliedTwice the old-side writes the sync applied more than once, or
	// applied although they went to the new side.
	WritesOld, WritesNew int
	Lost, AppliedTwice   int
	// Left counts replication slots and publications still on the server
	// for the move's databases after its teardown, and the databases.
	SlotsLeft, DatabasesLeft int
}

// cdcMove moves a billing service's invoices table to another database by
// change data capture instead of dual writes: the service keeps writing
// only its own table (it only checks the migration's fence in each write
// transaction); a cdc.Sync copies the table and streams every committed
// change to the new database; a fenced cutover (cdc.Cutover) holds the
// writers while the sync's lag reaches 0 and the stage flips to complete;
// the writers then write the new side. Every slot, publication and
// database it creates is dropped before it returns.
func cdcMove(ctx context.Context, cfg cdcConfig) (rep cdcReport, err error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	admin, err := pgx.Connect(ctx, cfg.AdminURL)
	if err != nil {
		return rep, fmt.Errorf("logical Postgres: %w", err)
	}
	defer admin.Close(context.WithoutCancel(ctx))
	suffix := randomHex(4)
	rep.Old, rep.New = "dimmer_demo_billing_"+suffix, "dimmer_demo_billing_v2_"+suffix
	slot := "invoices_v2_" + suffix
	for _, db := range []string{rep.Old, rep.New} {
		if _, err := admin.Exec(ctx, "CREATE DATABASE "+db); err != nil {
			return rep, fmt.Errorf("create database %s: %w", db, err)
		}
	}
	oldURL, newURL := withDatabase(cfg.AdminURL, rep.Old), withDatabase(cfg.AdminURL, rep.New)
	var old *pgxpool.Pool
	defer func() {
		// Teardown: the slot and publication, then both databases; what
		// is left is counted into the report.
		c, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if old != nil {
			if derr := cdc.DropSlot(c, old, "", slot, true); derr != nil && !errors.Is(derr, cdc.ErrNoSlot) && err == nil {
				err = fmt.Errorf("drop slot %s: %w", slot, derr)
			}
			_ = admin.QueryRow(c, `SELECT count(*) FROM pg_replication_slots WHERE database = ANY($1)`, []string{rep.Old, rep.New}).Scan(&rep.SlotsLeft)
			var pubs int
			_ = old.QueryRow(c, `SELECT count(*) FROM pg_publication`).Scan(&pubs)
			rep.SlotsLeft += pubs
			old.Close()
		}
		for _, db := range []string{rep.Old, rep.New} {
			if _, derr := admin.Exec(c, "DROP DATABASE IF EXISTS "+db+" WITH (FORCE)"); derr != nil && err == nil {
				err = fmt.Errorf("drop database %s: %w", db, derr)
			}
		}
		_ = admin.QueryRow(c, `SELECT count(*) FROM pg_database WHERE datname = ANY($1)`, []string{rep.Old, rep.New}).Scan(&rep.DatabasesLeft)
	}()

	if old, err = pgxpool.New(ctx, oldURL); err != nil {
		return rep, err
	}
	neu, err := pgxpool.New(ctx, newURL)
	if err != nil {
		return rep, err
	}
	defer neu.Close()
	// The operator's pool: the flag store and the controller must not wait
	// for a connection the held writers have.
	ops, err := pgxpool.New(ctx, oldURL)
	if err != nil {
		return rep, err
	}
	defer ops.Close()
	const table = `CREATE TABLE invoices (id bigint PRIMARY KEY, version bigint NOT NULL, customer int NOT NULL,
	amount_cents bigint NOT NULL, status text NOT NULL)`
	for _, p := range []*pgxpool.Pool{old, neu} {
		if _, err := p.Exec(ctx, table); err != nil {
			return rep, err
		}
	}
	if _, err := old.Exec(ctx, `INSERT INTO invoices SELECT i, 1, i % 500, 1000 + i % 9000, 'open' FROM generate_series(1, $1) i`, cfg.Rows); err != nil {
		return rep, err
	}
	store, err := pgflags.NewStore(ops, pgflags.WithLogger(cfg.Logger))
	if err != nil {
		return rep, err
	}
	if err := store.Install(ctx); err != nil {
		return rep, err
	}
	ctl, err := flags.NewController(store, flags.WithControllerLogger(cfg.Logger))
	if err != nil {
		return rep, err
	}
	// Writers write only the old table until the cutover: the stages
	// before complete all write it, and the sync carries it over.
	for range flags.RampDown {
		if _, err := ctl.Advance(ctx, cdcMigration, "operator", "invoices move to the billing_v2 database by CDC"); err != nil {
			return rep, err
		}
	}
	fence, err := cdc.InstallFence(ctx, old, cdc.FenceConfig{Migration: cdcMigration, MaxWait: 2 * time.Second})
	if err != nil {
		return rep, err
	}
	cfg.Say("cdc: the billing service's invoices (%d rows) move to database %s by CDC, no dual writes; %d writers keep writing", cfg.Rows, rep.New, cfg.Writers)

	w := &billingWriters{old: old, neu: neu, fence: fence, store: store, rows: cfg.Rows,
		acked: map[int64]int64{}, toOld: map[[2]int64]bool{}, toNew: map[[2]int64]bool{}}
	wctx, stopWriters := context.WithCancel(ctx)
	defer stopWriters()
	werr := make(chan error, cfg.Writers)
	var wg sync.WaitGroup
	for i := range cfg.Writers {
		wg.Go(func() { werr <- w.run(wctx, int64(i)) })
	}
	writersDone := func() error {
		stopWriters()
		wg.Wait()
		close(werr)
		for e := range werr {
			if e != nil && !errors.Is(e, context.Canceled) {
				return fmt.Errorf("billing writer: %w", e)
			}
		}
		return nil
	}

	var mu sync.Mutex
	streamed := map[[2]int64]int{}
	var lags []time.Duration
	var nstreamed int64
	// Lag is measured for changes committed once the sync streams: those
	// committed during the copy wait for its end by design.
	var since atomic.Pointer[time.Time]
	s, err := cdc.NewSync(oldURL, neu, cdc.SyncConfig{Name: slot, Source: backfill.Table{Name: "invoices"}, Target: backfill.Table{Name: "invoices"},
		VersionColumn: "version", Logger: cfg.Logger,
		OnApplied: func(batch []cdc.Change, at time.Time) {
			mu.Lock()
			defer mu.Unlock()
			for _, c := range batch {
				if c.Op == cdc.OpInsert || c.Op == cdc.OpUpdate {
					streamed[[2]int64{c.Row["id"].(int64), c.Row["version"].(int64)}]++
					nstreamed++
					if t := since.Load(); t != nil && c.CommitTime.After(*t) {
						lags = append(lags, at.Sub(c.CommitTime))
					}
				}
			}
		}})
	if err != nil {
		return rep, err
	}
	sctx, stopSync := context.WithCancel(ctx)
	syncErr := make(chan error, 1)
	go func() { syncErr <- s.Run(sctx) }()
	syncDone := func() error {
		stopSync()
		if e := <-syncErr; e != nil && !errors.Is(e, context.Canceled) {
			return fmt.Errorf("sync: %w", e)
		}
		return nil
	}
	defer func() {
		if stopSync != nil {
			_ = syncDone()
		}
	}()
	for !s.Streaming() {
		select {
		case e := <-syncErr:
			syncErr <- e
			return rep, fmt.Errorf("sync stopped before streaming: %w", e)
		case <-ctx.Done():
			return rep, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
	now := time.Now()
	since.Store(&now)
	bf, err := backfill.New(neu, backfill.WithSchema(cdc.DefaultSchema), backfill.WithLogger(cfg.Logger))
	if err != nil {
		return rep, err
	}
	st, err := bf.Status(ctx, "cdc-sync-"+slot)
	if err != nil {
		return rep, fmt.Errorf("the sync's copy: %w", err)
	}
	rep.Copied = st.RowsDone
	o, _ := w.count()
	cfg.Say("cdc: sync %s copied %d rows while %d writes went to the old table; streaming now", slot, rep.Copied, o)
	select {
	case <-time.After(cfg.Stream):
	case <-ctx.Done():
		return rep, ctx.Err()
	}

	o, _ = w.count()
	cfg.Say("cdc: fenced cutover at %d writes to the old table: hold the writers, wait for the sync's lag 0, flip to complete, release", o)
	res, err := cdc.Cutover(ctx, fence, cdc.CutoverConfig{Controller: ctl, Sync: s, Actor: "operator",
		Reason: "invoices in step on billing_v2", MaxPause: 2 * time.Second})
	if err != nil {
		return rep, fmt.Errorf("cutover: %w", err)
	}
	rep.Cutover = res
	cfg.Say("cdc: cut over to %s: writes held %v (drain %v, catch-up %v, flip %v); the writers now write %s",
		res.State.Stage, res.Pause.Round(100*time.Microsecond), res.Drain.Round(100*time.Microsecond),
		res.CatchUp.Round(100*time.Microsecond), res.Flip.Round(100*time.Microsecond), rep.New)
	select {
	case <-time.After(cfg.After):
	case <-ctx.Done():
		return rep, ctx.Err()
	}
	if err := writersDone(); err != nil {
		return rep, err
	}
	// The sync has nothing more to carry (old is no longer written); it
	// stops once it applied what it read.
	if err := s.CaughtUp(ctx, old); err != nil {
		return rep, err
	}
	err = syncDone()
	stopSync = nil
	if err != nil {
		return rep, err
	}

	// Every write acknowledged on either side is on the new one.
	got := map[int64]int64{}
	rows, err := neu.Query(ctx, `SELECT id, version FROM invoices`)
	if err != nil {
		return rep, err
	}
	var id, v int64
	if _, err := pgx.ForEachRow(rows, []any{&id, &v}, func() error { got[id] = v; return nil }); err != nil {
		return rep, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for id, v := range w.acked {
		if got[id] < v {
			rep.Lost++
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for k, n := range streamed {
		if n > 1 || w.toNew[k] {
			rep.AppliedTwice++
		}
	}
	rep.Streamed = nstreamed
	slices.Sort(lags)
	if len(lags) > 0 {
		rep.LagP50, rep.LagP99 = lags[len(lags)/2], lags[(len(lags)*99+99)/100-1]
	}
	rep.WritesOld, rep.WritesNew = len(w.toOld), len(w.toNew)
	rep.LongestWait, rep.Held = w.longest, w.held.Load()
	return rep, nil
}

// logicalURL is the server with wal_level = logical that `make demo`
// starts or finds (scripts/need-logical-pg.sh).
func logicalURL() string { return os.Getenv("DIMMER_LOGICAL_POSTGRES_URL") }

// withDatabase returns u with its database replaced.
func withDatabase(u, db string) string {
	p, err := url.Parse(u)
	if err != nil {
		return u
	}
	p.Path = "/" + db
	return p.String()
}

// billingWriters is the billing service: each writer updates random
// invoices and issues new ones, writing the old table while the fence
// lets it, the new one once the fence says cut over (and the stage flag
// agrees).
type billingWriters struct {
	old, neu *pgxpool.Pool
	fence    *cdc.Fence
	store    flags.Store
	rows     int

	mu      sync.Mutex
	acked   map[int64]int64 // id -> highest acknowledged version
	toOld   map[[2]int64]bool
	toNew   map[[2]int64]bool
	longest time.Duration
	held    atomic.Int64
}

const (
	issueSQL  = `INSERT INTO invoices VALUES ($1, 1, $2, $3, 'open') RETURNING version`
	updateSQL = `UPDATE invoices SET version = version + 1, status = $2, amount_cents = amount_cents + 1 WHERE id = $1 RETURNING version`
)

func (w *billingWriters) run(ctx context.Context, writer int64) error {
	rng := rand.New(rand.NewPCG(uint64(writer), 7))
	cut := false
	issued := int64(0)
	for ctx.Err() == nil {
		id := rng.Int64N(int64(w.rows)) + 1
		sql, args := updateSQL, []any{id, [...]string{"sent", "paid", "overdue"}[rng.IntN(3)]}
		if rng.IntN(4) == 0 {
			issued++
			id = int64(w.rows) + writer*1_000_000 + issued
			sql, args = issueSQL, []any{id, rng.IntN(500), 1000 + rng.Int64N(9000)}
		}
		var version int64
		if cut {
			if err := w.neu.QueryRow(ctx, sql, args...).Scan(&version); err != nil {
				return err
			}
			w.ack(id, version, false)
			continue
		}
		var waited time.Duration
		err := pgx.BeginFunc(ctx, w.old, func(tx pgx.Tx) error {
			start := time.Now()
			err := w.fence.Enter(ctx, tx)
			waited = time.Since(start)
			if err != nil {
				return err
			}
			return tx.QueryRow(ctx, sql, args...).Scan(&version)
		})
		w.mu.Lock()
		w.longest = max(w.longest, waited)
		w.mu.Unlock()
		switch {
		case err == nil:
			w.ack(id, version, true)
		case errors.Is(err, cdc.ErrCutOver):
			st, err := w.store.Load(ctx, cdcMigration)
			if err != nil {
				return err
			}
			if st.Stage.Writes(flags.Old) {
				return fmt.Errorf("fence cut while the stage %s still writes the old table", st)
			}
			cut = true
			if sql == issueSQL {
				issued-- // the same invoice, issued on the new side
			}
		case errors.Is(err, cdc.ErrWriteHeld):
			w.held.Add(1)
		default:
			return err
		}
		// A service's pace, not a benchmark's.
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Millisecond):
		}
	}
	return ctx.Err()
}

func (w *billingWriters) ack(id, version int64, old bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.acked[id] = max(w.acked[id], version)
	if old {
		w.toOld[[2]int64{id, version}] = true
	} else {
		w.toNew[[2]int64{id, version}] = true
	}
}

func (w *billingWriters) count() (old, neu int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.toOld), len(w.toNew)
}

// validateCDC adds the invoices move's invariants to rep.Failures.
func validateCDC(rep *report) {
	fail := func(ok bool, format string, args ...any) {
		if !ok {
			rep.Failures = append(rep.Failures, "cdc: "+fmt.Sprintf(format, args...))
		}
	}
	c := rep.CDC
	if c == nil {
		fail(false, "the invoices move by CDC did not run")
		return
	}
	fail(c.Copied > 0 && c.Streamed > 0, "the sync copied %d rows and streamed %d changes: want both", c.Copied, c.Streamed)
	fail(c.WritesOld > 0 && c.WritesNew > 0, "%d writes to the old table and %d to the new: want writes on both sides of the cutover", c.WritesOld, c.WritesNew)
	fail(c.Cutover.State.Stage == flags.Complete, "the cutover left the stage at %s", c.Cutover.State.Stage)
	fail(c.Lost == 0, "%d acknowledged writes lost", c.Lost)
	fail(c.AppliedTwice == 0, "%d writes applied twice", c.AppliedTwice)
	fail(c.Held == 0, "%d writes gave up waiting at the fence", c.Held)
	fail(c.SlotsLeft == 0 && c.DatabasesLeft == 0, "%d slots or publications and %d databases left behind", c.SlotsLeft, c.DatabasesLeft)
}

func printCDC(w io.Writer, c *cdcReport) {
	if c == nil {
		return
	}
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	ms := func(d time.Duration) time.Duration { return d.Round(100 * time.Microsecond) }
	p("   cdc invoices rows copied, changes streamed %d, %d (lag commit to applied: p50 %v, p99 %v)", c.Copied, c.Streamed, ms(c.LagP50), ms(c.LagP99))
	p("   cdc invoices cutover write pause           %v (drain %v, catch-up to lag 0 %v, flip %v); longest writer wait %v; gave up waiting %d",
		ms(c.Cutover.Pause), ms(c.Cutover.Drain), ms(c.Cutover.CatchUp), ms(c.Cutover.Flip), ms(c.LongestWait), c.Held)
	p("   cdc invoices acknowledged writes           %d to old, %d to new; lost %d, applied twice %d", c.WritesOld, c.WritesNew, c.Lost, c.AppliedTwice)
	p("   cdc invoices left behind                   %d slots or publications, %d databases", c.SlotsLeft, c.DatabasesLeft)
}

// moveByCDC runs the invoices move after the events move.
func (d *demo) moveByCDC(ctx context.Context, rep *report) error {
	admin := logicalURL()
	if admin == "" {
		return errors.New("cdc: DIMMER_LOGICAL_POSTGRES_URL is not set: run the demo through `make demo` (scripts/need-logical-pg.sh starts a server with wal_level=logical)")
	}
	c, err := cdcMove(ctx, cdcConfig{AdminURL: admin, Rows: d.p.CDCRows, Writers: 3, Stream: 2 * time.Second, After: time.Second, Say: d.say})
	if err != nil {
		return fmt.Errorf("cdc: %w", err)
	}
	rep.CDC = &c
	return nil
}
