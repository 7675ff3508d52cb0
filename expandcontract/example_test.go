package expandcontract_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// exampleDB opens a pool on DIMMER_POSTGRES_URL (default: local) whose
// search_path is a fresh schema, dropped by the returned function.
func exampleDB(ctx context.Context) (*pgxpool.Pool, string, func()) {
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	schema := "dimmer_ex_" + hex.EncodeToString(b[:])
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		panic(err)
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		panic(err)
	}
	if _, err := pool.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		panic(err)
	}
	return pool, schema, func() {
		_, _ = pool.Exec(context.Background(), "DROP SCHEMA "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
		pool.Close()
	}
}

// A service renames a column: it carries the plan in its code, registers
// it at start-up, refuses to start against a schema stage it cannot run
// with, and publishes the range it can run with to the fleet registry.
func Example() {
	ctx := context.Background()
	pool, schema, cleanup := exampleDB(ctx)
	defer cleanup()
	if _, err := pool.Exec(ctx, `CREATE TABLE users (id bigint PRIMARY KEY, fullname text NOT NULL)`); err != nil {
		panic(err)
	}

	plan, err := expandcontract.RenameColumn("users-display-name", "users", "id", "fullname", "display_name", "text")
	if err != nil {
		panic(err)
	}
	flagStore, _ := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	_ = flagStore.Install(ctx)
	reg, err := expandcontract.NewRegistry(pool, expandcontract.WithSchema(schema),
		expandcontract.WithFleet(flagStore), expandcontract.WithFlagStore(flagStore),
		expandcontract.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		panic(err)
	}
	if err := reg.Install(ctx); err != nil {
		panic(err)
	}
	if err := reg.Register(ctx, "orders-service", plan); err != nil {
		panic(err)
	}

	// This build writes display_name: it needs at least expanded.
	needs := expandcontract.Range{Plan: plan.Name, Min: expandcontract.Expanded, Max: expandcontract.Contracted}
	fmt.Println(reg.Check(ctx, needs))

	st, err := reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy", Reason: "rename fullname"})
	if err != nil {
		panic(err)
	}
	fmt.Println("stage:", st.Stage, "check:", reg.Check(ctx, needs))

	// Publish the range with the heartbeat (flags.NewHeartbeater(...,
	// flags.WithAttributes(expandcontract.Attributes(needs)))).
	fmt.Println(expandcontract.Attributes(needs)())

	// The contract waits for the old builds, the migration and the backfill.
	_, _ = reg.Migrate(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	_, err = reg.Contract(ctx, plan.Name, expandcontract.Request{Actor: "ops"})
	var refused *flags.RefusedError
	if errors.As(err, &refused) {
		for _, c := range refused.Failed {
			fmt.Println("refused:", c.Name)
		}
	}
	// Output:
	// schema stage incompatible with this build:
	//   - plan users-display-name is pending; this build runs with expanded..contracted
	// stage: expanded check: <nil>
	// map[dimmer.schema/users-display-name:expanded..contracted]
	// refused: no-instance-needs-old-shape
	// refused: migration-complete
	// refused: backfill-verified
}

// The backfill of a helper's plan: its transform, chunk by chunk, is
// idempotent; Pending is what a verification wants to be zero.
func ExampleTransform() {
	ctx := context.Background()
	pool, _, cleanup := exampleDB(ctx)
	defer cleanup()
	_, _ = pool.Exec(ctx, `CREATE TABLE people (id bigint PRIMARY KEY, full_name text);
INSERT INTO people VALUES (1, 'Ada Lovelace'), (2, 'Alan Turing'), (3, 'Grace Hopper')`)
	plan, _ := expandcontract.SplitColumn("people-split-name", "people", "id", "full_name",
		expandcontract.Column{Name: "first_name", Type: "text", Expr: "split_part(full_name, ' ', 1)"},
		expandcontract.Column{Name: "last_name", Type: "text", Expr: "split_part(full_name, ' ', 2)"})
	_, _ = pool.Exec(ctx, plan.Expand[0].SQL) // normally Registry.Expand

	for after := int64(0); after < 3; after += 2 {
		n, err := plan.Transform.Apply(ctx, pool, after, after+2)
		if err != nil {
			panic(err)
		}
		fmt.Printf("chunk (%d, %d]: %d row(s)\n", after, after+2, n)
	}
	left, _ := plan.Transform.Pending(ctx, pool)
	fmt.Println("pending:", left)
	var last string
	_ = pool.QueryRow(ctx, `SELECT last_name FROM people WHERE id = 3`).Scan(&last)
	fmt.Println(last)
	// Output:
	// chunk (0, 2]: 2 row(s)
	// chunk (2, 4]: 1 row(s)
	// pending: 0
	// Hopper
}

// Data copied with the plan's own Transform is verified through the
// registry, which the contract's backfill-verified check then accepts (the
// CLI: dimmer schema verify PLAN).
func ExampleRegistry_VerifyTransform() {
	ctx := context.Background()
	pool, schema, cleanup := exampleDB(ctx)
	defer cleanup()
	_, _ = pool.Exec(ctx, `CREATE TABLE cities (id bigint PRIMARY KEY, name text);
INSERT INTO cities VALUES (1, 'Lyon'), (2, 'Porto')`)
	plan, _ := expandcontract.RenameColumn("cities-label", "cities", "id", "name", "label", "text")
	flagStore, _ := pgflags.NewStore(pool, pgflags.WithSchema(schema)) // says whether the migration went back to off
	_ = flagStore.Install(ctx)
	reg, _ := expandcontract.NewRegistry(pool, expandcontract.WithSchema(schema), expandcontract.WithFlagStore(flagStore),
		expandcontract.WithLogger(slog.New(slog.DiscardHandler)))
	_ = reg.Install(ctx)
	_ = reg.Register(ctx, "cities-service", plan)
	_, _ = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	_, _ = reg.Migrate(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})

	if _, err := plan.Transform.Apply(ctx, pool, 0, 2); err != nil {
		panic(err)
	}
	v, err := reg.VerifyTransform(ctx, plan.Name, expandcontract.Request{Actor: "ops"})
	if err != nil {
		panic(err)
	}
	fmt.Println("pending:", v.Pending)
	checks, _ := reg.ContractChecks(ctx, plan.Name)
	for _, c := range checks {
		if c.Name == expandcontract.CheckBackfillVerified {
			fmt.Println(c.Name, c.Passed)
		}
	}
	// Output:
	// pending: 0
	// backfill-verified true
}
