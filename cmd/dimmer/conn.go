package main

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
)

// openPool parses a Postgres URL or keyword DSN given as what (a flag or an
// environment variable) and returns a pool over it. A string that does not
// parse is bad usage.
func (c *cli) openPool(ctx context.Context, what, url string) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, usagef("%s: %v", what, err)
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return pool, nil
}

// openRedis parses a redis:// URL given as what and returns a client. A URL
// that does not parse is bad usage.
func (c *cli) openRedis(what, url string) (*redis.Client, error) {
	opts, err := redis.ParseURL(url)
	if err != nil {
		return nil, usagef("%s: %v", what, err)
	}
	return redis.NewClient(opts), nil
}
