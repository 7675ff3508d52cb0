package cdc

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/flags"
)

var (
	// ErrCutOver: the migration's fence is cut: the old side is no longer
	// written. The writer evaluates the stage again (it now routes to the
	// new side) and writes there.
	ErrCutOver = errors.New("cdc: cut over: old side no longer written")
	// ErrWriteHeld: a writer waited the fence's MaxWait for a cutover in
	// progress and gave up; its transaction is aborted and nothing was
	// written. Retry it.
	ErrWriteHeld = errors.New("cdc: write held by a cutover longer than the fence allows")
	// ErrNoFence: the migration has no fence row: [InstallFence] was not run
	// against this database and schema.
	ErrNoFence = errors.New("cdc: no fence for the migration")
)

// Fence states, as stored.
const (
	fenceOpen = "open"
	fenceCut  = "cut"
)

// FenceConfig describes a migration's write fence. Zero fields take the
// defaults shown.
type FenceConfig struct {
	// Migration is the stage flag's migration name. Required.
	Migration string
	// Schema holds the fence table (<schema>.cdc_fences); default "dimmer".
	Schema string
	// MaxWait bounds how long a writer waits for a cutover in progress
	// before it gets [ErrWriteHeld]. Default 1s.
	MaxWait time.Duration
}

// Fence is what writers of the old side check inside each write
// transaction, so that a [Cutover] can hold them briefly: a row per
// migration in the old side's database, which writers lock shared and a
// cutover locks exclusively while it waits for the sync and flips the stage.
// The stage flag stays the only routing: the fence says only "old may be
// written in this transaction" or "cut over: ask the flag again".
type Fence struct {
	pool  *pgxpool.Pool
	cfg   FenceConfig
	table string
	wait  string
}

// InstallFence creates the fence table if needed and the migration's fence
// row (open) if missing, in pool's database (the old side's), and returns
// the fence. Run it before writers use [Fence.Enter].
func InstallFence(ctx context.Context, pool *pgxpool.Pool, cfg FenceConfig) (*Fence, error) {
	if pool == nil {
		return nil, badConfig("pool", "is nil")
	}
	if cfg.Schema == "" {
		cfg.Schema = DefaultSchema
	}
	if cfg.MaxWait == 0 {
		cfg.MaxWait = time.Second
	}
	switch {
	case flags.ValidateName(cfg.Migration) != nil:
		return nil, badConfig("Migration", "%v", flags.ValidateName(cfg.Migration))
	case cfg.MaxWait < time.Millisecond:
		return nil, badConfig("MaxWait", "must be at least 1ms, got %v", cfg.MaxWait)
	}
	f := &Fence{pool: pool, cfg: cfg, table: pgx.Identifier{cfg.Schema, "cdc_fences"}.Sanitize(),
		wait: fmt.Sprintf("%dms", cfg.MaxWait.Milliseconds())}
	_, err := pool.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+pgx.Identifier{cfg.Schema}.Sanitize()+`;
CREATE TABLE IF NOT EXISTS `+f.table+` (
	migration text PRIMARY KEY,
	state text NOT NULL CHECK (state IN ('open', 'cut')),
	changed_at timestamptz NOT NULL DEFAULT now())`)
	if err == nil {
		_, err = pool.Exec(ctx, `INSERT INTO `+f.table+` (migration, state) VALUES ($1, 'open') ON CONFLICT (migration) DO NOTHING`, cfg.Migration)
	}
	if err != nil {
		return nil, fmt.Errorf("cdc: install fence %s in %s: %w", cfg.Migration, cfg.Schema, err)
	}
	return f, nil
}

