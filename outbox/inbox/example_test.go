package inbox_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/outbox/inbox"
)

// Example applies a message delivered twice (a redelivery after a consumer
// crash, say) exactly once: the inbox row and the effect commit together.
func Example() {
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
	schema := fmt.Sprintf("dimmer_example_inbox_%d", time.Now().UnixNano())
	defer pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+schema+" CASCADE")

	in, err := inbox.New(schema, "")
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := in.Install(ctx, pool); err != nil {
		fmt.Println(err)
		return
	}
	if _, err := pool.Exec(ctx, "CREATE TABLE "+schema+".balances (account text PRIMARY KEY, cents bigint)"); err != nil {
		fmt.Println(err)
		return
	}

	// The message id comes from the outbox: the "id" field of a Redis
	// stream entry, or the dimmer-message-id header of a Kafka record.
	const msgID = "0192f5a4-7c1e-7000-8000-000000000042"
	consume := func() error {
		return pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			first, err := in.Mark(ctx, tx, "billing", msgID)
			if err != nil || !first {
				fmt.Println("already applied:", msgID)
				return err
			}
			_, err = tx.Exec(ctx, "INSERT INTO "+schema+".balances VALUES ('acct-7', 500) ON CONFLICT (account) DO UPDATE SET cents = balances.cents + 500")
			fmt.Println("applied:", msgID)
			return err
		})
	}
	for range 2 { // delivered twice
		if err := consume(); err != nil {
			fmt.Println(err)
			return
		}
	}
	var cents int64
	if err := pool.QueryRow(ctx, "SELECT cents FROM "+schema+".balances WHERE account = 'acct-7'").Scan(&cents); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("balance:", cents)
	// Output:
	// applied: 0192f5a4-7c1e-7000-8000-000000000042
	// already applied: 0192f5a4-7c1e-7000-8000-000000000042
	// balance: 500
}
