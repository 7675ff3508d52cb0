package dualwrite_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/outbox"
)

// ExampleNoPendingRepairsGuard refuses to complete a migration while its
// repair log still holds a repair: complete stops writing old, so a key
// whose sides differ would stay different.
func ExampleNoPendingRepairsGuard() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	schema := "dimmer_example_guard_" + strconv.Itoa(os.Getpid())
	drop := func() { _, _ = pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+schema+" CASCADE") }
	drop()
	defer drop()

	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	if err != nil {
		fmt.Println(err)
		return
	}
	ob, err := outbox.New(outbox.Config{Schema: schema, Table: "repairs"})
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := errors.Join(store.Install(ctx), ob.Install(ctx, pool)); err != nil {
		fmt.Println(err)
		return
	}
	ctrl, err := flags.NewController(store, flags.WithGuards(dualwrite.NoPendingRepairsGuard(ob, pool)))
	if err != nil {
		fmt.Println(err)
		return
	}
	for range 4 { // off -> dualwrite -> shadow -> live -> rampdown
		if _, err := ctrl.Advance(ctx, "orders_v2", "alice", "next step"); err != nil {
			fmt.Println(err)
			return
		}
	}
	// A secondary write failed and left a repair nobody has replayed yet.
	log, err := dualwrite.NewOutboxRepairLog(ob, pool, dualwrite.RepairTopic("orders_v2"))
	if err != nil {
		fmt.Println(err)
		return
	}
	err = log.Record(ctx, dualwrite.Repair{Migration: "orders_v2", Key: "order-7", Stage: flags.RampDown,
		Side: flags.Old, Reason: dualwrite.ReasonError, At: time.Now()})
	if err != nil {
		fmt.Println(err)
		return
	}

	_, err = ctrl.Advance(ctx, "orders_v2", "alice", "finish")
	var refused *flags.RefusedError
	if errors.As(err, &refused) {
		for _, c := range refused.Failed {
			fmt.Println("refused by", c.Name)
		}
	}
	// Output: refused by no-pending-repairs
}
