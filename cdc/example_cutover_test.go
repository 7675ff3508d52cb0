package cdc_test

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// ExampleCutover moves a table synced by CDC to its new home: writers of
// the old table check the fence in each write transaction; the cutover
// holds them while the sync catches up and the stage flips to complete.
func ExampleCutover() {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	url := exampleURL()
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	// The tables and dimmer's own (flag store, slot registry, fence, the
	// copy's checkpoints) go to a schema of the example's, dropped at the
	// end.
	migration := fmt.Sprint("orders_v2_", time.Now().UnixNano())
	schema := migration
	if _, err := pool.Exec(ctx, `CREATE SCHEMA `+schema); err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Exec(context.Background(), `DROP SCHEMA `+schema+` CASCADE`)
	src, dst := schema+".orders", schema+".orders_v2"
	for _, t := range []string{src, dst} {
		if _, err := pool.Exec(ctx, `CREATE TABLE `+t+` (id int PRIMARY KEY, v int NOT NULL, status text)`); err != nil {
			fmt.Println(err)
			return
		}
	}

	// The stage flag, at rampdown (the operator's controller has a pool of
	// its own: held writers may take every connection of theirs).
	opsPool, _ := pgxpool.New(ctx, url)
	defer opsPool.Close()
	store, _ := pgflags.NewStore(opsPool, pgflags.WithSchema(schema))
	_ = store.Install(ctx)
	ctl, _ := flags.NewController(store)
	for range flags.RampDown {
		_, _ = ctl.Advance(ctx, migration, "ops", "orders_v2 rollout")
	}

	s, _ := cdc.NewSync(url, pool, cdc.SyncConfig{Name: migration, Source: backfill.Table{Schema: schema, Name: "orders"},
		Target: backfill.Table{Schema: schema, Name: "orders_v2"}, VersionColumn: "v", Schema: schema})
	defer cdc.DropSlot(context.Background(), pool, schema, migration, true)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	var runErr error
	go func() { defer close(done); runErr = s.Run(runCtx) }()
	defer func() { stop(); <-done }()
	for !s.Streaming() {
		select {
		case <-done:
			fmt.Println(runErr) // e.g. a server without wal_level = logical
			return
		case <-time.After(10 * time.Millisecond):
		}
	}

	fence, err := cdc.InstallFence(ctx, pool, cdc.FenceConfig{Migration: migration, Schema: schema, MaxWait: time.Second})
	if err != nil {
		fmt.Println(err)
		return
	}
	// A writer of the old table: the fence first, in the write's transaction.
	write := func(id int, status string) error {
		return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if err := fence.Enter(ctx, tx); err != nil {
				return err // ErrCutOver: write the new side; ErrWriteHeld: retry
			}
			_, err := tx.Exec(ctx, `INSERT INTO `+src+` VALUES ($1, 1, $2)`, id, status)
			return err
		})
	}
	_ = write(1, "paid")

	res, err := cdc.Cutover(ctx, fence, cdc.CutoverConfig{Controller: ctl, Sync: s, Actor: "ops", Reason: "orders_v2 cutover"})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("stage:", res.State.Stage, "held under a second:", res.Pause < time.Second)
	var status string
	_ = pool.QueryRow(ctx, `SELECT status FROM `+dst+` WHERE id = 1`).Scan(&status)
	fmt.Println("new side has order 1:", status)
	fmt.Println("old side written:", !errors.Is(write(2, "paid"), cdc.ErrCutOver))
	// Output:
	// stage: complete held under a second: true
	// new side has order 1: paid
	// old side written: false
}

