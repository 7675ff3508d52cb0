package shadowread_test

import (
	"context"
	"errors"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
)

var errNotFound = errors.New("not found")

type user struct {
	ID      string
	Name    string
	Version int64
}

type stores struct {
	pg     *pgxpool.Pool
	rdb    *redis.Client
	prefix string
}

func newStores(t testing.TB) *stores {
	t.Helper()
	pool, _ := dimmertest.Schema(t)
	rdb, prefix := dimmertest.Redis(t)
	_, err := pool.Exec(ctx(t), `CREATE TABLE users (id text PRIMARY KEY, name text NOT NULL, version bigint NOT NULL)`)
	require.NoError(t, err)
	return &stores{pg: pool, rdb: rdb, prefix: prefix}
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return c
}

func (s *stores) key(id string) string { return s.prefix + "user:" + id }

// put writes u to both stores (name may differ per side).
func (s *stores) put(t testing.TB, id, oldName, newName string) {
	t.Helper()
	_, err := s.pg.Exec(ctx(t), `INSERT INTO users VALUES ($1, $2, 1) ON CONFLICT (id) DO UPDATE SET name = excluded.name`, id, oldName)
	require.NoError(t, err)
	require.NoError(t, s.rdb.HSet(ctx(t), s.key(id), "name", newName, "version", 1).Err())
}

func (s *stores) readOld(ctx context.Context, id string) (user, error) {
	var u user
	err := s.pg.QueryRow(ctx, `SELECT id, name, version FROM users WHERE id = $1`, id).Scan(&u.ID, &u.Name, &u.Version)
	if errors.Is(err, pgx.ErrNoRows) {
		return user{}, errNotFound
	}
	return u, err
}

func (s *stores) readNew(ctx context.Context, id string) (user, error) {
	m, err := s.rdb.HGetAll(ctx, s.key(id)).Result()
	if err != nil {
		return user{}, err
	}
	if len(m) == 0 {
		return user{}, errNotFound
	}
	v, err := strconv.ParseInt(m["version"], 10, 64)
	if err != nil {
		return user{}, err
	}
	return user{ID: id, Name: m["name"], Version: v}, nil
}

func idKey(id string) string { return id }

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

// observations collects what a reader reports.
type observations chan flags.Observation

func (o observations) Observe(x flags.Observation) { o <- x }

func (o observations) next(t *testing.T) flags.Observation {
	t.Helper()
	select {
	case x := <-o:
		return x
	case <-time.After(10 * time.Second):
		t.Fatal("no observation")
		return flags.Observation{}
	}
}

// nextShadow skips served-side observations.
func (o observations) nextShadow(t *testing.T, served flags.Side) flags.Observation {
	t.Helper()
	for {
		x := o.next(t)
		if x.Side != served {
			return x
		}
	}
}
