package cdc_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/outbox"
)

// exampleURL is a server with wal_level = logical (`make test` starts one).
func exampleURL() string {
	if u := os.Getenv("DIMMER_LOGICAL_POSTGRES_URL"); u != "" {
		return u
	}
	return "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
}

// Example writes an outbox message into the log inside a business
// transaction and relays it from a replication slot.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	url := exampleURL()
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	slot := fmt.Sprintf("example_relay_%d", time.Now().UnixNano())
	// The registry goes to a schema of the example's own, dropped at the end.
	schema := slot
	defer pool.Exec(context.Background(), `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)
	if err := cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: slot, Purpose: "relay", Schema: schema}); err != nil {
		fmt.Println(err)
		return
	}
	defer cdc.DropSlot(context.Background(), pool, schema, slot, true)

	emitter, _ := cdc.NewEmitter()
	_ = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		// ... the business write, in tx ...
		_, err := emitter.Enqueue(ctx, tx, outbox.Message{Topic: "orders", Key: "order-42", Payload: []byte(`{"status":"paid"}`)})
		return err
	})

	published := make(chan outbox.Record, 1)
	pub := outbox.PublisherFunc(func(_ context.Context, batch []outbox.Record) []error {
		for _, r := range batch {
			published <- r
		}
		return make([]error, len(batch)) // all acknowledged
	})
	relay, err := cdc.NewRelay(url, pub, cdc.RelayConfig{Slot: slot, Schema: schema})
	if err != nil {
		fmt.Println(err)
		return
	}
	go relay.Run(ctx)
	defer relay.Shutdown(context.Background())
	r := <-published
	fmt.Println(r.Topic, r.Key, string(r.Payload))
	// Output: orders order-42 {"status":"paid"}
}

// ExampleSync keeps a copy of a table in step: the rows already there are
// copied, later changes streamed.
func ExampleSync() {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	url := exampleURL()
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	// The tables, the slot registry and the copy's checkpoints go to a
	// schema of the example's own, dropped at the end.
	name := fmt.Sprint("example_sync_", time.Now().UnixNano())
	schema := name
	if _, err := pool.Exec(ctx, `CREATE SCHEMA `+schema); err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Exec(context.Background(), `DROP SCHEMA `+schema+` CASCADE`)
	src, dst := schema+".users", schema+".users_copy"
	for _, t := range []string{src, dst} {
		if _, err := pool.Exec(ctx, `CREATE TABLE `+t+` (id int PRIMARY KEY, v int NOT NULL, email text)`); err != nil {
			fmt.Println(err)
			return
		}
	}
	_, _ = pool.Exec(ctx, `INSERT INTO `+src+` VALUES (1, 1, 'ada@example.com')`)

	s, err := cdc.NewSync(url, pool, cdc.SyncConfig{Name: name, Source: backfill.Table{Schema: schema, Name: "users"},
		Target: backfill.Table{Schema: schema, Name: "users_copy"}, VersionColumn: "v", Schema: schema})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer cdc.DropSlot(context.Background(), pool, schema, name, true)
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
	_, _ = pool.Exec(ctx, `UPDATE `+src+` SET v = 2, email = 'ada@example.org' WHERE id = 1`)
	_, _ = pool.Exec(ctx, `INSERT INTO `+src+` VALUES (2, 1, 'grace@example.com')`)
	var emails string
	for range 500 {
		_ = pool.QueryRow(ctx, `SELECT coalesce(string_agg(email, ' ' ORDER BY id), '') FROM `+dst).Scan(&emails)
		if emails == "ada@example.org grace@example.com" {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	fmt.Println(emails)
	// Output: ada@example.org grace@example.com
}
