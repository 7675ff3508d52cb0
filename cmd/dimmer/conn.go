package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
)

// defaultTimeout bounds connecting and each statement (--timeout).
const defaultTimeout = 10 * time.Second

// openPool parses a Postgres URL or keyword DSN given as what (a flag or an
// environment variable), opens a pool whose connections give up connecting
// after --timeout (each attempt: pgx tries TLS, then plain) and, with
// stmtTimeout, whose statements the server cancels after --timeout, and
// checks the server answers within --timeout. A string that does not parse
// is bad usage; a server that does not answer is an error naming it.
func (c *cli) openPool(ctx context.Context, what, url string, stmtTimeout bool) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, usagef("%s: %v", what, err)
	}
	cfg.ConnConfig.ConnectTimeout = c.timeout
	if stmtTimeout {
		cfg.ConnConfig.RuntimeParams["statement_timeout"] = strconv.FormatInt(c.timeout.Milliseconds(), 10)
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	pctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	if err := pool.Ping(pctx); err != nil {
		pool.Close()
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			// The server answered: the database, the role or a setting is
			// wrong, not the network.
			return nil, fmt.Errorf("%s %s: the server refused the connection: %w", what, maskDSN(url), err)
		}
		return nil, fmt.Errorf("%s %s: not reachable within --timeout %v: %w", what, maskDSN(url), c.timeout, err)
	}
	return pool, nil
}

// openRedis parses a redis:// URL given as what, returns a client whose
// dials, reads and writes give up after --timeout, and checks the server
// answers within --timeout. A URL that does not parse is bad usage.
func (c *cli) openRedis(ctx context.Context, what, url string) (*redis.Client, error) {
	opts, err := redis.ParseURL(url)
	if err != nil {
		return nil, usagef("%s: %v", what, err)
	}
	opts.DialTimeout, opts.ReadTimeout, opts.WriteTimeout = c.timeout, c.timeout, c.timeout
	client := redis.NewClient(opts)
	pctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	if err := client.Ping(pctx).Err(); err != nil {
		client.Close()
		var redisErr redis.Error
		if errors.As(err, &redisErr) {
			return nil, fmt.Errorf("%s %s: the server refused the connection: %w", what, maskDSN(url), err)
		}
		return nil, fmt.Errorf("%s %s: not reachable within --timeout %v: %w", what, maskDSN(url), c.timeout, err)
	}
	return client, nil
}

// go-redis prints to its own logger (stderr, unredacted, e.g. four lines
// before giving up on a mute server). The CLI routes it to the current run's
// slog logger at debug level, which the default level hides.
var (
	redisLogOnce sync.Once
	redisLog     atomic.Pointer[slog.Logger]
)

type redisSlog struct{}

func (redisSlog) Printf(ctx context.Context, format string, v ...any) {
	if l := redisLog.Load(); l != nil {
		l.DebugContext(ctx, "go-redis: "+fmt.Sprintf(format, v...))
	}
}

func routeRedisLogs(l *slog.Logger) {
	redisLog.Store(l)
	redisLogOnce.Do(func() { redis.SetLogger(redisSlog{}) })
}

// brokerList splits a comma-separated list of Kafka seed brokers, each
// host:port. Credentials or a URL in an entry are refused without echoing
// it: credentials go through the --sasl* flags, and a resolver would
// otherwise be asked to look the password up as a host name.
func brokerList(flag, list string) ([]string, error) {
	var seeds []string
	for i, b := range strings.Split(list, ",") {
		b = strings.TrimSpace(b)
		switch {
		case b == "":
			continue
		case strings.Contains(b, "@") || strings.Contains(b, "://"):
			return nil, usagef("%s: entry %d is not host:port (it holds '@' or '://'): credentials and URLs are not taken here (SASL: --%[3]ssasl, --%[3]ssasl-user, --%[3]ssasl-password-file)", flag, i+1,
				strings.TrimSuffix(strings.TrimPrefix(flag, "--"), "brokers"))
		}
		seeds = append(seeds, b)
	}
	return seeds, nil
}