// Enter is called by a writer of the old side inside its write
// transaction, before writing. nil: write old in tx; the fence stays shared
// by tx until it ends, so a cutover waits for it (keep tx short).
// [ErrCutOver]: old is no longer written; roll tx back and write the new
// side. [ErrWriteHeld]: a cutover held the fence longer than MaxWait; tx is
// aborted, retry. One round trip.
func (f *Fence) Enter(ctx context.Context, tx pgx.Tx) error {
	// One round trip: the writer's lock_timeout is set for the fence's row
	// lock only, and put back after it.
	b := &pgx.Batch{}
	b.Queue(`SELECT set_config('dimmer.fence_prev_lock_timeout', current_setting('lock_timeout'), true), set_config('lock_timeout', $1, true)`, f.wait)
	var state string
	b.Queue(`SELECT state FROM `+f.table+` WHERE migration = $1 FOR SHARE`, f.cfg.Migration).QueryRow(func(r pgx.Row) error { return r.Scan(&state) })
	b.Queue(`SELECT set_config('lock_timeout', current_setting('dimmer.fence_prev_lock_timeout'), true)`)
	err := tx.SendBatch(ctx, b).Close()
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == "55P03": // lock_not_available
		return fmt.Errorf("%w: migration %s, waited %v", ErrWriteHeld, f.cfg.Migration, f.cfg.MaxWait)
	case errors.Is(err, pgx.ErrNoRows):
		return fmt.Errorf("%w: %s in %s (run cdc.InstallFence)", ErrNoFence, f.cfg.Migration, f.table)
	case err != nil:
		return fmt.Errorf("cdc: fence %s: %w", f.cfg.Migration, err)
	}
	if state == fenceCut {
		return fmt.Errorf("%w: migration %s", ErrCutOver, f.cfg.Migration)
	}
	return nil
}

// Cut reports whether the fence is cut (old no longer written).
func (f *Fence) Cut(ctx context.Context) (bool, error) {
	var state string
	if err := f.pool.QueryRow(ctx, `SELECT state FROM `+f.table+` WHERE migration = $1`, f.cfg.Migration).Scan(&state); err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return false, fmt.Errorf("%w: %s in %s", ErrNoFence, f.cfg.Migration, f.table)
		}
		return false, fmt.Errorf("cdc: fence %s: %w", f.cfg.Migration, err)
	}
	return state == fenceCut, nil
}

// Reopen lets writers write the old side again, after the stage was moved
// back to one that writes it (a rollback; see [ReverseGuard]).
func (f *Fence) Reopen(ctx context.Context) error {
	if _, err := f.pool.Exec(ctx, `UPDATE `+f.table+` SET state = 'open', changed_at = now() WHERE migration = $1`, f.cfg.Migration); err != nil {
		return fmt.Errorf("cdc: reopen fence %s: %w", f.cfg.Migration, err)
	}
	return nil
}

// CutoverConfig describes a fenced cutover. Zero fields take the defaults
// shown.
type CutoverConfig struct {
	// Controller moves the stage; its guards and rules judge the step.
	Controller *flags.Controller
	// Stage is the stage cut over to; default [flags.Complete]. The step
	// must stop writes to the old side (by the flags routing table).
	Stage flags.Stage
	// Actor and Reason go to the audit log. Required.
	Actor, Reason string
	// Sync carries the old side's changes to the new; the cutover waits
	// until it applied every change committed before the fence closed.
	Sync *Sync
	// MaxPause bounds how long writers are held: if the sync has not
	// caught up (or the flip not landed) by then, the cutover gives up,
	// the stage stays, and writers go on writing old. Default 2s; keep it
	// at most the fence's MaxWait so writers wait rather than fail.
	MaxPause time.Duration
}

// CutoverResult reports a cutover.
type CutoverResult struct {
	// Pause is how long writes to the old side were held: from the fence
	// closing to its release (every writer's wait is at most this).
	Pause time.Duration
	// Drain is the part of Pause spent waiting for writes already inside
	// the fence to commit; CatchUp the part waiting for the sync's lag to
	// reach 0; Flip the stage change.
	Drain, CatchUp, Flip time.Duration
	// State is the migration's state after the cutover.
	State flags.State
}

