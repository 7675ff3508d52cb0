package main

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/outbox"
)

func TestCDCCommands(t *testing.T) {
	t.Parallel()
	url := dimmertest.LogicalDatabase(t)
	pool := dimmertest.Pool(t, url)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	slot := dimmertest.Name("s_")
	require.NoError(t, cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: slot, Purpose: "relay"}))
	dropped := false
	t.Cleanup(func() {
		if !dropped {
			_ = cdc.DropSlot(context.Background(), pool, "", slot, true)
		}
	})
	// WAL written after the slot: retained until a reader confirms it.
	_, err := pool.Exec(ctx, `CREATE TABLE filler AS SELECT i, repeat('x', 200) AS pad FROM generate_series(1, 20000) i`)
	require.NoError(t, err)

	r := dimmer(t, nil, "cdc", "status", "--db", url)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Regexp(t, `SLOT\s+PURPOSE\s+PUBLICATION\s+READER\s+CONFIRMED\s+LAG\s+RETAINED\s+WAL`, r.stdout)
	assert.Regexp(t, slot+`\s+relay\s+`+slot+`\s+-\s+\S+\s+\S+B\s+\S+B\s+(reserved|extended)`, r.stdout)

	assert.NotContains(t, r.stdout, "FENCE")
	_, err = cdc.InstallFence(ctx, pool, cdc.FenceConfig{Migration: "orders_v2"})
	require.NoError(t, err)
	r = dimmer(t, nil, "cdc", "status", "--db", url)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Regexp(t, `FENCE\s+OLD SIDE\s+SINCE\s+orders_v2\s+written\s+\d{4}-`, r.stdout)

	r = dimmer(t, nil, "cdc", "status", "--db", url, "--max-retained", "1024")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, slot+" retains")
	assert.Contains(t, r.stderr, "not connected")

	r = dimmer(t, nil, "cdc", "drop", "no_such_slot", "--db", url)
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "no_such_slot is not registered")

	r = dimmer(t, nil, "cdc", "drop", slot, "--db", url)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, slot+": dropped\n", r.stdout)
	dropped = true
	var n int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&n))
	assert.Zero(t, n)
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM pg_publication WHERE pubname = $1`, slot).Scan(&n))
	assert.Zero(t, n)

	r = dimmer(t, nil, "cdc", "status")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "no database")
}

// `dimmer cdc cutover` against a sync running elsewhere (here: in the test,
// another process in production), under live writes to the old side:
// usage errors, a slot that does not exist, a sync that cannot catch up
// within --max-pause (nothing flipped), then the cutover itself: every
// write acknowledged on the old side is on the new one, the stage is
// complete, the fence cut, the pause printed, the password never.
func TestCDCCutoverCommand(t *testing.T) {
	t.Parallel()
	url := dimmertest.LogicalDatabase(t)
	pool := dimmertest.Pool(t, url)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The new side is another database, as the sync's own writes would
	// otherwise be log the slot has to read past too.
	neu := dimmertest.Pool(t, dimmertest.LogicalDatabase(t))
	_, err := pool.Exec(ctx, `CREATE TABLE acct (id bigint PRIMARY KEY, v bigint NOT NULL)`)
	require.NoError(t, err)
	_, err = neu.Exec(ctx, `CREATE TABLE acct_v2 (id bigint PRIMARY KEY, v bigint NOT NULL)`)
	require.NoError(t, err)
	mig := dimmertest.Name("mig_")
	store, err := pgflags.NewStore(dimmertest.Pool(t, url))
	require.NoError(t, err)
	require.NoError(t, store.Install(ctx))
	flagstest.Set(t, store, mig, flags.RampDown, nil)
	fence, err := cdc.InstallFence(ctx, pool, cdc.FenceConfig{Migration: mig, MaxWait: 3 * time.Second})
	require.NoError(t, err)

	slot := mig + "_sync"
	s, err := cdc.NewSync(url, neu, cdc.SyncConfig{Name: slot, Source: backfill.Table{Name: "acct"}, Target: backfill.Table{Name: "acct_v2"},
		VersionColumn: "v", Logger: slog.New(slog.DiscardHandler)})
	require.NoError(t, err)
	runCtx, stopSync := context.WithCancel(context.Background())
	synced := make(chan error, 1)
	go func() { synced <- s.Run(runCtx) }()
	t.Cleanup(func() {
		stopSync()
		<-synced
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		require.NoError(t, cdc.DropSlot(c, pool, "", slot, true))
	})
	require.Eventually(t, s.Streaming, time.Minute, 5*time.Millisecond)

	// Writers of the old side, fenced; once cut over they write new.
	var mu sync.Mutex
	acked := map[int64]bool{} // ids acknowledged on old
	var toNew atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 3 {
		wg.Go(func() {
			cut := false
			for i := int64(w) * 1_000_000; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if cut {
					_, err := neu.Exec(ctx, `INSERT INTO acct_v2 VALUES ($1, 1)`, i)
					assert.NoError(t, err)
					toNew.Add(1)
					continue
				}
				err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
					if err := fence.Enter(ctx, tx); err != nil {
						return err
					}
					_, err := tx.Exec(ctx, `INSERT INTO acct VALUES ($1, 1)`, i)
					return err
				})
				switch {
				case err == nil:
					mu.Lock()
					acked[i] = true
					mu.Unlock()
				case errors.Is(err, cdc.ErrCutOver):
					cut = true
					i--
				default:
					assert.NoError(t, err)
					return
				}
			}
		})
	}
	defer func() { close(stop); wg.Wait() }()
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(acked) }
	require.Eventually(t, func() bool { return count() >= 100 }, time.Minute, 5*time.Millisecond)

	store0 := []string{"--store", url}
	r := dimmer(t, store0, "cdc", "cutover", mig, "--db", url, "--reason", "cutover")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "--slot is required")
	r = dimmer(t, store0, "cdc", "cutover", mig, "--db", url, "--slot", slot)
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "--reason is required")
	r = dimmer(t, store0, "cdc", "cutover", mig, "--db", url, "--slot", slot, "--reason", "x", "--stage", "live")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "--stage live still writes the old side")
	r = dimmer(t, store0, "cdc", "cutover", "no_fence_here", "--db", url, "--slot", slot, "--reason", "x")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "no fence for the migration: no_fence_here")
	r = dimmer(t, store0, "cdc", "cutover", mig, "--db", url, "--slot", "no_such_slot", "--reason", "x")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "no_such_slot is not registered")

	// The controller's guards judge the step first: with no instance
	// acknowledging the stage and no repair log, it is refused (exit 3)
	// and nothing is held.
	r = dimmer(t, store0, "cdc", "cutover", mig, "--db", url, "--slot", slot, "--reason", "x")
	assert.Equal(t, exitRefused, r.code, r.stderr)
	assert.Contains(t, r.stderr, "fleet-acknowledged")
	assert.Contains(t, r.stderr, "nothing flipped: "+mig+" is still rampdown")
	st, err := store.Load(ctx, mig)
	require.NoError(t, err)
	require.NoError(t, store.Heartbeat(ctx, flags.Instance{ID: "billing-1", Build: "v1", Applied: map[string]int64{mig: st.Revision}, SeenAt: time.Now()}, time.Minute))
	ob, err := outbox.New(outbox.Config{})
	require.NoError(t, err)
	require.NoError(t, ob.Install(ctx, pool))

	// A large transaction just committed: the sync cannot apply it within
	// --wait, so nothing is held or flipped and writers go on; nor can
	// a sync reach lag 0 under writes within a pause of 1ms.
	_, err = pool.Exec(ctx, `INSERT INTO acct SELECT 900000000 + i, 1 FROM generate_series(1, 50000) i`)
	require.NoError(t, err)
	r = dimmer(t, store0, "cdc", "cutover", mig, "--db", url, "--slot", slot, "--reason", "too soon", "--wait", "50ms")
	assert.Equal(t, exitError, r.code, r.stderr)
	assert.Contains(t, r.stderr, "slot "+slot+" did not catch up within --wait 50ms (nothing held, nothing flipped")
	require.NoError(t, s.CaughtUp(ctx, pool))
	r = dimmer(t, store0, "cdc", "cutover", mig, "--db", url, "--slot", slot, "--reason", "too soon", "--max-pause", "1ms")
	assert.Equal(t, exitError, r.code, r.stderr)
	assert.Contains(t, r.stderr, "deadline exceeded")
	assert.Contains(t, r.stderr, "nothing flipped: "+mig+" is still rampdown")
	st, err = store.Load(ctx, mig)
	require.NoError(t, err)
	assert.Equal(t, flags.RampDown, st.Stage)
	cut, err := fence.Cut(ctx)
	require.NoError(t, err)
	assert.False(t, cut)
	from := count()
	require.Eventually(t, func() bool { return count() >= from+100 }, time.Minute, 5*time.Millisecond)
	require.NoError(t, s.CaughtUp(ctx, pool))

	// The cutover, under the writes; a password in the URL is not printed.
	secret := strings.Replace(url, "postgres@", "postgres:s3cret-pw@", 1)
	require.NotEqual(t, url, secret)
	r = dimmer(t, []string{"--store", secret}, "cdc", "cutover", mig, "--db", secret, "--slot", slot, "--reason", "orders_v2 cutover")
	t.Log(strings.TrimSpace(r.stdout))
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Regexp(t, `^`+mig+`: complete \(revision \d+\)\nwrites to the old side held [0-9.]+[µm]?s \(drain \S+, catch-up \S+, flip \S+\); the fence is cut\n$`, r.stdout)
	assert.NotContains(t, r.stdout+r.stderr, "s3cret")
	st, err = store.Load(ctx, mig)
	require.NoError(t, err)
	assert.Equal(t, flags.Complete, st.Stage)
	cut, err = fence.Cut(ctx)
	require.NoError(t, err)
	assert.True(t, cut)
	require.Eventually(t, func() bool { return toNew.Load() >= 50 }, time.Minute, 5*time.Millisecond)
	close(stop)
	wg.Wait()
	stop = make(chan struct{})

	// Every write acknowledged on old reached the new side.
	require.NoError(t, s.CaughtUp(ctx, pool))
	var missing int
	mu.Lock()
	ids := make([]int64, 0, len(acked))
	for id := range acked {
		ids = append(ids, id)
	}
	mu.Unlock()
	require.NoError(t, neu.QueryRow(ctx, `SELECT count(*) FROM unnest($1::int8[]) id WHERE NOT EXISTS (SELECT 1 FROM acct_v2 n WHERE n.id = id)`, ids).Scan(&missing))
	assert.Zero(t, missing, "writes acknowledged on old missing from new")

	r = dimmer(t, store0, "cdc", "cutover", mig, "--db", url, "--slot", slot, "--reason", "again")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "already stopped writing the old side")
}
