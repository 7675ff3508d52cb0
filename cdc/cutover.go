package cdc

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
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
	f, err := newFence(pool, cfg)
	if err != nil {
		return nil, err
	}
	cfg = f.cfg
	_, err = pool.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+pgx.Identifier{cfg.Schema}.Sanitize()+`;
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

func newFence(pool *pgxpool.Pool, cfg FenceConfig) (*Fence, error) {
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
	return &Fence{pool: pool, cfg: cfg, table: pgx.Identifier{cfg.Schema, "cdc_fences"}.Sanitize(),
		wait: fmt.Sprintf("%dms", cfg.MaxWait.Milliseconds())}, nil
}

// OpenFence returns the migration's fence installed in pool's database,
// for an operator's cutover (`dimmer cdc cutover`): unlike [InstallFence]
// it creates nothing, and a migration without a fence there is
// [ErrNoFence] (its writers check none, so a cutover could not hold them).
func OpenFence(ctx context.Context, pool *pgxpool.Pool, cfg FenceConfig) (*Fence, error) {
	f, err := newFence(pool, cfg)
	if err != nil {
		return nil, err
	}
	var exists bool
	if err := pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, f.table).Scan(&exists); err != nil {
		return nil, fmt.Errorf("cdc: fence %s: %w", f.cfg.Migration, err)
	}
	if exists {
		if _, err = f.Cut(ctx); err == nil {
			return f, nil
		}
		if !errors.Is(err, ErrNoFence) {
			return nil, err
		}
	}
	return nil, fmt.Errorf("%w: %s in %s: its writers check no fence there (cdc.InstallFence), so a cutover could not hold them", ErrNoFence, f.cfg.Migration, f.table)
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

// Reopen lets writers write the fence's side again, after the stage was
// moved back to one that writes it. [StepBack] and [Cutover] (given the
// other side's fence) do it for you.
func (f *Fence) Reopen(ctx context.Context) error {
	tag, err := f.pool.Exec(ctx, `UPDATE `+f.table+` SET state = 'open', changed_at = now() WHERE migration = $1`, f.cfg.Migration)
	if err != nil {
		return fmt.Errorf("cdc: reopen fence %s: %w", f.cfg.Migration, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("%w: %s in %s (run cdc.InstallFence)", ErrNoFence, f.cfg.Migration, f.table)
	}
	return nil
}

// cut stops writers of the fence's side (undoing a Reopen).
func (f *Fence) cut(ctx context.Context) error {
	_, err := f.pool.Exec(ctx, `UPDATE `+f.table+` SET state = 'cut', changed_at = now() WHERE migration = $1`, f.cfg.Migration)
	return err
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
	// Set Sync or Slot.
	Sync *Sync
	// Slot names the sync's replication slot instead, when the sync runs
	// in another process (`dimmer cdc cutover`): the cutover waits until
	// the slot's confirmed position (what the sync reported applied)
	// passes every change committed before the fence closed. The slot
	// must be registered in the fence's database and schema, with a
	// reader connected.
	Slot string
	// New is the new side's fence, if its writers use one (so that a
	// [StepBack] can hold them): it is opened again before the stage
	// flips, so writers sent to the new side may write there. It must
	// fence the same migration in the new side's database: the cutover's
	// own fence given again (even through another pool) is refused.
	New *Fence
	// MaxPause bounds how long writers are held: if the sync has not
	// caught up (or the flip not landed) by then, the cutover gives up,
	// the stage stays, and writers go on writing old. Default 2s; keep it
	// at most the fence's MaxWait so writers wait rather than fail.
	MaxPause time.Duration
}

// CutoverResult reports a cutover (or a [StepBack]).
type CutoverResult struct {
	// Pause is how long writes to the fenced side were held: from the
	// fence closing to its release (every writer's wait is at most this).
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
	switch {
	case fence == nil:
		return CutoverResult{}, badConfig("fence", "is nil")
	case !cfg.Stage.Valid() || cfg.Stage.Writes(flags.Old):
		return CutoverResult{}, badConfig("Stage", "%s still writes the old side: nothing to cut over", cfg.Stage)
	case cfg.New != nil && cfg.New.cfg.Migration != fence.cfg.Migration:
		return CutoverResult{}, badConfig("New", "fences migration %s, not %s", cfg.New.cfg.Migration, fence.cfg.Migration)
	}
	f := flip{fence: fence, ctl: cfg.Controller, stage: cfg.Stage, actor: cfg.Actor, reason: cfg.Reason,
		maxPause: cfg.MaxPause, other: cfg.New, otherField: "New", what: "cutover"}
	err := f.validate(ctx)
	if err != nil {
		return CutoverResult{}, err
	}
	if f.wait, err = follower(ctx, fence, cfg.Sync, cfg.Slot, "Sync", "Slot"); err != nil {
		return CutoverResult{}, err
	}
	// Every key must be leaving a stage that writes old: the fence holds
	// old's writers only.
	f.fromOK = func(s flags.Stage) bool { return s.Writes(flags.Old) }
	f.fromBad = "already stopped writing the old side"
	return f.run(ctx)
}

// StepBackConfig describes a fenced step back: the rollback after a
// [Cutover], from a stage that no longer writes the old side to one that
// does, holding the new side's writers the way the cutover held the old
// side's. Zero fields take the defaults shown.
type StepBackConfig struct {
	// Controller moves the stage. Leaving complete needs its
	// reconciliation guard ([ReverseGuard] through
	// flags.WithReconciliation) to pass; give that guard a pool of its
	// own, as the held writers may hold every connection of theirs.
	Controller *flags.Controller
	// Stage is the stage stepped back to; default [flags.RampDown]. It
	// must write the old side.
	Stage flags.Stage
	// Actor and Reason go to the audit log. Required.
	Actor, Reason string
	// Reverse is the reverse sync (new side to old); the step back waits
	// until it applied every change committed on the new side before the
	// fence closed. Set Reverse or ReverseSlot (its slot, when the reverse
	// sync runs in another process; registered in the new side's
	// database).
	Reverse     *Sync
	ReverseSlot string
	// Old is the old side's fence, opened again before the stage flips so
	// that writers sent back to old may write there. Required; like
	// [CutoverConfig].New, it must not be the fence being closed.
	Old *Fence
	// MaxPause bounds how long the new side's writers are held; default
	// 2s (see [CutoverConfig]).
	MaxPause time.Duration
}

// StepBack moves a migration back from a stage that stopped writing the
// old side (complete) to one that writes it, fenced like [Cutover] the
// other way round, so that a write to the new side can neither be lost nor
// land after the reverse sync caught up: it plans the step with the
// controller first (its reconciliation guard must pass; nothing is held
// for a step that would be refused), closes fence (the new side's: writers
// of the new side wait, writes already inside commit), waits until the
// reverse sync applied everything committed on the new side, opens the old
// side's fence, flips the stage, and releases fence as cut (held writers
// get [ErrCutOver], ask the flag again and write the old side). If any part
// fails or MaxPause passes, the old fence is cut again, fence released open
// and the stage left unchanged.
func StepBack(ctx context.Context, fence *Fence, cfg StepBackConfig) (CutoverResult, error) {
	if cfg.Stage == flags.Off {
		cfg.Stage = flags.RampDown
	}
	switch {
	case fence == nil:
		return CutoverResult{}, badConfig("fence", "is nil (the new side's fence)")
	case cfg.Old == nil:
		return CutoverResult{}, badConfig("Old", "is nil: the old side's fence must be opened for the writers sent back")
	case cfg.Old.cfg.Migration != fence.cfg.Migration:
		return CutoverResult{}, badConfig("Old", "fences migration %s, not %s", cfg.Old.cfg.Migration, fence.cfg.Migration)
	case !cfg.Stage.Valid() || !cfg.Stage.Writes(flags.Old):
		return CutoverResult{}, badConfig("Stage", "%s does not write the old side: not a step back", cfg.Stage)
	}
	f := flip{fence: fence, ctl: cfg.Controller, stage: cfg.Stage, actor: cfg.Actor, reason: cfg.Reason,
		maxPause: cfg.MaxPause, other: cfg.Old, otherField: "Old", recut: true, what: "step back"}
	err := f.validate(ctx)
	if err != nil {
		return CutoverResult{}, err
	}
	if f.wait, err = follower(ctx, fence, cfg.Reverse, cfg.ReverseSlot, "Reverse", "ReverseSlot"); err != nil {
		return CutoverResult{}, err
	}
	f.fromOK = func(s flags.Stage) bool { return !s.Writes(flags.Old) }
	f.fromBad = "still write the old side: nothing to step back"
	return f.run(ctx)
}

// flip is the fenced stage change Cutover and StepBack share: fence is the
// side whose writers are held, wait the sync that carries that side's
// changes to the other, other the other side's fence (opened before the
// flip; cut again if the flip does not land and recut).
type flip struct {
	fence         *Fence
	ctl           *flags.Controller
	stage         flags.Stage
	actor, reason string
	maxPause      time.Duration
	other         *Fence
	otherField    string // the config field that gave other
	recut         bool
	what          string
	wait          func(ctx context.Context, tx pgx.Tx) error
	fromOK        func(flags.Stage) bool
	fromBad       string
}

// follower returns the wait for a sync given in-process (s) or by its slot
// name, after checking that it is streaming.
func follower(ctx context.Context, fence *Fence, s *Sync, slot, syncField, slotField string) (func(context.Context, pgx.Tx) error, error) {
	switch {
	case s != nil && slot != "":
		return nil, badConfig(syncField, "is set together with %s: choose one", slotField)
	case s != nil:
		if !s.Streaming() {
			return nil, fmt.Errorf("cdc: %s: sync %s is not streaming", fence.cfg.Migration, s.cfg.Name)
		}
		return func(ctx context.Context, tx pgx.Tx) error { return s.caughtUp(ctx, tx) }, nil
	case slot != "":
		if err := slotStreaming(ctx, fence, slot); err != nil {
			return nil, err
		}
		return func(ctx context.Context, tx pgx.Tx) error { return slotCaughtUp(ctx, tx, slot) }, nil
	}
	return nil, badConfig(syncField, "is nil and %s is empty: the sync to wait for is required", slotField)
}

// slotStreaming checks that slot is registered in the fence's database and
// schema and that a reader holds it (otherwise its lag never reaches 0).
func slotStreaming(ctx context.Context, fence *Fence, slot string) error {
	all, err := Slots(ctx, fence.pool, fence.cfg.Schema)
	if err != nil {
		return err
	}
	for _, s := range all {
		switch {
		case s.Slot != slot:
			continue
		case !s.Exists:
			return fmt.Errorf("%w: %s is registered in %s but the server has no such slot", ErrNoSlot, slot, fence.cfg.Schema)
		case !s.Active:
			return fmt.Errorf("cdc: %s: slot %s has no reader: start its sync first (its lag cannot reach 0)", fence.cfg.Migration, slot)
		}
		return nil
	}
	return fmt.Errorf("%w: %s is not registered in %s.cdc_slots of this database", ErrNoSlot, slot, fence.cfg.Schema)
}

// WaitSlot waits until the reader of slot (a [Sync] in any process)
// reported applied every change committed before the call: the slot's
// confirmed position reaches the end of the log flushed at the call. db is
// on the slot's database. `dimmer cdc cutover` waits so before it holds
// writers, so that the fenced wait is only the tail.
func WaitSlot(ctx context.Context, db Querier, slot string) error {
	return slotCaughtUp(ctx, db, slot)
}

func slotCaughtUp(ctx context.Context, tx Querier, slot string) error {
	var target pglogrepl.LSN
	if err := tx.QueryRow(ctx, `SELECT pg_current_wal_flush_lsn()`).Scan(&target); err != nil {
		return fmt.Errorf("cdc: slot %s: read the source's position: %w", slot, err)
	}
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for {
		var confirmed pglogrepl.LSN
		var active bool
		err := tx.QueryRow(ctx, `SELECT coalesce(confirmed_flush_lsn, '0/0'), active FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&confirmed, &active)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			return fmt.Errorf("%w: %s was dropped", ErrNoSlot, slot)
		case err != nil:
			return fmt.Errorf("cdc: slot %s: confirmed %s, waiting for %s: %w", slot, confirmed, target, err)
		case confirmed >= target:
			return nil
		case !active:
			return fmt.Errorf("cdc: slot %s lost its reader (confirmed %s, waiting for %s)", slot, confirmed, target)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cdc: slot %s: confirmed %s, waiting for %s: %w", slot, confirmed, target, ctx.Err())
		case <-t.C:
		}
	}
}

