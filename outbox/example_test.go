package outbox_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/outbox"
)

// Example enqueues a message in a business transaction and relays it.
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
	schema := fmt.Sprintf("dimmer_example_%d", time.Now().UnixNano())
	defer pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+schema+" CASCADE")

	ob, err := outbox.New(outbox.Config{Schema: schema})
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := ob.Install(ctx, pool); err != nil {
		fmt.Println(err)
		return
	}
	// The message is written if and only if the business change commits.
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		// ... the business write goes here, in tx ...
		_, err := ob.Enqueue(ctx, tx, outbox.Message{Topic: "orders", Key: "order-42", Payload: []byte(`{"status":"paid"}`)})
		return err
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	// In production the Publisher is kafkasink or redissink.
	got := make(chan string, 1)
	pub := outbox.PublisherFunc(func(_ context.Context, batch []outbox.Record) []error {
		for _, r := range batch {
			got <- r.Topic + " " + r.Key + " " + string(r.Payload)
		}
		return make([]error, len(batch))
	})
	relay, err := ob.NewRelay(pool, pub, outbox.RelayConfig{})
	if err != nil {
		fmt.Println(err)
		return
	}
	go relay.Run(ctx)
	fmt.Println(<-got)
	_ = relay.Shutdown(ctx)
	// Output: orders order-42 {"status":"paid"}
}

// ExampleConfig_partitions installs an outbox split into 4 partitions by
// bucket range, for a fleet of relays: two relays each hold two whole
// partitions, so neither reads or writes the other's pages.
func ExampleConfig_partitions() {
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
	schema := fmt.Sprintf("dimmer_example_%d", time.Now().UnixNano())
	defer pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+schema+" CASCADE")

	ob, err := outbox.New(outbox.Config{Schema: schema, Buckets: 8, Partitions: 4})
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := ob.Install(ctx, pool); err != nil {
		fmt.Println(err)
		return
	}
	discard := outbox.PublisherFunc(func(_ context.Context, batch []outbox.Record) []error { return make([]error, len(batch)) })
	holding := func(r *outbox.Relay, n int) {
		for len(r.Buckets()) != n && ctx.Err() == nil {
			time.Sleep(10 * time.Millisecond)
		}
	}
	var relays []*outbox.Relay
	for _, id := range []string{"relay-a", "relay-b"} {
		r, err := ob.NewRelay(pool, discard, outbox.RelayConfig{ID: id, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			fmt.Println(err)
			return
		}
		go r.Run(ctx)
		defer r.Shutdown(context.Background())
		relays = append(relays, r)
		holding(r, 8/len(relays)) // the first takes every bucket, then shares
	}
	holding(relays[0], 4)
	for _, r := range relays {
		fmt.Println(r.ID(), "holds buckets", r.Buckets())
	}
	// Output:
	// relay-a holds buckets [0 1 2 3]
	// relay-b holds buckets [4 5 6 7]
}
