package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"

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
	close  func()
}

func (c *cli) openBackend(ctx context.Context, url, schema, prefix string, logger *slog.Logger) (*backend, error) {
	switch {
	case strings.HasPrefix(url, "postgres://"), strings.HasPrefix(url, "postgresql://"):
		pool, err := c.openPool(ctx, "--store", url)
		if err != nil {
			return nil, err
		}
		s, err := pgflags.NewStore(pool, pgflags.WithSchema(schema), pgflags.WithLogger(logger))
		if err != nil {
			pool.Close()
			return nil, err
		}
		if err := s.Install(ctx); err != nil {
			pool.Close()
			return nil, fmt.Errorf("flag store %s: %w", redactURL(url), err)
		}
		return &backend{store: s, fleet: s, pool: pool, schema: schema, close: pool.Close}, nil
	case strings.HasPrefix(url, "redis://"), strings.HasPrefix(url, "rediss://"):
		client, err := c.openRedis("--store", url)
		if err != nil {
			return nil, err
		}
		if err := client.Ping(ctx).Err(); err != nil {
			client.Close()
			return nil, fmt.Errorf("flag store %s: %w", redactURL(url), err)
		}
		s, err := redisflags.NewStore(client, redisflags.WithPrefix(prefix), redisflags.WithLogger(logger))
		if err != nil {
			client.Close()
			return nil, err
		}
		be := &backend{store: s, fleet: s, schema: "dimmer", close: func() { client.Close() }}
		if u := os.Getenv("DIMMER_GUARDS_DB"); u != "" {
			pool, err := c.openPool(ctx, "DIMMER_GUARDS_DB", u)
			if err != nil {
				client.Close()
				return nil, err
			}
			be.pool = pool
			be.close = func() { client.Close(); pool.Close() }
		}
		return be, nil
	}
	return nil, usagef("--store %q: want a postgres:// or redis:// URL", redactURL(url))
}

// redactURL hides a password in a URL for messages.
func redactURL(u string) string {
	at := strings.LastIndex(u, "@")
	scheme := strings.Index(u, "://")
	if at < 0 || scheme < 0 || at < scheme {
		return u
	}
	cred := u[scheme+3 : at]
	if i := strings.Index(cred, ":"); i >= 0 {
		return u[:scheme+3] + cred[:i] + ":***" + u[at:]
	}
	return u
}

// defaultGuards are the built-in checks every controller of the CLI runs
// besides the fleet barrier: the fleet's health before live and rampdown,
// and, where a Postgres database holds them, a verified backfill before
// shadow (package backfill, schema DIMMER_BACKFILL_SCHEMA) and no pending
// repairs before complete (package dualwrite's repair log in the outbox,
// table DIMMER_OUTBOX_TABLE of the store's schema). A team that verifies or
// repairs by other means overrides them with --force and a reason.
func defaultGuards(be *backend) ([]flags.Guard, error) {
	guards := []flags.Guard{flags.HealthGuard(be.fleet, flags.WatchdogConfig{})}
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