func (f *flip) validate(ctx context.Context) error {
	if f.maxPause == 0 {
		f.maxPause = 2 * time.Second
	}
	switch {
	case f.ctl == nil:
		return badConfig("Controller", "is nil")
	case f.actor == "" || f.reason == "":
		return badConfig("Actor", "and Reason are required (audit log)")
	case f.maxPause < time.Millisecond:
		return badConfig("MaxPause", "must be at least 1ms, got %v", f.maxPause)
	}
	if f.other == nil {
		return nil
	}
	// The other side's fence is opened while this one is held: were they
	// the same row, the opening would wait for the cutover's own lock
	// until MaxPause and fail with a timeout that names neither. Two pools
	// can reach one database, so the row is compared, not the handles.
	here, err := f.fence.where(ctx)
	if err != nil {
		return err
	}
	there, err := f.other.where(ctx)
	if err != nil {
		return err
	}
	if here == there {
		return badConfig(f.otherField, "is the fence being closed (%s): give the other side's fence, in that side's database", here)
	}
	return nil
}

// where names the fence's row: the cluster (by its system identifier, or
// by the server's address where a managed service withholds that), the
// database, table and migration.
func (f *Fence) where(ctx context.Context) (string, error) {
	var allowed bool
	var cluster, db string
	err := f.pool.QueryRow(ctx, `SELECT has_function_privilege('pg_control_system()', 'execute'), current_database()`).Scan(&allowed, &db)
	if err == nil {
		// Privileges are checked when a statement starts, whichever
		// branch of a CASE it would take: two statements.
		q := `SELECT system_identifier::text FROM pg_control_system()`
		if !allowed {
			q = `SELECT coalesce(host(inet_server_addr()), 'local') || ':' || current_setting('port')`
		}
		err = f.pool.QueryRow(ctx, q).Scan(&cluster)
	}
	if err != nil {
		return "", fmt.Errorf("cdc: fence %s: %w", f.cfg.Migration, err)
	}
	return fmt.Sprintf("%s in %s of database %s on cluster %s", f.cfg.Migration, f.table, db, cluster), nil
}

