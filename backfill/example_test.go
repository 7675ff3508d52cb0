package backfill_test

import (
	"context"
	"fmt"
	"os"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// A backfill of orders into their new table while the migration is in
// dualwrite, verified, which lets the controller move on to shadow.
func Example() {
	ctx := context.Background()
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	admin, err := pgxpool.New(ctx, url)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer admin.Close()
	if _, err := admin.Exec(ctx, `CREATE SCHEMA example_backfill`); err != nil {
		fmt.Println(err)
		return
	}
	defer admin.Exec(ctx, `DROP SCHEMA example_backfill CASCADE`)
	_, _ = admin.Exec(ctx, `CREATE TABLE example_backfill.orders (id bigint PRIMARY KEY, cents bigint, version bigint NOT NULL);
CREATE TABLE example_backfill.orders_v2 (id bigint PRIMARY KEY, amount numeric, version bigint NOT NULL);
INSERT INTO example_backfill.orders SELECT g, g * 100, 1 FROM generate_series(1, 1000) g`)

	store, _ := pgflags.NewStore(admin, pgflags.WithSchema("example_backfill"))
	_ = store.Install(ctx)
	ctl, _ := flags.NewController(store)
	bf, _ := backfill.New(admin, backfill.WithSchema("example_backfill"), backfill.WithFlagStore(store))
	_ = bf.Install(ctx)
	// The backfill-verified guard stands between dualwrite and shadow.
	guarded, _ := flags.NewController(store, flags.WithGuards(bf.Guard()))
	_, _ = ctl.Set(ctx, flags.Request{Migration: "orders", Stage: flags.DualWrite, Actor: "ops", Reason: "start"})

	job := backfill.Job{
		Name: "orders-v2", Migration: "orders",
		Spec: backfill.Spec{
			Source:        backfill.Table{Schema: "example_backfill", Name: "orders"},
			Target:        backfill.Table{Schema: "example_backfill", Name: "orders_v2"},
			Key:           []string{"id"},
			Columns:       []string{"id", "amount", "version"},
			Exprs:         map[string]string{"amount": "cents / 100.0"},
			VersionColumn: "version",
		},
		Config: backfill.Config{Workers: 2},
	}
	res, err := bf.Run(ctx, job)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("copied", res.Rows, "rows")
	v, err := bf.Verify(ctx, job, backfill.VerifyOptions{})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("verified:", v.OK)
	st, err := guarded.Advance(ctx, "orders", "ops", "backfill verified")
	fmt.Println(st.Stage, err)
	// Output:
	// copied 1000 rows
	// verified: true
	// shadow <nil>
}
