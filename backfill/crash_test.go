package backfill_test

import (
	"os"
	osexec "os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

const (
	crashSchemaEnv = "DIMMER_BACKFILL_CRASH_SCHEMA"
	// crashLongLeaseEnv gives the child long leases, every range to hold at
	// once: only its dead session frees them early.
	crashLongLeaseEnv = "DIMMER_BACKFILL_CRASH_LONG_LEASE"
)

func longLeaseJob() backfill.Job {
	j := crashJob()
	j.Config.Ranges, j.Config.LeaseTTL = 2, 30*time.Second
	return j
}

func crashJob() backfill.Job {
	j := ordersJob("crash")
	j.Config.InitialChunk, j.Config.MinChunk, j.Config.MaxChunk = 25, 25, 25
	j.Config.Workers, j.Config.Ranges = 2, 4
	j.Config.LeaseTTL = time.Second
	return j
}

// TestCrashChild is the process killed by TestKillDashNineResumesExactlyOnce.
func TestCrashChild(t *testing.T) {
	schema := os.Getenv(crashSchemaEnv)
	if schema == "" {
		t.Skip("run by TestKillDashNineResumesExactlyOnce")
	}
	cfg, err := pgxpool.ParseConfig(dimmertest.PostgresURL())
	require.NoError(t, err)
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	pool, err := pgxpool.NewWithConfig(tctx(t), cfg)
	require.NoError(t, err)
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	bf, err := backfill.New(pool, backfill.WithSchema(schema), backfill.WithFlagStore(store), backfill.WithWorkerID("child"))
	require.NoError(t, err)
	j := crashJob()
	if os.Getenv(crashLongLeaseEnv) != "" {
		j = longLeaseJob()
	}
	j.Config.RowsPerSecond = 2000 // slow enough to be killed mid-run
	_, err = bf.Run(tctx(t), j)
	require.NoError(t, err)
	t.Fatal("the child should have been killed before finishing")
}

// crashEnv holds 3000 orders and logs every row the sink applies: a chunk
// applied twice would log its keys twice (the upsert rewrites rows of an
// equal version).
func crashEnv(t testing.TB) *env {
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount, note) SELECT g, g, 'n' || g FROM generate_series(-1000, 1999) g`)
	logApplies(t, e)
	return e
}

// killChild runs TestCrashChild in a process of its own and kills it -9 once
// it has copied atLeast rows (and, with leased, holds that many ranges), at
// a random moment relative to its transactions. It returns when it killed.
func killChild(t testing.TB, e *env, longLease bool, atLeast int64, leased int) time.Time {
	cmd := osexec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashSchemaEnv+"="+e.schema)
	if longLease {
		cmd.Env = append(cmd.Env, crashLongLeaseEnv+"=1")
	}
	require.NoError(t, cmd.Start())
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		var done int64
		var held int
		err := e.pool.QueryRow(tctx(t), `SELECT coalesce(sum(rows_done), 0)::int8, count(*) FILTER (WHERE NOT done AND lease_until > clock_timestamp())::int
FROM backfill_ranges`).Scan(&done, &held)
		if err == nil && done >= atLeast && held >= leased {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	killed := time.Now()
	err := cmd.Wait()
	require.Error(t, err, "the child was killed, it did not finish")
	assert.Less(t, count(t, e.pool, `SELECT count(*) FROM new_orders`), int64(3000), "killed mid-run")
	return killed
}

// TestKillDashNineRangesRetakenAtOnce: a process killed -9 while it leases
// every range for 30s; the next run retakes them within 2s, because the
// leases died with the killed process's database session.
func TestKillDashNineRangesRetakenAtOnce(t *testing.T) {
	t.Parallel()
	e := crashEnv(t)
	killed := killChild(t, e, true, 300, 2)
	retaken := resumeAfterKill(t, e, killed)
	assert.Less(t, retaken, 2*time.Second, "the dead process's ranges were retaken at once, not after the 30s lease")
	assertExactlyOnce(t, e, 3000)
}

// resumeAfterKill runs the long-lease job to the end in this process and
// returns how long after the kill the last of the ranges the dead process
// held had a chunk copied by this one.
func resumeAfterKill(t testing.TB, e *env, killed time.Time) time.Duration {
	rows, err := e.pool.Query(tctx(t), `SELECT id FROM backfill_ranges WHERE NOT done AND lease_until > clock_timestamp()`)
	require.NoError(t, err)
	dead, err := pgx.CollectRows(rows, pgx.RowTo[int])
	require.NoError(t, err)
	require.NotEmpty(t, dead)
	// As many workers as the dead process held ranges: each retakes one at
	// once, so the measure is the retake, not the copy of a range before.
	j := longLeaseJob()
	j.Config.Workers = len(dead)
	var mu sync.Mutex
	first := map[int]time.Time{}
	j.Config.Progress = func(p backfill.Progress) {
		mu.Lock()
		defer mu.Unlock()
		for _, w := range p.Workers {
			if _, ok := first[w.Range]; !ok && w.Rows > 0 {
				first[w.Range] = time.Now()
			}
		}
	}
	_, err = e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	var last time.Duration
	for _, id := range dead {
		at, ok := first[id]
		require.True(t, ok, "range %d was copied by this run", id)
		last = max(last, at.Sub(killed))
	}
	return last
}

func TestKillDashNineResumesExactlyOnce(t *testing.T) {
	t.Parallel()
	e := crashEnv(t)
	for kill := range 2 {
		killChild(t, e, false, int64(300*(kill+1)), 0)
	}

	// The dead child's leases expire after a second; this process takes the
	// ranges over and finishes from the committed cursors.
	j := crashJob()
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Less(t, res.Rows, int64(3000), "resumed, not restarted")
	assertExactlyOnce(t, e, 3000)
}
