package cdc_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
)

// inProgressSync starts a sync of items into items_copy (same database)
// that applies transactions while they run, streamed past 64kB.
func inProgressSync(t *testing.T, maxStreams int) (srcURL string, src *pgxpool.Pool, name string, s *cdc.Sync, done <-chan struct{}, runErr *error) {
	srcURL, src = logicalDB(t)
	ctx := tctx(t, time.Minute)
	for _, tb := range []string{"items", "items_copy"} {
		_, err := src.Exec(ctx, fmt.Sprintf(syncTable, tb))
		require.NoError(t, err)
	}
	// big is stored out of line (TOAST), so updates that leave it alone
	// send it as "unchanged".
	_, err := src.Exec(ctx, `INSERT INTO items SELECT i, 1, 'n' || i, (SELECT string_agg(md5(i::text || j::text), '') FROM generate_series(1, 300) j) FROM generate_series(1, 500) i`)
	require.NoError(t, err)
	name = dimmertest.Name("sync_")
	s, done, runErr = runSync(t, srcURL, src, src, cdc.SyncConfig{Name: name, Source: backfill.Table{Name: "items"},
		Target: backfill.Table{Name: "items_copy"}, VersionColumn: "v", BatchSize: 500, Logger: quiet(t),
		StreamInProgress: true, StreamWorkMem: "64kB", MaxStreams: maxStreams})
	require.Eventually(t, func() bool {
		select {
		case <-done:
			t.Fatalf("sync ended: %v", *runErr)
		default:
		}
		return s.Streaming()
	}, time.Minute, 10*time.Millisecond)
	waitSame(t, src, src, "items", "items_copy")
	return srcURL, src, name, s, done, runErr
}

// streamedTxns is how many transactions the server streamed in progress
// through the slot (pg_stat_replication_slots).
func streamedTxns(t *testing.T, src *pgxpool.Pool, slot string) int64 {
	var n int64
	require.NoError(t, src.QueryRow(tctx(t, 10*time.Second), `SELECT coalesce((SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1), 0)`, slot).Scan(&n))
	return n
}

// waitApplying waits until n source transactions in progress are being
// applied: n target transactions, open, have written items_copy.
func waitApplying(t *testing.T, src *pgxpool.Pool, n int) {
	require.Eventually(t, func() bool {
		var open int
		err := src.QueryRow(tctx(t, 10*time.Second), `SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.relation = 'items_copy'::regclass AND l.mode = 'RowExclusiveLock' AND a.state = 'idle in transaction' AND l.pid <> pg_backend_pid()`).Scan(&open)
		return err == nil && open >= n
	}, 30*time.Second, 10*time.Millisecond, "no transaction in progress was applied while it ran")
}

func txExec(t *testing.T, tx pgx.Tx, sql string, args ...any) {
	t.Helper()
	_, err := tx.Exec(tctx(t, time.Minute), sql, args...)
	require.NoError(t, err, sql)
}

// A large transaction applied while it runs, with savepoints: the
// subtransactions it rolled back (after their changes were streamed) are
// rolled back on the target too, nested ones with them; key changes,
// updates leaving a TOASTed value unchanged, deletes and a truncate inside
// the transaction keep working.
func TestSyncInProgressSavepoints(t *testing.T) {
	t.Parallel()
	_, src, name, _, _, _ := inProgressSync(t, 0)
	ctx := tctx(t, 2*time.Minute)
	tx, err := src.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(context.WithoutCancel(ctx))
	txExec(t, tx, `INSERT INTO items SELECT i, 1, 'top' || i, 'small' FROM generate_series(1001, 4000) i`)
	txExec(t, tx, `SAVEPOINT a`)
	txExec(t, tx, `INSERT INTO items SELECT i, 1, 'a' || i, 'small' FROM generate_series(4001, 7000) i`)
	txExec(t, tx, `SAVEPOINT b`) // nested in a, rolled back alone
	txExec(t, tx, `UPDATE items SET v = v + 1, name = 'b' WHERE id BETWEEN 1 AND 3000`)
	txExec(t, tx, `DELETE FROM items WHERE id BETWEEN 1 AND 100`)
	txExec(t, tx, `ROLLBACK TO SAVEPOINT b`)
	txExec(t, tx, `RELEASE SAVEPOINT a`)
	waitApplying(t, src, 1)
	txExec(t, tx, `SAVEPOINT c`) // rolled back with a nested, released d
	txExec(t, tx, `INSERT INTO items SELECT i, 1, 'c' || i, 'small' FROM generate_series(7001, 10000) i`)
	txExec(t, tx, `SAVEPOINT d`)
	txExec(t, tx, `UPDATE items SET v = v + 1, name = 'd' WHERE id BETWEEN 1001 AND 5000`)
	txExec(t, tx, `RELEASE SAVEPOINT d`)
	txExec(t, tx, `UPDATE items SET v = v + 1, name = 'c2' WHERE id BETWEEN 4001 AND 4500`)
	txExec(t, tx, `ROLLBACK TO SAVEPOINT c`)
	txExec(t, tx, `SAVEPOINT e`) // kept: a TOAST-unchanged update, a key change, deletes
	txExec(t, tx, `UPDATE items SET v = v + 1, name = 'e' WHERE id BETWEEN 1 AND 400`)
	txExec(t, tx, `UPDATE items SET id = id + 100000, v = v + 1 WHERE id BETWEEN 401 AND 450`)
	txExec(t, tx, `DELETE FROM items WHERE id BETWEEN 3001 AND 3500`)
	txExec(t, tx, `RELEASE SAVEPOINT e`)
	txExec(t, tx, `INSERT INTO items SELECT i, 1, 'tail' || i, 'small' FROM generate_series(20001, 23000) i`)
	require.NoError(t, tx.Commit(ctx))
	waitSame(t, src, src, "items", "items_copy")

	// A truncate inside a streamed transaction, then new rows.
	tx, err = src.Begin(ctx)
	require.NoError(t, err)
	txExec(t, tx, `TRUNCATE items`)
	txExec(t, tx, `INSERT INTO items SELECT i, 1, 'after' || i, 'small' FROM generate_series(1, 5000) i`)
	require.NoError(t, tx.Commit(ctx))
	waitSame(t, src, src, "items", "items_copy")
	require.GreaterOrEqual(t, streamedTxns(t, src, name), int64(2))
}

