package dualwrite_test

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
)

// account is the entity migrated from a Postgres table (old) to Redis
// hashes (new).
type account struct {
	ID      string
	Name    string
	Version int64
}

// stores is one test's pair of real stores.
type stores struct {
	pg     *pgxpool.Pool
	rdb    *redis.Client
	prefix string
}

func newStores(t *testing.T) *stores {
	t.Helper()
	pool, _ := dimmertest.Schema(t)
	rdb, prefix := dimmertest.Redis(t)
	_, err := pool.Exec(ctx(t), `CREATE TABLE accounts (
		id text PRIMARY KEY,
		name text NOT NULL CHECK (name <> 'reject'),
		version bigint NOT NULL)`)
	require.NoError(t, err)
	return &stores{pg: pool, rdb: rdb, prefix: prefix}
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// writeOld upserts into Postgres, newer version wins. A name of "reject"
// violates the table's CHECK constraint: a real store error.
func (s *stores) writeOld(ctx context.Context, a account) (int64, error) {
	q := `INSERT INTO accounts (id, name, version) VALUES ($1, $2, $3)
		ON CONFLICT (id) DO UPDATE SET name = excluded.name, version = excluded.version
		WHERE accounts.version <= excluded.version`
	if tx, ok := dualwrite.TxFrom(ctx); ok {
		tag, err := tx.Exec(ctx, q, a.ID, a.Name, a.Version)
		return tag.RowsAffected(), err
	}
	tag, err := s.pg.Exec(ctx, q, a.ID, a.Name, a.Version)
	return tag.RowsAffected(), err
}

func (s *stores) key(id string) string { return s.prefix + "account:" + id }

// writeNew stores the account as a Redis hash. A key holding another type
// makes HSET fail with WRONGTYPE: a real store error.
func (s *stores) writeNew(ctx context.Context, a account) (int64, error) {
	err := s.rdb.HSet(ctx, s.key(a.ID), "name", a.Name, "version", a.Version).Err()
	if err != nil {
		return 0, err
	}
	return 1, nil
}

// poison makes every Redis write of id fail.
func (s *stores) poison(t *testing.T, id string) {
	require.NoError(t, s.rdb.Del(ctx(t), s.key(id)).Err())
	require.NoError(t, s.rdb.RPush(ctx(t), s.key(id), "x").Err())
}

func (s *stores) readOld(t *testing.T, id string) (account, bool) {
	a, ok, err := s.loadOld(ctx(t), id)
	require.NoError(t, err)
	return a, ok
}

func (s *stores) loadOld(ctx context.Context, id string) (account, bool, error) {
	var a account
	err := s.pg.QueryRow(ctx, `SELECT id, name, version FROM accounts WHERE id = $1`, id).Scan(&a.ID, &a.Name, &a.Version)
	if errors.Is(err, pgx.ErrNoRows) {
		return account{}, false, nil
	}
	return a, err == nil, err
}

func (s *stores) loadNew(ctx context.Context, id string) (account, bool, error) {
	m, err := s.rdb.HGetAll(ctx, s.key(id)).Result()
	if err != nil || len(m) == 0 {
		return account{}, false, err
	}
	v, err := strconv.ParseInt(m["version"], 10, 64)
	if err != nil {
		return account{}, false, err
	}
	return account{ID: id, Name: m["name"], Version: v}, true, nil
}

func (s *stores) readNew(t *testing.T, id string) (account, bool) {
	a, ok, err := s.loadNew(ctx(t), id)
	require.NoError(t, err)
	return a, ok
}

// constStage is a stage source the test moves by hand.
type constStage struct{ v atomic.Uint32 }

func stageOf(s flags.Stage) *constStage {
	c := &constStage{}
	c.v.Store(uint32(s))
	return c
}

func (c *constStage) set(s flags.Stage) { c.v.Store(uint32(s)) }

func (c *constStage) Stage(context.Context, string, string) (flags.Stage, error) {
	return flags.Stage(c.v.Load()), nil
}

// repairs collects recorded repairs in memory: the durable log is the
// outbox (see the outbox adapter test); here the test only needs to see
// what the writer recorded.
type repairs struct {
	mu   sync.Mutex
	list []dualwrite.Repair
	ch   chan dualwrite.Repair
}

func newRepairs() *repairs { return &repairs{ch: make(chan dualwrite.Repair, 1024)} }

func (r *repairs) Record(_ context.Context, rep dualwrite.Repair) error {
	r.mu.Lock()
	r.list = append(r.list, rep)
	r.mu.Unlock()
	r.ch <- rep
	return nil
}

func (r *repairs) all() []dualwrite.Repair {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]dualwrite.Repair(nil), r.list...)
}

func (r *repairs) next(t *testing.T) dualwrite.Repair {
	t.Helper()
	select {
	case rep := <-r.ch:
		return rep
	case <-time.After(10 * time.Second):
		t.Fatal("no repair was recorded")
		return dualwrite.Repair{}
	}
}

func accountKey(a account) string { return a.ID }

func newWriter(t *testing.T, s *stores, src dualwrite.StageSource, log dualwrite.RepairLog, opts ...dualwrite.Option) *dualwrite.Writer[account, int64] {
	t.Helper()
	opts = append([]dualwrite.Option{dualwrite.WithRepairLog(log)}, opts...)
	w, err := dualwrite.New("accounts_to_redis", src, s.writeOld, s.writeNew, accountKey, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, w.Shutdown(context.Background())) })
	return w
}
