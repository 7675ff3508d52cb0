// Command orders is an orders service (HTTP JSON API) in the middle of a
// migration from a legacy denormalised table to a normalised schema, with
// every part of dimmer in place: the expand/contract plan, the stage flag
// (Postgres provider), dual writes with a repair log and relay, shadow
// reads, the backfill, the watchdog and outbox events to Kafka.
//
//	go run ./examples/orders [-addr 127.0.0.1:8080] [-keep]
//
// It works in the schema dimmer_orders_example of DIMMER_POSTGRES_URL
// (default: the local server), seeded with legacy orders, and drops it on
// exit unless -keep. Kafka is franz-go's in-process cluster unless
// DIMMER_KAFKA_BROKERS lists brokers.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/examples/orders/ordersvc"
	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

const schema = "dimmer_orders_example"

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "listen address")
	keep := flag.Bool("keep", false, "keep the schema "+schema+" on exit")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *addr, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "orders:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, addr string, keep bool) error {
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return fmt.Errorf("DIMMER_POSTGRES_URL: %w", err)
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+schema); err != nil {
		return fmt.Errorf("create schema: %w", err)
	}
	if !keep {
		defer func() {
			c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, _ = pool.Exec(c, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
		}()
	}

	shared, err := ordersvc.Open(pool, schema, logger)
	if err != nil {
		return err
	}
	if err := shared.Install(ctx); err != nil {
		return err
	}
	var n int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM orders_legacy`).Scan(&n); err != nil {
		return err
	}
	if n == 0 {
		if err := ordersvc.Seed(ctx, pool, 2000, 200); err != nil {
			return err
		}
	}
	// The deploy expands the schema (idempotent); the service then checks
	// its range against it at start.
	if _, err := shared.Registry.Expand(ctx, ordersvc.Migration, expandcontract.Request{Actor: "deploy", Reason: "orders service start"}); err != nil {
		return err
	}

	brokers := strings.FieldsFunc(os.Getenv("DIMMER_KAFKA_BROKERS"), func(r rune) bool { return r == ',' })
	if len(brokers) == 0 {
		cluster, err := kfake.NewCluster(kfake.SeedTopics(1, ordersvc.EventsTopic))
		if err != nil {
			return err
		}
		defer cluster.Close()
		brokers = cluster.ListenAddrs()
	}
	producer, err := kgo.NewClient(kafkasink.ClientOptions(brokers...)...)
	if err != nil {
		return err
	}
	defer producer.Close()

	wd := flags.WatchdogConfig{Window: 30 * time.Second, MinSamples: 200}
	ctrl, err := flags.NewController(shared.Flags, flags.WithFleet(shared.Flags), flags.WithGuards(shared.Guards(wd)...), flags.WithControllerLogger(logger))
	if err != nil {
		return err
	}
	host, _ := os.Hostname()
	in, err := ordersvc.Start(ctx, shared, ordersvc.Config{ID: "orders@" + host, Controller: ctrl, Watchdog: wd, Kafka: producer, Logger: logger})
	if err != nil {
		return err
	}
	defer func() {
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = in.Close(c)
	}()

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: in.Handler(), ReadHeaderTimeout: 5 * time.Second}
	fmt.Printf("orders service on http://%s (schema %s, Kafka %s)\n", ln.Addr(), schema, strings.Join(brokers, ","))
	fmt.Printf("  curl -s -XPOST http://%s/orders -d '{\"customer_id\":\"cust-1\",\"lines\":[{\"sku\":\"tea\",\"qty\":2,\"price_cents\":350}]}'\n", ln.Addr())
	fmt.Printf("  curl -s http://%s/customers/cust-1/orders\n", ln.Addr())
	fmt.Printf("  the stage: dimmer status / dimmer stage against the same database (flag schema %s)\n", schema)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(c); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
