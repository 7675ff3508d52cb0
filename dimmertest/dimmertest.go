// Package dimmertest gives each test its own slice of the real PostgreSQL
// and Redis servers named by DIMMER_POSTGRES_URL and DIMMER_REDIS_URL: a
// fresh database or schema, or a Redis key prefix, removed when the test
// ends, so tests run in parallel and leave nothing behind. dimmer's own
// modules test with it, and so can a service testing its migration against
// real stores.
//
// When a server does not answer, the test is skipped, unless CI=true, where it
// fails: `make test` always starts the servers, so a skip there would hide a
// broken set-up.
package dimmertest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
)

const (
	defaultPostgresURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	defaultRedisURL    = "redis://127.0.0.1:6379/0"
)

// PostgresURL is the admin URL of the test server.
func PostgresURL() string {
	if u := os.Getenv("DIMMER_POSTGRES_URL"); u != "" {
		return u
	}
	return defaultPostgresURL
}

// RedisURL is the URL of the test Redis server.
func RedisURL() string {
	if u := os.Getenv("DIMMER_REDIS_URL"); u != "" {
		return u
	}
	return defaultRedisURL
}

// Unavailable skips the test, or fails it under CI=true, because a server
// does not answer.
func Unavailable(t testing.TB, what string, err error) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s is not reachable (CI=true makes this a failure): %v", what, err)
	}
	t.Skipf("%s is not reachable, skipping (run through `make test`): %v", what, err)
}

// Name returns a short random identifier with the given prefix, valid as an
// unquoted SQL identifier and as a Redis key prefix.
func Name(prefix string) string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return prefix + hex.EncodeToString(b[:])
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// Database creates an empty database for the test and returns its URL. The
// database is dropped (with its connections forced closed) when the test ends.
func Database(t testing.TB) string {
	t.Helper()
	admin, err := pgx.Connect(ctx(t), PostgresURL())
	if err != nil {
		Unavailable(t, "PostgreSQL at "+PostgresURL(), err)
	}
	defer admin.Close(context.Background())
	name := Name("dimmer_t_")
	if _, err := admin.Exec(ctx(t), "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(c, PostgresURL())
		if err != nil {
			t.Errorf("drop database %s: %v", name, err)
			return
		}
		defer conn.Close(c)
		if _, err := conn.Exec(c, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
	})
	u, err := url.Parse(PostgresURL())
	if err != nil {
		t.Fatalf("DIMMER_POSTGRES_URL: %v", err)
	}
	u.Path = "/" + name
	return u.String()
}

// Pool opens a pool on url, closed when the test ends.
func Pool(t testing.TB, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(ctx(t), url)
	if err != nil {
		t.Fatalf("open pool: %v", err)
	}
	t.Cleanup(pool.Close)
	if err := pool.Ping(ctx(t)); err != nil {
		Unavailable(t, "PostgreSQL", err)
	}
	return pool
}

// Schema creates a schema in the shared test database and returns a pool
// whose search_path is that schema, and the schema's name. The schema is
// dropped when the test ends. Cheaper than [Database]; use it unless the test
// needs a whole database (LISTEN channels are database-wide: name them after
// the schema).
func Schema(t testing.TB) (*pgxpool.Pool, string) {
	t.Helper()
	name := Name("dimmer_s_")
	admin, err := pgx.Connect(ctx(t), PostgresURL())
	if err != nil {
		Unavailable(t, "PostgreSQL at "+PostgresURL(), err)
	}
	defer admin.Close(context.Background())
	if _, err := admin.Exec(ctx(t), "CREATE SCHEMA "+name); err != nil {
		t.Fatalf("create schema %s: %v", name, err)
	}
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(c, PostgresURL())
		if err != nil {
			t.Errorf("drop schema %s: %v", name, err)
			return
		}
		defer conn.Close(c)
		if _, err := conn.Exec(c, "DROP SCHEMA IF EXISTS "+name+" CASCADE"); err != nil {
			t.Errorf("drop schema %s: %v", name, err)
		}
	})
	cfg, err := pgxpool.ParseConfig(PostgresURL())
	if err != nil {
		t.Fatalf("DIMMER_POSTGRES_URL: %v", err)
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = name
	pool, err := pgxpool.NewWithConfig(ctx(t), cfg)
	if err != nil {
		t.Fatalf("open pool: %v", err)
	}
	// Registered after the drop, so it runs before it.
	t.Cleanup(pool.Close)
	return pool, name
}

// Redis returns a client on the test Redis server and a key prefix unique to
// the test ("dimmer:t:<random>:"). Keys under the prefix are deleted and the
// client closed when the test ends.
func Redis(t testing.TB) (*redis.Client, string) {
	t.Helper()
	opts, err := redis.ParseURL(RedisURL())
	if err != nil {
		t.Fatalf("DIMMER_REDIS_URL: %v", err)
	}
	client := redis.NewClient(opts)
	if err := client.Ping(ctx(t)).Err(); err != nil {
		client.Close()
		Unavailable(t, "Redis at "+RedisURL(), err)
	}
	prefix := "dimmer:" + Name("t") + ":"
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		defer client.Close()
		iter := client.Scan(c, 0, prefix+"*", 500).Iterator()
		var keys []string
		for iter.Next(c) {
			keys = append(keys, iter.Val())
		}
		if err := iter.Err(); err != nil {
			t.Errorf("clean redis prefix %s: %v", prefix, err)
			return
		}
		for len(keys) > 0 {
			n := min(len(keys), 500)
			if err := client.Del(c, keys[:n]...).Err(); err != nil {
				t.Errorf("clean redis prefix %s: %v", prefix, err)
				return
			}
			keys = keys[n:]
		}
	})
	return client, prefix
}
