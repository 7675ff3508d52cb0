package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/flags/redisflags"
	"github.com/dimmer-dev/dimmer/outbox"
)

type backend struct {
	store flags.Store
	fleet flags.FleetStore
	// pool is the Postgres database of the data guards (backfill
	// verification, pending repairs): the store's own when it is Postgres,
	// DIMMER_GUARDS_DB otherwise; nil when there is none.
	pool   *pgxpool.Pool
	schema string
	// redis is the store's client when it is Redis (the console follows
	// its changes and keeps its chart samples there).
	redis *redis.Client
	close func()
}

func (c *cli) openBackend(ctx context.Context, url, schema, prefix string, logger *slog.Logger) (*backend, error) {
	switch {
	case isPostgres(url):
		pool, err := c.openPool(ctx, "flag store --store", url, true)
		if err != nil {
			return nil, err
		}
		s, err := pgflags.NewStore(pool, pgflags.WithSchema(schema), pgflags.WithLogger(logger))
		if err != nil {
			pool.Close()
			return nil, usageError{fmt.Errorf("--schema: %w", err)}
		}
		prepare := s.Install
		if c.readOnly {
			prepare = s.Check
		}
		if err := prepare(ctx); err != nil {
			pool.Close()
			if errors.Is(err, pgflags.ErrNotInstalled) {
				return nil, fmt.Errorf("flag store %s: %w: nothing has been set there yet, or --schema names another schema (a change such as 'dimmer stage set' creates the store)", maskDSN(url), err)
			}
			return nil, fmt.Errorf("flag store %s: %w", maskDSN(url), err)
		}
		return &backend{store: s, fleet: s, pool: pool, schema: schema, close: pool.Close}, nil
	case strings.HasPrefix(url, "redis://"), strings.HasPrefix(url, "rediss://"):
		client, err := c.openRedis(ctx, "flag store --store", url)
		if err != nil {
			return nil, err
		}
		s, err := redisflags.NewStore(client, redisflags.WithPrefix(prefix), redisflags.WithLogger(logger))
		if err != nil {
			client.Close()
			return nil, usageError{fmt.Errorf("--prefix: %w", err)}
		}
		be := &backend{store: s, fleet: s, schema: "dimmer", redis: client, close: func() { client.Close() }}
		if u := os.Getenv("DIMMER_GUARDS_DB"); u != "" {
			pool, err := c.openPool(ctx, "guards database DIMMER_GUARDS_DB", u, true)
			if err != nil {
				client.Close()
				return nil, err
			}
			be.pool = pool
			be.close = func() { client.Close(); pool.Close() }
		}
		return be, nil
	}
	return nil, usagef("--store %q: want a postgres:// URL, a Postgres keyword DSN (host=... dbname=...) or a redis:// URL", oneLine(maskDSN(url), 200))
}

// isPostgres: a postgres:// URL or a keyword DSN (host=... dbname=...), the
// two forms pgx accepts.
func isPostgres(s string) bool {
	if strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://") {
		return true
	}
	return !strings.Contains(s, "://") && strings.Contains(s, "=")
}

// defaultGuards are the built-in checks every controller of the CLI runs
// besides the fleet barrier: the fleet's health before live and rampdown,
// the canary's health before a rollout is finished (every key moved to the
// stage a share of keys was trying: the windows only the canary fed), and, where a Postgres database holds them, a verified backfill before
// shadow (package backfill, schema DIMMER_BACKFILL_SCHEMA) and no pending
// repairs before complete (package dualwrite's repair log in the outbox,
// table DIMMER_OUTBOX_TABLE of the store's schema). A team that verifies or
// repairs by other means overrides them with --force and a reason.
func defaultGuards(be *backend) ([]flags.Guard, error) {
	guards := []flags.Guard{flags.HealthGuard(be.fleet, flags.WatchdogConfig{}), flags.CanaryGuard(be.fleet, flags.WatchdogConfig{})}
	if be.pool == nil {
		return guards, nil
	}
	ob, err := outbox.New(outbox.Config{Schema: be.schema, Table: envOr("DIMMER_OUTBOX_TABLE", outbox.DefaultTable)})
	if err != nil {
		return nil, fmt.Errorf("repair log: %w", err)
	}
	return append(guards,
		backfill.VerifiedGuard(be.pool, envOr("DIMMER_BACKFILL_SCHEMA", backfill.DefaultSchema)),
		dualwrite.NoPendingRepairsGuard(ob, be.pool),
	), nil
}
