package dimmertest

import (
	"context"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dimmer-dev/dimmer/internal/connstr"
)

// LogicalPostgresURL is the admin URL of a test server whose wal_level is
// logical, for change data capture: DIMMER_LOGICAL_POSTGRES_URL (set by
// scripts/need-logical-pg.sh under `make test`), else DIMMER_POSTGRES_URL
// when that server has wal_level=logical. It is empty when neither is.
func LogicalPostgresURL() string {
	if u := os.Getenv("DIMMER_LOGICAL_POSTGRES_URL"); u != "" {
		return u
	}
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(c, PostgresURL())
	if err != nil {
		return ""
	}
	defer conn.Close(c)
	var level string
	if err := conn.QueryRow(c, `SHOW wal_level`).Scan(&level); err != nil || level != "logical" {
		return ""
	}
	return PostgresURL()
}

// LogicalDatabase creates an empty database on the [LogicalPostgresURL]
// server and returns its URL. When the test ends, replication slots still
// on the database fail the test (a test must drop what it creates) and are
// dropped, then the database is dropped. Without a logical server the test
// is skipped, or fails under CI=true.
func LogicalDatabase(t testing.TB) string {
	t.Helper()
	admin := LogicalPostgresURL()
	if admin == "" {
		Unavailable(t, "PostgreSQL with wal_level=logical (DIMMER_LOGICAL_POSTGRES_URL, started by scripts/need-logical-pg.sh)", nil)
	}
	conn, err := pgx.Connect(ctx(t), admin)
	if err != nil {
		Unavailable(t, "PostgreSQL with wal_level=logical", err)
	}
	defer conn.Close(context.Background())
	name := Name("dimmer_l_")
	if _, err := conn.Exec(ctx(t), "CREATE DATABASE "+name); err != nil {
		t.Fatalf("create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(c, admin)
		if err != nil {
			t.Errorf("drop database %s: %v", name, err)
			return
		}
		defer conn.Close(c)
		rows, err := conn.Query(c, `SELECT slot_name FROM pg_replication_slots WHERE database = $1`, name)
		if err == nil {
			leaked, err := pgx.CollectRows(rows, pgx.RowTo[string])
			if err != nil {
				t.Errorf("list slots of %s: %v", name, err)
			}
			for _, slot := range leaked {
				t.Errorf("replication slot %s was left behind on database %s", slot, name)
				if _, err := conn.Exec(c, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL`, slot); err != nil {
					t.Errorf("drop slot %s: %v", slot, err)
				}
				for range 50 {
					if _, err = conn.Exec(c, `SELECT pg_drop_replication_slot($1)`, slot); err == nil {
						break
					}
					time.Sleep(100 * time.Millisecond)
				}
				if err != nil {
					t.Errorf("drop slot %s: %v", slot, err)
				}
			}
		}
		if _, err := conn.Exec(c, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("drop database %s: %v", name, err)
		}
	})
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatalf("DIMMER_LOGICAL_POSTGRES_URL: %v", connstr.ParseError(err))
	}
	u.Path = "/" + name
	return u.String()
}