// A large source transaction that rolls back after being streamed leaves
// the target as it was.
func TestSyncInProgressSourceRollback(t *testing.T) {
	t.Parallel()
	_, src, _, _, _, _ := inProgressSync(t, 0)
	ctx := tctx(t, 2*time.Minute)
	before := dump(t, src, "items_copy")
	tx, err := src.Begin(ctx)
	require.NoError(t, err)
	txExec(t, tx, `INSERT INTO items SELECT i, 1, 'x' || i, 'small' FROM generate_series(1001, 8000) i`)
	txExec(t, tx, `UPDATE items SET v = v + 1, name = 'gone' WHERE id <= 500`)
	txExec(t, tx, `DELETE FROM items WHERE id <= 100`)
	waitApplying(t, src, 1)
	require.NoError(t, tx.Rollback(ctx))
	// A committed change after it: once it is applied, the abort was too.
	_, err = src.Exec(ctx, `UPDATE items SET v = v + 1, name = 'after' WHERE id = 200`)
	require.NoError(t, err)
	waitSame(t, src, src, "items", "items_copy")
	after := dump(t, src, "items_copy")
	require.Len(t, after, len(before))
	require.Equal(t, before[:199], after[:199])
	require.Equal(t, before[200:], after[200:])
}

// interleave runs two large transactions whose changes alternate, one
// committing and one rolling back a part; the target ends equal.
func interleave(t *testing.T, src *pgxpool.Pool, applying int) {
	ctx := tctx(t, 2*time.Minute)
	a, err := src.Begin(ctx)
	require.NoError(t, err)
	defer a.Rollback(context.WithoutCancel(ctx))
	b, err := src.Begin(ctx)
	require.NoError(t, err)
	defer b.Rollback(context.WithoutCancel(ctx))
	for i := range 6 {
		txExec(t, a, `INSERT INTO items SELECT g, 1, 'a', 'small' FROM generate_series($1::int, $1::int + 999) g`, 10000+i*1000)
		txExec(t, b, `INSERT INTO items SELECT g, 1, 'b', 'small' FROM generate_series($1::int, $1::int + 999) g`, 50000+i*1000)
		if i == 3 {
			txExec(t, b, `SAVEPOINT s`)
			txExec(t, b, `UPDATE items SET v = v + 1, name = 'b-undone' WHERE id BETWEEN 50000 AND 52000`)
			if applying > 0 {
				waitApplying(t, src, applying)
			}
			txExec(t, b, `ROLLBACK TO SAVEPOINT s`)
		}
	}
	txExec(t, a, `UPDATE items SET v = v + 1, name = 'a2' WHERE id BETWEEN 1 AND 200`)
	require.NoError(t, b.Commit(ctx))
	waitSame(t, src, src, "items", "items_copy")
	require.NoError(t, a.Commit(ctx))
	waitSame(t, src, src, "items", "items_copy")
}

// Two large transactions streamed at once, their chunks interleaved, each
// applied in its own target transaction.
func TestSyncInProgressInterleaved(t *testing.T) {
	t.Parallel()
	_, src, _, _, _, _ := inProgressSync(t, 0)
	interleave(t, src, 2)
}

// More transactions in progress at once than MaxStreams: the sync reads
// whole transactions instead, and still ends equal.
func TestSyncInProgressOverBound(t *testing.T) {
	t.Parallel()
	_, src, _, _, _, _ := inProgressSync(t, 1)
	interleave(t, src, 0)
}

