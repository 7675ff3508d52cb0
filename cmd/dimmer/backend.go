package main

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/flags/redisflags"
)

type backend struct {
	store flags.Store
	fleet flags.FleetStore
	close func()
}

func openBackend(ctx context.Context, url, schema, prefix string, logger *slog.Logger) (*backend, error) {
	switch {
	case strings.HasPrefix(url, "postgres://"), strings.HasPrefix(url, "postgresql://"):
		pool, err := pgxpool.New(ctx, url)
		if err != nil {
			return nil, fmt.Errorf("--store: %w", err)
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
		return &backend{store: s, fleet: s, close: pool.Close}, nil
	case strings.HasPrefix(url, "redis://"), strings.HasPrefix(url, "rediss://"):
		opts, err := redis.ParseURL(url)
		if err != nil {
			return nil, usagef("--store: %v", err)
		}
		client := redis.NewClient(opts)
		if err := client.Ping(ctx).Err(); err != nil {
			client.Close()
			return nil, fmt.Errorf("flag store %s: %w", redactURL(url), err)
		}
		s, err := redisflags.NewStore(client, redisflags.WithPrefix(prefix), redisflags.WithLogger(logger))
		if err != nil {
			client.Close()
			return nil, err
		}
		return &backend{store: s, fleet: s, close: func() { client.Close() }}, nil
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
// besides the fleet barrier.
func defaultGuards(be *backend) []flags.Guard {
	return []flags.Guard{flags.HealthGuard(be.fleet, flags.WatchdogConfig{})}
}
