package dualwrite_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
)

// Balance is the entity migrated from one table to another.
type Balance struct {
	ID    string
	Cents int64
}

// Example dual-writes to two Postgres tables. The new table refuses a
// negative balance the old one accepts, so the secondary write fails: the
// caller does not see it, a repair goes to the outbox, and the repair relay
// brings new in line from old's current row once new accepts it.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		fmt.Println(err)
		return
	}
	schema := "dimmer_example_dualwrite_" + strconv.Itoa(os.Getpid())
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	setup := `DROP SCHEMA IF EXISTS ` + schema + ` CASCADE;
CREATE SCHEMA ` + schema + `;
CREATE TABLE balances_old (id text PRIMARY KEY, cents bigint NOT NULL);
CREATE TABLE balances_new (id text PRIMARY KEY, cents bigint NOT NULL CONSTRAINT no_overdraft CHECK (cents >= 0));`
	if _, err := pool.Exec(ctx, setup); err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Exec(context.Background(), `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)

	// The repair log: an outbox table of its own.
	ob, err := outbox.New(outbox.Config{Schema: schema, Table: "repairs"})
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := ob.Install(ctx, pool); err != nil {
		fmt.Println(err)
		return
	}
	repairs, err := dualwrite.NewOutboxRepairLog(ob, pool, dualwrite.RepairTopic("balances_v2"))
	if err != nil {
		fmt.Println(err)
		return
	}

	upsert := func(table string) dualwrite.Func[Balance, struct{}] {
		return func(ctx context.Context, b Balance) (struct{}, error) {
			_, err := pool.Exec(ctx, `INSERT INTO `+table+` (id, cents) VALUES ($1, $2)
				ON CONFLICT (id) DO UPDATE SET cents = excluded.cents`, b.ID, b.Cents)
			return struct{}{}, err
		}
	}
	// In a service the stage comes from the flag: flags.NewSource(client, flags.Off).
	stage := dualwrite.StageFunc(func(context.Context, string, string) (flags.Stage, error) { return flags.DualWrite, nil })
	w, err := dualwrite.New("balances_v2", stage, upsert("balances_old"), upsert("balances_new"),
		func(b Balance) string { return b.ID }, dualwrite.WithRepairLog(repairs))
	if err != nil {
		fmt.Println(err)
		return
	}
	_, err = w.Write(ctx, Balance{ID: "acct-1", Cents: -500})
	fmt.Println("write error:", err)
	_ = w.Shutdown(ctx) // waits for the async secondary write and its repair

	// The repairer re-reads the current row of the authoritative side and
	// stores it on the other: replaying a repair twice or late is harmless.
	load := func(ctx context.Context, side flags.Side, id string) (Balance, bool, error) {
		b := Balance{ID: id}
		err := pool.QueryRow(ctx, `SELECT cents FROM balances_`+side.String()+` WHERE id = $1`, id).Scan(&b.Cents)
		if errors.Is(err, pgx.ErrNoRows) {
			return b, false, nil
		}
		return b, err == nil, err
	}
	store := func(ctx context.Context, side flags.Side, _ string, b Balance) error {
		_, err := upsert("balances_"+side.String())(ctx, b)
		return err
	}
	repairer, err := dualwrite.NewRepairer("balances_v2", stage, load, store)
	if err != nil {
		fmt.Println(err)
		return
	}
	// The new table's rule is relaxed (the fix), and the repair loop runs:
	// an outbox relay delivering the repairs to the repairer, retrying with
	// backoff, dead-lettering what keeps failing.
	if _, err := pool.Exec(ctx, `ALTER TABLE balances_new DROP CONSTRAINT no_overdraft`); err != nil {
		fmt.Println(err)
		return
	}
	relay, err := dualwrite.NewRepairRelay(ob, pool, outbox.RelayConfig{}, repairer)
	if err != nil {
		fmt.Println(err)
		return
	}
	go relay.Run(ctx)
	defer relay.Shutdown(context.Background())

	for ctx.Err() == nil {
		if b, found, _ := load(ctx, flags.New, "acct-1"); found {
			fmt.Println("new after repair:", b.Cents)
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Output:
	// write error: <nil>
	// new after repair: -500
}