// ExampleStepBack rolls a cutover back without losing what the new side
// got meanwhile: a reverse sync (prepared before the cutover) carries the
// new side's writes to the old, and the step back holds the new side's
// writers at their own fence while it catches up and the stage flips back.
func ExampleStepBack() {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	url := exampleURL()
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	// Old and new are two schemas here (two databases in real life), each
	// with its table and its fence; dropped at the end.
	migration := fmt.Sprint("orders_v2_", time.Now().UnixNano())
	oldSchema, newSchema := migration, migration+"_new"
	for _, s := range []string{oldSchema, newSchema} {
		if _, err := pool.Exec(ctx, `CREATE SCHEMA `+s+`; CREATE TABLE `+s+`.orders (id int PRIMARY KEY, v int NOT NULL, status text)`); err != nil {
			fmt.Println(err)
			return
		}
		defer pool.Exec(context.Background(), `DROP SCHEMA `+s+` CASCADE`)
	}
	opsPool, _ := pgxpool.New(ctx, url)
	defer opsPool.Close()
	store, _ := pgflags.NewStore(opsPool, pgflags.WithSchema(oldSchema))
	_ = store.Install(ctx)

	forward, _ := cdc.NewSync(url, pool, cdc.SyncConfig{Name: migration, Source: backfill.Table{Schema: oldSchema, Name: "orders"},
		Target: backfill.Table{Schema: newSchema, Name: "orders"}, VersionColumn: "v", Schema: oldSchema})
	defer cdc.DropSlot(context.Background(), pool, oldSchema, migration, true)
	reverse, _ := cdc.NewSync(url, pool, cdc.SyncConfig{Name: migration + "_rev", Source: backfill.Table{Schema: newSchema, Name: "orders"},
		Target: backfill.Table{Schema: oldSchema, Name: "orders"}, VersionColumn: "v", Schema: oldSchema, SkipCopy: true})
	defer cdc.DropSlot(context.Background(), pool, oldSchema, migration+"_rev", true)
	run := func(s *cdc.Sync) (stop func()) {
		runCtx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		var runErr error
		go func() { defer close(done); runErr = s.Run(runCtx) }()
		for !s.Streaming() {
			select {
			case <-done:
				panic(runErr) // e.g. a server without wal_level = logical
			case <-time.After(10 * time.Millisecond):
			}
		}
		return func() { cancel(); <-done }
	}
	stopForward := run(forward)
	defer stopForward()
	// The reverse slot exists before the cutover: no write to new is missed.
	_ = reverse.Prepare(ctx)

	// The controller lets the stage leave complete only once the reverse
	// sync has caught up (its own pool: held writers may hold theirs).
	ctl, _ := flags.NewController(store, flags.WithReconciliation(cdc.ReverseGuard{Sync: reverse, NewSide: opsPool}))
	for range flags.RampDown {
		_, _ = ctl.Advance(ctx, migration, "ops", "orders_v2 rollout")
	}
	oldFence, _ := cdc.InstallFence(ctx, pool, cdc.FenceConfig{Migration: migration, Schema: oldSchema})
	newFence, _ := cdc.InstallFence(ctx, pool, cdc.FenceConfig{Migration: migration, Schema: newSchema})
	// A writer enters the fence of the side it writes, in the write's
	// transaction.
	write := func(fence *cdc.Fence, schema string, id int, status string) error {
		return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if err := fence.Enter(ctx, tx); err != nil {
				return err // ErrCutOver: ask the flag again, write the other side
			}
			_, err := tx.Exec(ctx, `INSERT INTO `+schema+`.orders VALUES ($1, 1, $2)`, id, status)
			return err
		})
	}

	_ = write(oldFence, oldSchema, 1, "paid")
	res, err := cdc.Cutover(ctx, oldFence, cdc.CutoverConfig{Controller: ctl, Sync: forward, New: newFence, Actor: "ops", Reason: "orders_v2 cutover"})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("cut over to", res.State.Stage)
	// Old is no longer written: the forward sync stops, the reverse one runs.
	stopForward()
	stopReverse := run(reverse)
	defer stopReverse()
	_ = write(newFence, newSchema, 2, "paid") // a write on the new side only

	res, err = cdc.StepBack(ctx, newFence, cdc.StepBackConfig{Controller: ctl, Reverse: reverse, Old: oldFence, Actor: "ops", Reason: "roll orders_v2 back"})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("stepped back to", res.State.Stage)
	var status string
	_ = pool.QueryRow(ctx, `SELECT status FROM `+oldSchema+`.orders WHERE id = 2`).Scan(&status)
	fmt.Println("old side has order 2:", status)
	fmt.Println("new side written:", !errors.Is(write(newFence, newSchema, 3, "paid"), cdc.ErrCutOver))
	fmt.Println("old side written:", write(oldFence, oldSchema, 3, "paid") == nil)
	// Output:
	// cut over to complete
	// stepped back to rampdown
	// old side has order 2: paid
	// new side written: false
	// old side written: true
}
