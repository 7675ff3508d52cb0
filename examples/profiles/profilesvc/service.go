package profilesvc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/open-feature/go-sdk/openfeature"
	"github.com/open-feature/go-sdk/openfeature/isolated"
	"github.com/redis/go-redis/v9"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/chaos"
	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/shadowread"
)

// Migration is the stage flag's name.
const Migration = "profiles-to-redis"

// Profile is what the store keeps per id. Version grows by one per change.
type Profile struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	Email   string `json:"email"`
	Version int64  `json:"version"`
}

var (
	// ErrStale: the authoritative store already holds this version of the
	// profile or a newer one; re-read and retry.
	ErrStale = errors.New("profilesvc: stale write")
	// ErrNotFound: no profile with that id.
	ErrNotFound = errors.New("profilesvc: profile not found")
)

// Config is one service instance's configuration.
type Config struct {
	// Pool's search_path is Schema: the profiles table, the flag store and
	// the repair outbox live there.
	Pool   *pgxpool.Pool
	Schema string
	// Redis holds the new side under keys Prefix + "profile:" + id.
	Redis  *redis.Client
	Prefix string
	// Watchdog thresholds; the watchdog rolls back through a controller
	// over the same flag store.
	Watchdog flags.WatchdogConfig
	// NewFaults, when set, is put in front of every Redis call (writes,
	// reads, repairs): a test's or a demo's fault on the new store.
	NewFaults *chaos.Injector
	// Observer also receives every observation (counters, tests).
	Observer flags.Observer
	Logger   *slog.Logger
}

