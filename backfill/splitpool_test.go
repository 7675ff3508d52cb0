package backfill_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dimmertest"
)

// TestSplitAfterHolderMovedNeedsNoSecondConnection: a stealer's split
// locks the range row, waiting for the holder's chunk in flight; when that
// chunk moved the cursor, the split is placed again by counting what the
// chunk passed, while the row is still locked. The test plays the holder
// (another process) on connections of its own, and gives the stealer a
// pool of one connection, which its split transaction holds: the count
// must run in that transaction. Run through another of the pool's
// connections, it waited for a connection while holding the row the pool's
// other users wait for (the holder's next chunk, the stealers queued on
// the same row), and the job hung once Workers reached the pool's size.
func TestSplitAfterHolderMovedNeedsNoSecondConnection(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount) SELECT g, g FROM generate_series(1, 3000) g`)
	j := ordersJob("resplit")
	j.Config.Workers, j.Config.Ranges = 1, 1
	j.Config.InitialChunk, j.Config.MinChunk, j.Config.MaxChunk = 25, 25, 25

	// Register the job and its one range: a first run copies a chunk and
	// stops, letting its lease go.
	first, stop := context.WithCancel(tctx(t))
	once := j
	once.Config.Progress = func(backfill.Progress) { stop() }
	_, err := e.bf.Run(first, once)
	require.ErrorIs(t, err, context.Canceled)

	// The holder: another process leases the range and holds its lock.
	ctx := tctx(t)
	holder, observer := dimmertest.Conn(t), dimmertest.Conn(t)
	_, err = holder.Exec(ctx, `SELECT pg_advisory_lock(hashtextextended($1, 0))`,
		"dimmer.backfill.range/"+e.schema+"/resplit/0")
	require.NoError(t, err)
	ranges := pgx.Identifier{e.schema, "backfill_ranges"}.Sanitize()
	_, err = holder.Exec(ctx, `UPDATE `+ranges+` SET owner = 'holder', token = token + 1,
	lease_until = clock_timestamp() + interval '1 minute' WHERE job = 'resplit' AND id = 0`)
	require.NoError(t, err)

	// Its chunk in flight holds the range row.
	chunk, err := holder.Begin(ctx)
	require.NoError(t, err)
	defer chunk.Rollback(context.Background())
	_, err = chunk.Exec(ctx, `UPDATE `+ranges+` SET lease_until = clock_timestamp() + interval '1 minute' WHERE job = 'resplit' AND id = 0`)
	require.NoError(t, err)

	// The stealer, on a pool of one connection.
	cfg, err := pgxpool.ParseConfig(dimmertest.PostgresURL())
	require.NoError(t, err)
	cfg.ConnConfig.RuntimeParams["search_path"] = e.schema
	cfg.MaxConns = 1
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	stealer, err := backfill.New(pool, backfill.WithSchema(e.schema), backfill.WithFlagStore(e.store), backfill.WithWorkerID("stealer"))
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	ran := make(chan error, 1)
	go func() { _, err := stealer.Run(runCtx, j); ran <- err }()

	require.Eventually(t, func() bool { return dimmertest.LockWaiting(t, observer, e.schema, "backfill_ranges", "FOR UPDATE") },
		10*time.Second, 5*time.Millisecond, "the split waits for the holder's chunk")
	// The chunk moves the cursor 100 rows on and commits.
	_, err = chunk.Exec(ctx, `UPDATE `+ranges+` SET rows_done = rows_done + 100,
	cursor = ARRAY[(SELECT id FROM `+pgx.Identifier{e.schema, "old_orders"}.Sanitize()+` WHERE id > cursor[1]::bigint ORDER BY id OFFSET 99 LIMIT 1)::text]
WHERE job = 'resplit' AND id = 0`)
	require.NoError(t, err)
	require.NoError(t, chunk.Commit(ctx))

	require.Eventually(t, func() bool {
		var n int
		err := observer.QueryRow(ctx, `SELECT count(*) FROM `+ranges+` WHERE job = 'resplit'`).Scan(&n)
		return err == nil && n == 2
	}, 10*time.Second, 5*time.Millisecond, "the split lands after the holder's chunk")
	cancel()
	if err := <-ran; !errors.Is(err, context.Canceled) {
		require.NoError(t, err)
	}
}