// The WAL sender killed while a large transaction is applied in progress:
// its open target transaction goes, the sync reconnects, and the
// transaction comes again whole once it commits: nothing lost.
func TestSyncInProgressKilledMidStream(t *testing.T) {
	t.Parallel()
	_, src, name, _, _, _ := inProgressSync(t, 0)
	ctx := tctx(t, 2*time.Minute)
	tx, err := src.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(context.WithoutCancel(ctx))
	txExec(t, tx, `INSERT INTO items SELECT i, 1, 'k' || i, 'small' FROM generate_series(1001, 6000) i`)
	txExec(t, tx, `UPDATE items SET v = v + 1, name = 'k' WHERE id <= 300`)
	waitApplying(t, src, 1)
	var killed bool
	require.NoError(t, src.QueryRow(ctx, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active`, name).Scan(&killed))
	require.True(t, killed)
	txExec(t, tx, `INSERT INTO items SELECT i, 1, 'k' || i, 'small' FROM generate_series(6001, 9000) i`)
	require.NoError(t, tx.Commit(ctx))
	waitSame(t, src, src, "items", "items_copy")
}

// A column added by a transaction in progress: rolled back, the sync goes
// on; committed, it stops with ErrSchemaChanged and nothing of that
// transaction applied.
func TestSyncInProgressSchemaChange(t *testing.T) {
	t.Parallel()
	_, src, name, _, done, runErr := inProgressSync(t, 0)
	ctx := tctx(t, 2*time.Minute)
	for _, commit := range []bool{false, true} {
		tx, err := src.Begin(ctx)
		require.NoError(t, err)
		txExec(t, tx, `INSERT INTO items SELECT i, 1, 'before', 'small' FROM generate_series(1001, 4000) i`)
		waitApplying(t, src, 1)
		txExec(t, tx, `ALTER TABLE items ADD COLUMN extra int`)
		txExec(t, tx, `INSERT INTO items SELECT i, 1, 'after', 'small', 7 FROM generate_series(4001, 8000) i`)
		waitDecoded(t, src, name)
		if !commit {
			require.NoError(t, tx.Rollback(ctx))
			_, err = src.Exec(ctx, `UPDATE items SET v = v + 1 WHERE id = 7`)
			require.NoError(t, err)
			waitSame(t, src, src, "items", "items_copy")
			continue
		}
		before := dump(t, src, "items_copy")
		require.NoError(t, tx.Commit(ctx))
		select {
		case <-done:
		case <-time.After(time.Minute):
			t.Fatal("the sync did not stop")
		}
		require.ErrorIs(t, *runErr, cdc.ErrSchemaChanged)
		require.Equal(t, before, dump(t, src, "items_copy"))
	}
}

// waitDecoded waits until the slot's WAL sender has read the log up to its
// current end (so a transaction in progress is streamed past there).
func waitDecoded(t *testing.T, src *pgxpool.Pool, slot string) {
	ctx := tctx(t, 30*time.Second)
	var end string
	require.NoError(t, src.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&end))
	require.Eventually(t, func() bool {
		var ok bool
		err := src.QueryRow(ctx, `SELECT coalesce((SELECT r.sent_lsn >= $2::pg_lsn FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1), false)`, slot, end).Scan(&ok)
		return err == nil && ok
	}, 30*time.Second, 10*time.Millisecond, "the WAL sender never read up to %s", end)
}

// A column added in a subtransaction that is rolled back, inside a
// transaction applied while it runs that then commits: the sync goes on
// (the shape the rolled-back subtransaction saw is dropped with it), with
// or without a change of the table after the rollback.
func TestSyncInProgressSubtransactionSchemaChangeRolledBack(t *testing.T) {
	t.Parallel()
	_, src, name, _, done, runErr := inProgressSync(t, 0)
	ctx := tctx(t, 2*time.Minute)
	for round, changeAfter := range []bool{false, true} {
		base := 10000 * (round + 1)
		tx, err := src.Begin(ctx)
		require.NoError(t, err)
		txExec(t, tx, `INSERT INTO items SELECT i, 1, 'before', 'small' FROM generate_series($1::int, $1::int + 2999) i`, base)
		waitApplying(t, src, 1)
		txExec(t, tx, `SAVEPOINT ddl`)
		txExec(t, tx, `ALTER TABLE items ADD COLUMN extra int`)
		txExec(t, tx, `INSERT INTO items SELECT i, 1, 'gone', 'small', 7 FROM generate_series($1::int + 3000, $1::int + 5999) i`, base)
		waitDecoded(t, src, name)
		txExec(t, tx, `ROLLBACK TO SAVEPOINT ddl`)
		if changeAfter {
			txExec(t, tx, `INSERT INTO items SELECT i, 1, 'after', 'small' FROM generate_series($1::int + 6000, $1::int + 6999) i`, base)
		}
		require.NoError(t, tx.Commit(ctx))
		_, err = src.Exec(ctx, `UPDATE items SET v = v + 1 WHERE id = 7`)
		require.NoError(t, err)
		waitSame(t, src, src, "items", "items_copy")
		select {
		case <-done:
			t.Fatalf("the sync stopped: %v", *runErr)
		default:
		}
	}
}
