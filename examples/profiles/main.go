// Command profiles walks a profile store through its whole migration from
// Postgres to Redis under a short load: off, dualwrite, the copy of the
// existing profiles, shadow, live, rampdown and complete, printing each
// stage's counts.
//
//	go run ./examples/profiles [-keep]
//
// It works in the schema dimmer_profiles_example of DIMMER_POSTGRES_URL and
// under the key prefix dimmer_profiles_example: of DIMMER_REDIS_URL (both
// default to the local servers), and removes both on exit unless -keep.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/dimmer-dev/dimmer/examples/profiles/profilesvc"
	"github.com/dimmer-dev/dimmer/flags"
)

const (
	schema   = "dimmer_profiles_example"
	prefix   = schema + ":"
	profiles = 300
)

func main() {
	keep := flag.Bool("keep", false, "keep the schema "+schema+" and the keys "+prefix+"* on exit")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "profiles:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, keep bool) error {
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	pgURL := os.Getenv("DIMMER_POSTGRES_URL")
	if pgURL == "" {
		pgURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	redisURL := os.Getenv("DIMMER_REDIS_URL")
	if redisURL == "" {
		redisURL = "redis://127.0.0.1:6379/0"
	}
	cfg, err := pgxpool.ParseConfig(pgURL)
	if err != nil {
		return fmt.Errorf("DIMMER_POSTGRES_URL: %w", err)
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	ropts, err := redis.ParseURL(redisURL)
	if err != nil {
		return fmt.Errorf("DIMMER_REDIS_URL: %w", err)
	}
	rdb := redis.NewClient(ropts)
	defer rdb.Close()
	if err := rdb.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("redis: %w", err)
	}
	// A previous run killed half-way leaves its state: start clean.
	if err := cleanup(ctx, pool, rdb); err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		return fmt.Errorf("create schema: %w", err)
	}
	if !keep {
		defer func() {
			c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := cleanup(c, pool, rdb); err != nil {
				fmt.Fprintln(os.Stderr, "profiles: cleanup:", err)
			}
		}()
	}

	svc, err := profilesvc.Open(ctx, profilesvc.Config{Pool: pool, Schema: schema, Redis: rdb, Prefix: prefix,
		Watchdog: flags.WatchdogConfig{Window: 30 * time.Second, MinSamples: 200}, Observer: &seen, Logger: logger})
	if err != nil {
		return err
	}
	defer func() {
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = svc.Close(c)
	}()

	fmt.Printf("profiles: %d profiles, Postgres schema %s -> Redis keys %s*\n", profiles, schema, prefix)
	for i := range profiles {
		id := fmt.Sprintf("user-%03d", i)
		if err := svc.Put(ctx, profilesvc.Profile{ID: id, Name: "User " + id, Email: id + "@example.com", Version: 1}); err != nil {
			return err
		}
	}
	if err := load(ctx, svc, pool, flags.Off); err != nil {
		return err
	}
	for _, st := range []flags.Stage{flags.DualWrite, flags.Shadow, flags.Live, flags.RampDown, flags.Complete} {
		if st == flags.Shadow {
			// Shadow compares every read: Redis must hold the history first.
			res, v, err := svc.CopyAll(ctx)
			if err != nil {
				return fmt.Errorf("copy: %w", err)
			}
			fmt.Printf("%-10s backfilled %d existing profiles to Redis, verified by reading %d back (%d in flight)\n", "", res.Rows, v.RowsTarget, v.InFlight)
		}
		if _, err := svc.Controller.Set(ctx, flags.Request{Migration: profilesvc.Migration, Stage: st, Actor: "profiles-example", Reason: "walkthrough"}); err != nil {
			return err
		}
		for svc.Stage(ctx, "") != st {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
		}
		if err := load(ctx, svc, pool, st); err != nil {
			return err
		}
	}
	fmt.Println("done: Redis serves every profile; the Postgres table can go")
	return nil
}

// counts tallies the comparisons of shadow reads per stage; the service's
// watchdog judges the same observations over its window (and would roll
// the stage back on a lasting-mismatch or Redis error rate over its
// thresholds).
type counts struct {
	mu                           sync.Mutex
	compared, transient, lasting map[flags.Stage]int
}

var seen = counts{compared: map[flags.Stage]int{}, transient: map[flags.Stage]int{}, lasting: map[flags.Stage]int{}}

func (c *counts) Observe(o flags.Observation) {
	if !o.Compared {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.compared[o.Stage]++
	switch {
	case o.Lasting:
		c.lasting[o.Stage]++
	case o.Mismatch:
		c.transient[o.Stage]++
	}
}

func (c *counts) get(st flags.Stage) (compared, transient, lasting int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.compared[st], c.transient[st], c.lasting[st]
}

// load runs a short load (4 workers over random profiles, three reads for
// one read-modify-write, about 800 reads/s) and prints what it saw. A read
// followed at once by a write of the same profile often meets the write on
// the shadow side: a transient mismatch, re-read and cleared. Much faster
// and the shadow pool sheds comparisons rather than slow the callers.
func load(ctx context.Context, svc *profilesvc.Service, pool *pgxpool.Pool, st flags.Stage) error {
	var gets, puts, stale, failed atomic.Int64
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for range 100 {
				time.Sleep(5 * time.Millisecond)
				id := fmt.Sprintf("user-%03d", rand.IntN(profiles))
				p, err := svc.Get(ctx, id)
				gets.Add(1)
				if err != nil {
					failed.Add(1)
					continue
				}
				if rand.IntN(4) != 0 {
					continue // three reads for a write, like most profile stores
				}
				p.Version++
				p.Name = fmt.Sprintf("User %s v%d", id, p.Version)
				err = svc.Put(ctx, p)
				puts.Add(1)
				switch {
				case errors.Is(err, profilesvc.ErrStale):
					stale.Add(1) // a racing worker changed it first
				case err != nil:
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	time.Sleep(300 * time.Millisecond) // the last shadow comparisons and their re-reads
	compared, transient, lasting := seen.get(st)
	rep, err := svc.Repairs.Stats(ctx, pool, "")
	if err != nil {
		return err
	}
	fmt.Printf("%-10s gets %d, puts %d (stale %d), errors %d | compared %d, mismatches transient %d lasting %d | repairs pending %d\n",
		st, gets.Load(), puts.Load(), stale.Load(), failed.Load(), compared, transient, lasting, rep.Pending)
	return nil
}

// cleanup drops the example's schema and deletes its Redis keys.
func cleanup(ctx context.Context, pool *pgxpool.Pool, rdb *redis.Client) error {
	_, err := pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
	iter := rdb.Scan(ctx, 0, prefix+"*", 500).Iterator()
	var keys []string
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
	}
	err = errors.Join(err, iter.Err())
	if len(keys) > 0 {
		err = errors.Join(err, rdb.Del(ctx, keys...).Err())
	}
	return err
}
