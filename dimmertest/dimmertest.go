package dimmertest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/dimmer-dev/dimmer/internal/connstr"
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
//
// Where the test user may not create databases (no CREATEDB, as on many
// managed servers), Database says so in the test log and falls back to a
// schema of its own in the database of DIMMER_POSTGRES_URL: the URL it
// returns then sets search_path to that schema, which is dropped when the
// test ends. Tables, types and functions stay apart as with a database;
// what is database-wide (LISTEN channels, replication slots, pg_stat views)
// is shared with other tests, so name such things after the schema. If the
// user may create neither, the test fails naming the grants it needs.
func Database(t testing.TB) string {
	t.Helper()
	admin, err := pgx.Connect(ctx(t), PostgresURL())
	if err != nil {
		Unavailable(t, "PostgreSQL at "+connstr.Where(PostgresURL()), err)
	}
	defer admin.Close(context.Background())
	u, err := url.Parse(PostgresURL())
	if err != nil {
		t.Fatalf("DIMMER_POSTGRES_URL: %v", connstr.ParseError(err))
	}
	name := Name("dimmer_t_")
	_, err = admin.Exec(ctx(t), "CREATE DATABASE "+name)
	if isInsufficientPrivilege(err) {
		t.Logf("dimmertest: the test user cannot create databases (%v); using schema %s in database %q instead",
			err, name, admin.Config().Database)
		createSchema(t, admin, name)
		q := u.Query()
		q.Set("search_path", name)
		u.RawQuery = q.Encode()
		return u.String()
	}
	if err != nil {
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
	u.Path = "/" + name
	return u.String()
}

// isInsufficientPrivilege reports whether err is PostgreSQL's
// insufficient_privilege (42501).
func isInsufficientPrivilege(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "42501"
}

// createSchema creates schema name through admin and drops it when the test
// ends; a user without the right to is told which grant it lacks.
func createSchema(t testing.TB, admin *pgx.Conn, name string) {
	t.Helper()
	if _, err := admin.Exec(ctx(t), "CREATE SCHEMA "+name); err != nil {
		if isInsufficientPrivilege(err) {
			t.Fatalf("create schema %s: the test user %q may create neither databases nor schemas in database %q; "+
				"grant one: ALTER ROLE %[2]s CREATEDB, or GRANT CREATE ON DATABASE %[3]s TO %[2]s: %[4]v",
				name, admin.Config().User, admin.Config().Database, err)
		}
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

// Conn opens a connection to DIMMER_POSTGRES_URL of the test's own, closed
// when the test ends. A test playing another party beside the code under
// test (a second process, a transaction holding a lock) uses it rather than
// the code's pool, which that party's locks may leave with no connection
// free.
func Conn(t testing.TB) *pgx.Conn {
	t.Helper()
	c, err := pgx.Connect(ctx(t), PostgresURL())
	if err != nil {
		Unavailable(t, "PostgreSQL at "+connstr.Where(PostgresURL()), err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

var likeEscaper = strings.NewReplacer(`\`, `\\`, "%", `\%`, "_", `\_`)

// LockWaiting reports, through observer (a [Conn]), whether a session whose
// current statement contains each of parts, in order, waits for a lock:
// how a test holding a lock in a transaction of its own learns that the
// code under test has reached it. An error reads as not waiting.
func LockWaiting(t testing.TB, observer *pgx.Conn, parts ...string) bool {
	t.Helper()
	pattern := "%"
	for _, p := range parts {
		pattern += likeEscaper.Replace(p) + "%"
	}
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var waiting bool
	err := observer.QueryRow(c, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
WHERE wait_event_type = 'Lock' AND query LIKE $1)`, pattern).Scan(&waiting)
	return err == nil && waiting
}

// Blocks reports, through observer (a [Conn]), whether some session waits
// for a lock that holder holds: how a test holding a lock learns that the
// code under test has reached it when no text of the code's statement is
// the test's own to match (see [LockWaiting]). An error reads as not
// blocking.
func Blocks(t testing.TB, observer, holder *pgx.Conn) bool {
	t.Helper()
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var blocks bool
	err := observer.QueryRow(c, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))`,
		holder.PgConn().PID()).Scan(&blocks)
	return err == nil && blocks
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
		Unavailable(t, "PostgreSQL at "+connstr.Where(PostgresURL()), err)
	}
	defer admin.Close(context.Background())
	createSchema(t, admin, name)
	cfg, err := pgxpool.ParseConfig(PostgresURL())
	if err != nil {
		t.Fatalf("DIMMER_POSTGRES_URL: %v", connstr.ParseError(err))
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
		t.Fatalf("DIMMER_REDIS_URL: %v", connstr.ParseError(err))
	}
	client := redis.NewClient(opts)
	if err := client.Ping(ctx(t)).Err(); err != nil {
		client.Close()
		Unavailable(t, "Redis at "+connstr.Where(RedisURL()), err)
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
