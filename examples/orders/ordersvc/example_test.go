package ordersvc_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/examples/orders/ordersvc"
	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

// TestMain skips the package when PostgreSQL does not answer: the examples
// below run against it and, unlike tests, cannot skip one by one. Under
// CI=true nothing is skipped, as dimmertest does.
func TestMain(m *testing.M) {
	if os.Getenv("CI") != "true" {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		conn, err := pgx.Connect(ctx, dimmertest.PostgresURL())
		cancel()
		if err != nil {
			fmt.Printf("ordersvc: PostgreSQL at %s is not reachable, skipping (run through `make test`): %v\n", dimmertest.PostgresURL(), err)
			os.Exit(0)
		}
		conn.Close(context.Background())
	}
	os.Exit(m.Run())
}

// schemaPool creates schema and returns a pool whose search_path is it
// (the service's tables and dimmer's stores live there) and a function
// that drops it.
func schemaPool(ctx context.Context, schema string) (*pgxpool.Pool, func(), error) {
	cfg, err := pgxpool.ParseConfig(dimmertest.PostgresURL())
	if err != nil {
		return nil, nil, err
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	if _, err := pool.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize()); err != nil {
		pool.Close()
		return nil, nil, err
	}
	return pool, func() {
		_, _ = pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
		pool.Close()
	}, nil
}

// Example wires one instance of the orders service: the stores every
// instance shares (in a schema of their own), the schema plan expanded by
// the deploy, a controller with the service's guards, an instance that
// produces its events to Kafka, and its HTTP API. The migration is off, so
// the legacy table answers; the order's event reaches Kafka from the outbox.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	schema := dimmertest.Name("orders_example_")
	pool, drop, err := schemaPool(ctx, schema)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer drop()
	logger := slog.New(slog.DiscardHandler)

	// Deploy: dimmer's stores and the legacy table, then the expand step.
	shared, err := ordersvc.Open(pool, schema, logger)
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := shared.Install(ctx); err != nil {
		fmt.Println(err)
		return
	}
	if _, err := shared.Registry.Expand(ctx, ordersvc.Migration, expandcontract.Request{Actor: "deploy", Reason: "add orders and order_lines"}); err != nil {
		fmt.Println(err)
		return
	}

	// Kafka: the in-process cluster here, DIMMER_KAFKA_BROKERS in earnest.
	cluster, err := kfake.NewCluster(kfake.SeedTopics(1, ordersvc.EventsTopic))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer cluster.Close()
	producer, err := kgo.NewClient(kafkasink.ClientOptions(cluster.ListenAddrs()...)...)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer producer.Close()

	// One instance: it checks the schema stage against its build, then
	// evaluates the stage flag, dual-writes, shadow-reads, runs its
	// watchdog, heartbeat and relays until Close.
	wd := flags.WatchdogConfig{Window: 30 * time.Second, MinSamples: 200}
	ctrl, err := flags.NewController(shared.Flags, flags.WithFleet(shared.Flags), flags.WithGuards(shared.Guards(wd)...),
		flags.WithControllerLogger(logger))
	if err != nil {
		fmt.Println(err)
		return
	}
	in, err := ordersvc.Start(ctx, shared, ordersvc.Config{ID: "orders-1", Controller: ctrl, Watchdog: wd, Kafka: producer, Logger: logger})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer in.Close(context.Background())
	srv := httptest.NewServer(in.Handler())
	defer srv.Close()

	resp, err := http.Post(srv.URL+"/orders", "application/json",
		strings.NewReader(`{"customer_id":"cust-1","lines":[{"sku":"tea","qty":2,"price_cents":350}]}`))
	if err != nil {
		fmt.Println(err)
		return
	}
	var order ordersvc.Order
	err = json.NewDecoder(resp.Body).Decode(&order)
	resp.Body.Close()
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(resp.StatusCode, "stage", resp.Header.Get(ordersvc.HeaderStage), "total", order.TotalCents, "version", order.Version)

	consumer, err := kgo.NewClient(kgo.SeedBrokers(cluster.ListenAddrs()...), kgo.ConsumeTopics(ordersvc.EventsTopic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer consumer.Close()
	for ctx.Err() == nil {
		if recs := consumer.PollFetches(ctx).Records(); len(recs) > 0 {
			var ev ordersvc.Event
			if err := json.Unmarshal(recs[0].Value, &ev); err != nil {
				fmt.Println(err)
				return
			}
			fmt.Println("event", ev.Type, "for the order:", ev.OrderID == order.ID && string(recs[0].Key) == order.ID, "total", ev.TotalCents)
			break
		}
	}
	// Output:
	// 201 stage off total 700 version 1
	// event order.created for the order: true total 700
}

// ExampleShared_Guards drives the migration's first steps with the
// service's guards: dualwrite is allowed at once; shadow is refused until
// the history is backfilled and verified (the refusal names the check),
// then allowed.
func ExampleShared_Guards() {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	schema := dimmertest.Name("orders_example_")
	pool, drop, err := schemaPool(ctx, schema)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer drop()
	shared, err := ordersvc.Open(pool, schema, slog.New(slog.DiscardHandler))
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := shared.Install(ctx); err != nil {
		fmt.Println(err)
		return
	}
	if err := ordersvc.Seed(ctx, pool, 300, 30); err != nil {
		fmt.Println(err)
		return
	}
	for _, step := range []func(context.Context, string, expandcontract.Request) (expandcontract.Status, error){
		shared.Registry.Expand, shared.Registry.Migrate,
	} {
		if _, err := step(ctx, ordersvc.Migration, expandcontract.Request{Actor: "deploy", Reason: "normalise orders"}); err != nil {
			fmt.Println(err)
			return
		}
	}

	ctrl, err := flags.NewController(shared.Flags, flags.WithGuards(shared.Guards(flags.WatchdogConfig{MinSamples: 200})...),
		flags.WithControllerLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		fmt.Println(err)
		return
	}
	set := func(stage flags.Stage, reason string) {
		st, err := ctrl.Set(ctx, flags.Request{Migration: ordersvc.Migration, Stage: stage, Actor: "ops", Reason: reason})
		var refused *flags.RefusedError
		switch {
		case errors.As(err, &refused):
			for _, c := range refused.Failed {
				fmt.Println("refused", stage, "by", c.Name)
			}
		case err != nil:
			fmt.Println(err)
		default:
			fmt.Println("now", st)
		}
	}
	set(flags.DualWrite, "write the normalised tables too")
	set(flags.Shadow, "too early")

	for _, job := range ordersvc.BackfillJobs(schema, nil) {
		if _, err := shared.Backfill.Run(ctx, job); err != nil {
			fmt.Println(err)
			return
		}
		v, err := shared.Backfill.Verify(ctx, job, backfill.VerifyOptions{})
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Println("backfilled", job.Name, "checksums equal:", v.OK)
	}
	set(flags.Shadow, "backfill verified")
	// Output:
	// now dualwrite
	// refused shadow by backfill-verified
	// backfilled orders-normalise-orders checksums equal: true
	// backfilled orders-normalise-lines checksums equal: true
	// now shadow
}
