package redissink_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/redissink"
)

// Example enqueues an event in the same transaction as the row it is about,
// relays the outbox to a Redis stream, and reads the entry back.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pgURL, redisURL := os.Getenv("DIMMER_POSTGRES_URL"), os.Getenv("DIMMER_REDIS_URL")
	if pgURL == "" {
		pgURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	if redisURL == "" {
		redisURL = "redis://127.0.0.1:6379/0"
	}
	pool, err := pgxpool.New(ctx, pgURL)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	opts, err := redis.ParseURL(redisURL)
	if err != nil {
		fmt.Println(err)
		return
	}
	rdb := redis.NewClient(opts)
	defer rdb.Close()
	// Names of this run only, removed at the end.
	run := fmt.Sprintf("dimmer_example_redissink_%d", time.Now().UnixNano())
	prefix := run + ":"
	defer pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+run+" CASCADE")
	defer rdb.Del(context.Background(), prefix+"orders")

	ob, err := outbox.New(outbox.Config{Schema: run})
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := ob.Install(ctx, pool); err != nil {
		fmt.Println(err)
		return
	}
	if _, err := pool.Exec(ctx, "CREATE TABLE "+run+".orders (id text PRIMARY KEY, status text)"); err != nil {
		fmt.Println(err)
		return
	}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "INSERT INTO "+run+".orders VALUES ('order-42', 'paid')"); err != nil {
			return err
		}
		_, err := ob.Enqueue(ctx, tx, outbox.Message{Topic: "orders", Key: "order-42", Payload: []byte(`{"status":"paid"}`)})
		return err
	})
	if err != nil {
		fmt.Println(err)
		return
	}

	pub, err := redissink.New(rdb, redissink.WithStreamPrefix(prefix), redissink.WithMaxLen(100_000))
	if err != nil {
		fmt.Println(err)
		return
	}
	relay, err := ob.NewRelay(pool, pub, outbox.RelayConfig{PollInterval: 10 * time.Millisecond})
	if err != nil {
		fmt.Println(err)
		return
	}
	relayCtx, stopRelay := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); _ = relay.Run(relayCtx) }()
	defer func() {
		stopRelay()
		<-done
		_ = relay.Shutdown(context.Background())
	}()

	// A consumer would XREADGROUP and de-duplicate on "id" (package inbox).
	for ctx.Err() == nil {
		entries, err := rdb.XRange(ctx, pub.Stream("orders"), "-", "+").Result()
		if err != nil {
			fmt.Println(err)
			return
		}
		if len(entries) > 0 {
			e := entries[0].Values
			fmt.Println(pub.Stream("orders") == prefix+"orders", e["key"], e["payload"], e["id"] != "")
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Output: true order-42 {"status":"paid"} true
}
