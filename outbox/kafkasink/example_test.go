package kafkasink_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

// Example relays an outbox to Kafka: here franz-go's in-process cluster,
// in production the brokers of DIMMER_KAFKA_BROKERS.
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
	cluster, err := kfake.NewCluster(kfake.SeedTopics(1, "orders"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer cluster.Close()

	ob, err := outbox.New(outbox.Config{Schema: schema})
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := ob.Install(ctx, pool); err != nil {
		fmt.Println(err)
		return
	}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		_, err := ob.Enqueue(ctx, tx, outbox.Message{Topic: "orders", Key: "order-42", Payload: []byte(`{"status":"paid"}`)})
		return err
	})
	if err != nil {
		fmt.Println(err)
		return
	}

	// acks=all and the idempotent producer; add TLS/SASL options as needed.
	producer, err := kgo.NewClient(kafkasink.ClientOptions(cluster.ListenAddrs()...)...)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer producer.Close()
	pub, err := kafkasink.New(producer)
	if err != nil {
		fmt.Println(err)
		return
	}
	relay, err := ob.NewRelay(pool, pub, outbox.RelayConfig{})
	if err != nil {
		fmt.Println(err)
		return
	}
	go relay.Run(ctx)
	defer relay.Shutdown(ctx)

	consumer, err := kgo.NewClient(kgo.SeedBrokers(cluster.ListenAddrs()...), kgo.ConsumeTopics("orders"))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer consumer.Close()
	for ctx.Err() == nil {
		if recs := consumer.PollFetches(ctx).Records(); len(recs) > 0 {
			fmt.Printf("%s %s %s\n", recs[0].Topic, recs[0].Key, recs[0].Value)
			return
		}
	}
	// Output: orders order-42 {"status":"paid"}
}