// Service is one running instance of the profile store.
type Service struct {
	cfg        Config
	Flags      *pgflags.Store
	Controller *flags.Controller
	Repairs    *outbox.Outbox
	// Backfill copies and verifies the history (its tables in Schema); its
	// verified guard stands before shadow.
	Backfill *backfill.Backfiller

	api      *openfeature.EvaluationAPI
	provider *pgflags.Provider
	source   *flags.Source
	watchdog *flags.Watchdog
	writer   *dualwrite.Writer[Profile, bool]
	reader   *shadowread.Reader[string, Profile]
	relay    *outbox.Relay

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// setScript writes the profile hash unless the stored version is newer
// (ARGV[3] = "1") or newer or equal (otherwise); one round trip, atomic.
var setScript = redis.NewScript(`
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local v = tonumber(ARGV[1])
if cur > v or (cur == v and ARGV[3] ~= '1') then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'data', ARGV[2])
return 1`)

// Open installs the table and dimmer's stores (idempotent) and starts the
// flag provider, the watchdog and the repair relay. Close stops them.
func Open(ctx context.Context, cfg Config) (*Service, error) {
	switch {
	case cfg.Pool == nil:
		return nil, errors.New("profilesvc: Config.Pool is required")
	case cfg.Schema == "":
		return nil, errors.New("profilesvc: Config.Schema is required")
	case cfg.Redis == nil:
		return nil, errors.New("profilesvc: Config.Redis is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Service{cfg: cfg}
	ok := false
	defer func() {
		if !ok {
			_ = s.Close(context.Background())
		}
	}()
	var err error
	if s.Flags, err = pgflags.NewStore(cfg.Pool, pgflags.WithSchema(cfg.Schema)); err != nil {
		return nil, err
	}
	if s.Repairs, err = outbox.New(outbox.Config{Schema: cfg.Schema, Table: "profile_repairs"}); err != nil {
		return nil, err
	}
	_, err = cfg.Pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS profiles (
	id text PRIMARY KEY, name text NOT NULL, email text NOT NULL, version bigint NOT NULL)`)
	if err = errors.Join(err, s.Flags.Install(ctx), s.Repairs.Install(ctx, cfg.Pool)); err != nil {
		return nil, err
	}
	if s.Backfill, err = backfill.New(cfg.Pool, backfill.WithSchema(cfg.Schema), backfill.WithFlagStore(s.Flags), backfill.WithLogger(cfg.Logger)); err != nil {
		return nil, err
	}
	if err := s.Backfill.Install(ctx); err != nil {
		return nil, err
	}
	// Shadow compares every read: Redis must hold the verified history.
	// Complete stops writing Postgres: a key with a pending repair would
	// keep its difference for good.
	s.Controller, err = flags.NewController(s.Flags, flags.WithGuards(s.Backfill.Guard(), dualwrite.NoPendingRepairsGuard(s.Repairs, cfg.Pool)),
		flags.WithControllerLogger(cfg.Logger))
	if err != nil {
		return nil, err
	}
	// The flag exists from the start, at off: a key whose stage cannot be
	// evaluated is written as if both sides might need it (a repair each).
	if cur, err := s.Flags.Load(ctx, Migration); err != nil {
		return nil, err
	} else if cur.Revision == 0 {
		if _, err := s.Controller.Set(ctx, flags.Request{Migration: Migration, Stage: flags.Off, Actor: "profilesvc", Reason: "install"}); err != nil && !errors.Is(err, flags.ErrConflict) {
			return nil, err
		}
	}
	s.provider, err = pgflags.NewProvider(cfg.Pool, pgflags.WithSchema(cfg.Schema), pgflags.WithResyncInterval(2*time.Second), pgflags.WithLogger(cfg.Logger))
	if err != nil {
		return nil, err
	}
	s.api = isolated.NewAPI()
	if err := s.api.SetProviderAndWait(ctx, s.provider); err != nil {
		return nil, err
	}
	if s.source, err = flags.NewSource(s.api.NewClient(), flags.Off, flags.WithSourceLogger(cfg.Logger)); err != nil {
		return nil, err
	}
	for {
		if _, err := s.source.Stage(ctx, Migration, ""); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("profilesvc: stage flag %s unavailable: %w", Migration, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	if s.watchdog, err = flags.NewWatchdog(s.Controller, cfg.Watchdog, flags.WithWatchdogLogger(cfg.Logger), flags.WithStates(s.provider.Snapshot)); err != nil {
		return nil, err
	}
	obs := tee{s.watchdog, cfg.Observer}

	faulty := func(ctx context.Context, side flags.Side) error {
		if side == flags.New && cfg.NewFaults != nil {
			return cfg.NewFaults.Before(ctx)
		}
		return nil
	}
	write := func(side flags.Side) dualwrite.Func[Profile, bool] {
		return func(ctx context.Context, p Profile) (bool, error) {
			if err := faulty(ctx, side); err != nil {
				return false, err
			}
			return s.store(ctx, side, p, false)
		}
	}
	read := func(side flags.Side) shadowread.Func[string, Profile] {
		return func(ctx context.Context, id string) (Profile, error) {
			if err := faulty(ctx, side); err != nil {
				return Profile{}, err
			}
			p, _, err := s.load(ctx, side, id)
			return p, err
		}
	}
	repairLog, err := dualwrite.NewOutboxRepairLog(s.Repairs, cfg.Pool, dualwrite.RepairTopic(Migration))
	if err != nil {
		return nil, err
	}
	// Sync secondary writes: when Put returns, both stores hold the write
	// or a repair is recorded.
	s.writer, err = dualwrite.New(Migration, s.source, write(flags.Old), write(flags.New), func(p Profile) string { return p.ID },
		dualwrite.WithSync(), dualwrite.WithRepairLog(repairLog), dualwrite.WithObserver(obs),
		dualwrite.WithSecondaryTimeout(500*time.Millisecond), dualwrite.WithLogger(cfg.Logger))
	if err != nil {
		return nil, err
	}
	s.reader, err = shadowread.New(Migration, s.source, read(flags.Old), read(flags.New), func(id string) string { return id },
		shadowread.WithObserver(obs), shadowread.WithShadowTimeout(time.Second), shadowread.WithRecheck(100*time.Millisecond),
		shadowread.WithLogger(cfg.Logger), shadowread.WithComparator(shadowread.DeepCompare[Profile]()))
	if err != nil {
		return nil, err
	}
	// A repair re-reads the authoritative side and stores it on the other,
	// over an equal version too (the sides may differ at one version only
	// through a lost write, which is what a repair is for).
	repairer, err := dualwrite.NewRepairer(Migration, s.source,
		func(ctx context.Context, side flags.Side, id string) (Profile, bool, error) {
			if err := faulty(ctx, side); err != nil {
				return Profile{}, false, err
			}
			return s.load(ctx, side, id)
		},
		func(ctx context.Context, side flags.Side, _ string, p Profile) error {
			if err := faulty(ctx, side); err != nil {
				return err
			}
			_, err := s.store(ctx, side, p, true)
			return err
		}, dualwrite.WithRepairerLogger(cfg.Logger))
	if err != nil {
		return nil, err
	}
	s.relay, err = dualwrite.NewRepairRelay(s.Repairs, cfg.Pool, outbox.RelayConfig{ID: "profiles-repairs", PollInterval: 100 * time.Millisecond,
		LeaseTTL: 3 * time.Second, MaxAttempts: 50, BackoffMin: 50 * time.Millisecond, BackoffMax: 500 * time.Millisecond, Logger: cfg.Logger}, repairer)
	if err != nil {
		return nil, err
	}
	s.watchdog.Start()
	var runCtx context.Context
	runCtx, s.cancel = context.WithCancel(context.Background())
	s.wg.Go(func() { _ = s.relay.Run(runCtx) })
	ok = true
	return s, nil
}

// Get returns the profile id from the side the stage serves; in shadow and
// live the other side is read too and compared, out of the caller's way.
func (s *Service) Get(ctx context.Context, id string) (Profile, error) {
	if id == "" {
		return Profile{}, errors.New("profilesvc: Get: id is required")
	}
	p, err := s.reader.Read(ctx, id)
	if err != nil {
		return Profile{}, err
	}
	if p.ID == "" {
		return Profile{}, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	return p, nil
}

// Put stores p, whose Version is the one it creates (1 for a new profile,
// the read version + 1 for a change), on the side(s) the stage writes. The
// authoritative side's answer is the caller's; a failed secondary write is
// a repair, never an error here.
func (s *Service) Put(ctx context.Context, p Profile) error {
	switch {
	case p.ID == "":
		return errors.New("profilesvc: Put: Profile.ID is required")
	case p.Version < 1:
		return fmt.Errorf("profilesvc: Put: Profile.Version must be at least 1, got %d", p.Version)
	}
	applied, err := s.writer.Write(ctx, p)
	if err != nil {
		return err
	}
	if !applied {
		return fmt.Errorf("%w: %q version %d", ErrStale, p.ID, p.Version)
	}
	return nil
}

// HistoryJob is the backfill copying the Postgres profiles to Redis in the
// service's own layout (a version field and the profile as JSON, as Put
// writes it), never over an equal or newer version.
func (s *Service) HistoryJob() (backfill.Job, error) {
	sink, err := backfill.NewRedisSink(s.cfg.Redis, "profile:{id}", func(r backfill.Row) string {
		return s.Key(backfill.RedisValue(r["id"]))
	}, backfill.RedisFields("data"))
	if err != nil {
		return backfill.Job{}, err
	}
	return backfill.Job{Name: "profiles-history", Migration: Migration,
		Spec: backfill.Spec{Source: backfill.Table{Schema: s.cfg.Schema, Name: "profiles"}, Key: []string{"id"},
			VersionColumn: "version", TransformVersion: "profile-json-1"},
		Transform: func(_ context.Context, r backfill.Row) (backfill.Row, error) {
			p := Profile{Version: r["version"].(int64)}
			p.ID, _ = r["id"].(string)
			p.Name, _ = r["name"].(string)
			p.Email, _ = r["email"].(string)
			data, err := json.Marshal(p)
			if err != nil {
				return nil, err
			}
			return backfill.Row{"id": p.ID, "version": p.Version, "data": string(data)}, nil
		},
		Sink: sink,
	}, nil
}

// CopyAll backfills the Postgres profiles to Redis (the history, before
// shadow) and verifies Redis against Postgres by reading it back, which
// the guard before shadow requires.
func (s *Service) CopyAll(ctx context.Context) (backfill.Result, backfill.Verification, error) {
	j, err := s.HistoryJob()
	if err != nil {
		return backfill.Result{}, backfill.Verification{}, err
	}
	res, err := s.Backfill.Run(ctx, j)
	if err != nil {
		return res, backfill.Verification{}, err
	}
	v, err := s.Backfill.Verify(ctx, j, backfill.VerifyOptions{Repair: true})
	if err == nil && !v.OK {
		err = fmt.Errorf("profilesvc: Redis differs from Postgres after the backfill: %v", v.Problems)
	}
	return res, v, err
}

// Stage is the stage this instance evaluates for id.
func (s *Service) Stage(ctx context.Context, id string) flags.Stage {
	st, _ := s.source.Stage(ctx, Migration, id)
	return st
}

// Health is the watchdog's current window for stage.
func (s *Service) Health(stage flags.Stage) flags.Health { return s.watchdog.Health(Migration, stage) }

// Key is the Redis key of profile id.
func (s *Service) Key(id string) string { return s.cfg.Prefix + "profile:" + id }

// Close stops the relay, the writer, the reader, the watchdog and the flag
// provider.
func (s *Service) Close(ctx context.Context) error {
	var errs []error
	if s.cancel != nil {
		errs = append(errs, s.relay.Shutdown(ctx))
		s.cancel()
		s.wg.Wait()
	}
	if s.writer != nil {
		errs = append(errs, s.writer.Shutdown(ctx))
	}
	if s.reader != nil {
		errs = append(errs, s.reader.Shutdown(ctx))
	}
	if s.watchdog != nil {
		errs = append(errs, s.watchdog.Close(ctx))
	}
	if s.api != nil {
		errs = append(errs, s.api.Shutdown(ctx))
	}
	return errors.Join(errs...)
}

// store writes p to side unless that side holds a newer version (or an
// equal one, unless orEqual), reporting whether it wrote.
func (s *Service) store(ctx context.Context, side flags.Side, p Profile, orEqual bool) (bool, error) {
	if side == flags.Old {
		cmp := "<"
		if orEqual {
			cmp = "<="
		}
		var applied bool
		err := s.cfg.Pool.QueryRow(ctx, `INSERT INTO profiles (id, name, email, version) VALUES ($1, $2, $3, $4)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email, version = excluded.version
WHERE profiles.version `+cmp+` excluded.version RETURNING true`, p.ID, p.Name, p.Email, p.Version).Scan(&applied)
		if errors.Is(err, pgx.ErrNoRows) {
			return false, nil
		}
		return applied, err
	}
	data, err := json.Marshal(p)
	if err != nil {
		return false, err
	}
	eq := "0"
	if orEqual {
		eq = "1"
	}
	n, err := setScript.Run(ctx, s.cfg.Redis, []string{s.Key(p.ID)}, p.Version, data, eq).Int()
	return n == 1, err
}

// load reads profile id from side.
func (s *Service) load(ctx context.Context, side flags.Side, id string) (Profile, bool, error) {
	var p Profile
	if side == flags.Old {
		err := s.cfg.Pool.QueryRow(ctx, `SELECT id, name, email, version FROM profiles WHERE id = $1`, id).Scan(&p.ID, &p.Name, &p.Email, &p.Version)
		if errors.Is(err, pgx.ErrNoRows) {
			return Profile{}, false, nil
		}
		return p, err == nil, err
	}
	data, err := s.cfg.Redis.HGet(ctx, s.Key(id), "data").Bytes()
	if errors.Is(err, redis.Nil) {
		return Profile{}, false, nil
	}
	if err != nil {
		return Profile{}, false, err
	}
	if err := json.Unmarshal(data, &p); err != nil {
		return Profile{}, false, fmt.Errorf("profilesvc: redis %s: %w", s.Key(id), err)
	}
	return p, true, nil
}

type tee []flags.Observer

func (t tee) Observe(o flags.Observation) {
	for _, x := range t {
		if x != nil {
			x.Observe(o)
		}
	}
}