// settleTimeout bounds what a cutover still does once its ctx ended or its
// pause ran out (roll back or commit the fence, read the stage back): on a
// database that stopped answering it would otherwise never return.
const settleTimeout = 2 * time.Second

func settling(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), settleTimeout)
}

func (f *flip) run(ctx context.Context) (CutoverResult, error) {
	migration := f.fence.cfg.Migration
	req := flags.Request{Migration: migration, Stage: f.stage, Actor: f.actor, Reason: f.reason}
	t, _, err := f.ctl.Plan(ctx, req)
	if err != nil {
		return CutoverResult{}, fmt.Errorf("cdc: %s %s: %w", f.what, migration, err)
	}
	for _, m := range t.Moves() {
		if !f.fromOK(m.From) {
			return CutoverResult{}, fmt.Errorf("cdc: %s %s: keys at %s %s", f.what, migration, m.From, f.fromBad)
		}
	}

	var res CutoverResult
	pctx, cancel := context.WithTimeout(ctx, f.maxPause)
	defer cancel()
	tx, err := f.fence.pool.Begin(pctx)
	if err != nil {
		return res, fmt.Errorf("cdc: %s %s: %w", f.what, migration, err)
	}
	start := time.Now()
	committed, otherOpened := false, false
	defer func() {
		if committed {
			return
		}
		sctx, cancel := settling(ctx)
		defer cancel()
		_ = tx.Rollback(sctx)
		res.Pause = time.Since(start)
		if otherOpened && f.recut {
			// Nobody was sent to the other side: keep it fenced as it was.
			_ = f.other.cut(sctx)
		}
	}()
	tag, err := tx.Exec(pctx, `UPDATE `+f.fence.table+` SET state = 'cut', changed_at = now() WHERE migration = $1 AND state = 'open'`, migration)
	if err != nil {
		return res, fmt.Errorf("cdc: %s %s: close the fence: %w", f.what, migration, err)
	}
	if tag.RowsAffected() == 0 {
		return res, fmt.Errorf("%w: %s is already cut in %s or has no fence there", ErrCutOver, migration, f.fence.table)
	}
	res.Drain = time.Since(start)
	if err := f.wait(pctx, tx); err != nil {
		return res, fmt.Errorf("cdc: %s %s: sync not caught up within %v: %w", f.what, migration, f.maxPause, err)
	}
	res.CatchUp = time.Since(start) - res.Drain
	if f.other != nil {
		if err := f.other.Reopen(pctx); err != nil {
			return res, fmt.Errorf("cdc: %s %s: %w", f.what, migration, err)
		}
		otherOpened = true
	}
	st, err := f.ctl.Set(pctx, req)
	if err != nil {
		// The swap may have landed before the error: the stored state
		// decides whether it did.
		sctx, cancel := settling(ctx)
		cur, lerr := f.ctl.Store().Load(sctx, migration)
		cancel()
		if lerr != nil || cur.Revision == t.From.Revision {
			return res, fmt.Errorf("cdc: %s %s: flip the stage: %w", f.what, migration, err)
		}
		st = cur
	}
	res.Flip = time.Since(start) - res.Drain - res.CatchUp
	res.State = st
	sctx, cancelCommit := settling(ctx)
	defer cancelCommit()
	if err := tx.Commit(sctx); err != nil {
		committed = true // nothing left to undo: the stage moved
		return res, fmt.Errorf("cdc: %s %s: stage is %s but the fence in %s was released open: keep the sync running (it carries the writes made since) and check the fence: %w", f.what, migration, st, f.fence.table, err)
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