// Cutover moves a migration from a stage that writes the old side to one
// that does not, with no write lost or applied twice: it checks the step
// with the controller first (nothing is held for a step that would be
// refused), closes the fence (new writers wait, writes already inside
// commit), waits until the sync applied everything committed, flips the
// stage, and releases the fence as cut (held writers get [ErrCutOver] and
// write the new side). If any part fails or MaxPause passes, the fence is
// released open and the stage left unchanged.
func Cutover(ctx context.Context, fence *Fence, cfg CutoverConfig) (CutoverResult, error) {
	if cfg.Stage == flags.Off {
		cfg.Stage = flags.Complete
	}
	if cfg.MaxPause == 0 {
		cfg.MaxPause = 2 * time.Second
	}
	switch {
	case fence == nil:
		return CutoverResult{}, badConfig("fence", "is nil")
	case cfg.Controller == nil:
		return CutoverResult{}, badConfig("Controller", "is nil")
	case cfg.Sync == nil:
		return CutoverResult{}, badConfig("Sync", "is nil")
	case cfg.Actor == "" || cfg.Reason == "":
		return CutoverResult{}, badConfig("Actor", "and Reason are required (audit log)")
	case cfg.MaxPause < time.Millisecond:
		return CutoverResult{}, badConfig("MaxPause", "must be at least 1ms, got %v", cfg.MaxPause)
	case !cfg.Stage.Valid() || cfg.Stage.Writes(flags.Old):
		return CutoverResult{}, badConfig("Stage", "%s still writes the old side: nothing to cut over", cfg.Stage)
	}
	migration := fence.cfg.Migration
	req := flags.Request{Migration: migration, Stage: cfg.Stage, Actor: cfg.Actor, Reason: cfg.Reason}
	t, _, err := cfg.Controller.Plan(ctx, req)
	if err != nil {
		return CutoverResult{}, fmt.Errorf("cdc: cutover %s: %w", migration, err)
	}
	for _, m := range t.Moves() {
		if !m.From.Writes(flags.Old) {
			return CutoverResult{}, fmt.Errorf("cdc: cutover %s: keys at %s already stopped writing the old side", migration, m.From)
		}
	}
	if !cfg.Sync.Streaming() {
		return CutoverResult{}, fmt.Errorf("cdc: cutover %s: sync %s is not streaming", migration, cfg.Sync.cfg.Name)
	}

	var res CutoverResult
	pctx, cancel := context.WithTimeout(ctx, cfg.MaxPause)
	defer cancel()
	tx, err := fence.pool.Begin(pctx)
	if err != nil {
		return res, fmt.Errorf("cdc: cutover %s: %w", migration, err)
	}
	start := time.Now()
	committed := false
	defer func() {
		if !committed {
			_ = tx.Rollback(context.WithoutCancel(ctx))
			res.Pause = time.Since(start)
		}
	}()
	tag, err := tx.Exec(pctx, `UPDATE `+fence.table+` SET state = 'cut', changed_at = now() WHERE migration = $1 AND state = 'open'`, migration)
	if err != nil {
		return res, fmt.Errorf("cdc: cutover %s: close the fence: %w", migration, err)
	}
	if tag.RowsAffected() == 0 {
		return res, fmt.Errorf("%w: %s is already cut or has no fence", ErrCutOver, migration)
	}
	res.Drain = time.Since(start)
	if err := cfg.Sync.caughtUp(pctx, tx); err != nil {
		return res, fmt.Errorf("cdc: cutover %s: sync not caught up within %v: %w", migration, cfg.MaxPause, err)
	}
	res.CatchUp = time.Since(start) - res.Drain
	st, err := cfg.Controller.Set(pctx, req)
	if err != nil {
		// The swap may have landed before the error: the stored state
		// decides whether old is still written.
		cur, lerr := cfg.Controller.Store().Load(context.WithoutCancel(ctx), migration)
		if lerr != nil || cur.Revision == t.From.Revision {
			return res, fmt.Errorf("cdc: cutover %s: flip the stage: %w", migration, err)
		}
		st = cur
	}
	res.Flip = time.Since(start) - res.Drain - res.CatchUp
	res.State = st
	if err := tx.Commit(context.WithoutCancel(ctx)); err != nil {
		return res, fmt.Errorf("cdc: cutover %s: stage is %s but the fence was released open: keep the sync running (it carries old-side writes made since) and check the fence: %w", migration, st, err)
	}
	committed = true
	res.Pause = time.Since(start)
	return res, nil
}

