package dimmertest_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/dimmer-dev/dimmer/dimmertest"
)

// Example is the start of a service's own test of its migration: a schema
// and a Redis key prefix of its own on the real servers, removed when the
// test ends, so such tests run in parallel. (An example has no test to run
// in; in a test, t is the test's own.)
func Example() {
	var t *testing.T // func TestAccountsMigration(t *testing.T) {
	t.Parallel()
	pool, schema := dimmertest.Schema(t) // the pool's search_path is schema
	rdb, prefix := dimmertest.Redis(t)   // put every key under prefix
	ctx := context.Background()
	if _, err := pool.Exec(ctx, `CREATE TABLE accounts (id text PRIMARY KEY, name text NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	if err := rdb.HSet(ctx, prefix+"account:1", "name", "Ann").Err(); err != nil {
		t.Fatal(err)
	}
	t.Logf("tables in %s, keys under %s", schema, prefix)
}

// ExampleDatabase gives a test a whole database, for what is database-wide
// (LISTEN channels, an outbox and its relay's leases, a second "new" store).
// Where the test user may not create databases, it falls back to a schema.
func ExampleDatabase() {
	var t *testing.T // func TestSomething(t *testing.T) {
	pool := dimmertest.Pool(t, dimmertest.Database(t))
	if err := pool.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// ExampleHangingPool shows that a call returns at its ctx when the
// database stops answering mid-run: the pool reaches the server through a
// proxy, which then hangs.
func ExampleHangingPool() {
	var t *testing.T // func TestReadGivesUpOnAHungDatabase(t *testing.T) {
	ctx := context.Background()
	proxy, pool := dimmertest.HangingPool(t, "")
	if err := pool.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	proxy.Hang()
	qctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := pool.Ping(qctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want the ctx's deadline, got %v", err)
	}
}