// ReverseGuard refuses moving a migration back from a stage that stopped
// writing the old side (leaving complete) unless the reverse sync (new
// side to old, prepared before the cutover) is streaming and has applied
// every change committed on the new side before the check: otherwise a
// rollback would lose the writes made since the cutover. Give it to the
// controller with flags.WithReconciliation, which judges leaving complete
// (other guards judge only forward steps).
type ReverseGuard struct {
	// Sync is the reverse sync: source the new side, target the old.
	Sync *Sync
	// NewSide is a pool on the reverse sync's source database.
	NewSide *pgxpool.Pool
	// Timeout bounds the wait for the sync to catch up; default 2s.
	Timeout time.Duration
}

var _ flags.Guard = ReverseGuard{}

// Name implements flags.Guard.
func (g ReverseGuard) Name() string { return "cdc-reverse-sync-caught-up" }

// Applies implements flags.Guard: keys moving from a stage that does not
// write the old side to one that does.
func (g ReverseGuard) Applies(t flags.Transition) bool {
	for _, m := range t.Moves() {
		if !m.From.Writes(flags.Old) && m.To.Writes(flags.Old) {
			return true
		}
	}
	return false
}

// Check implements flags.Guard.
func (g ReverseGuard) Check(ctx context.Context, _ flags.Transition) error {
	switch {
	case g.Sync == nil || g.NewSide == nil:
		return errors.New("no reverse sync configured (ReverseGuard.Sync and NewSide): writes to the new side since the cutover would be lost")
	case !g.Sync.Streaming():
		return fmt.Errorf("reverse sync %s is not streaming (applied up to %s): writes to the new side since the cutover would be lost", g.Sync.cfg.Name, g.Sync.Applied())
	}
	d := g.Timeout
	if d <= 0 {
		d = 2 * time.Second
	}
	cctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	if err := g.Sync.CaughtUp(cctx, g.NewSide); err != nil {
		return fmt.Errorf("reverse sync %s has not caught up within %v: %v", g.Sync.cfg.Name, d, err)
	}
	return nil
}

// FenceStatus is one migration's fence as stored.
type FenceStatus struct {
	Migration string
	// Cut: the old side is no longer written (a cutover released it so).
	Cut       bool
	ChangedAt time.Time
}

// Fences lists the write fences in pool's database (none if no fence was
// ever installed there), by migration.
func Fences(ctx context.Context, pool *pgxpool.Pool, schema string) ([]FenceStatus, error) {
	if schema == "" {
		schema = DefaultSchema
	}
	table := pgx.Identifier{schema, "cdc_fences"}.Sanitize()
	var exists bool
	if err := pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, table).Scan(&exists); err != nil {
		return nil, fmt.Errorf("cdc: list fences: %w", err)
	}
	if !exists {
		return nil, nil
	}
	rows, err := pool.Query(ctx, `SELECT migration, state = 'cut', changed_at FROM `+table+` ORDER BY migration`)
	if err != nil {
		return nil, fmt.Errorf("cdc: list fences: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (FenceStatus, error) {
		var f FenceStatus
		return f, r.Scan(&f.Migration, &f.Cut, &f.ChangedAt)
	})
	if err != nil {
		return nil, fmt.Errorf("cdc: list fences: %w", err)
	}
	return out, nil
}
