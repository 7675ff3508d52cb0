package cdc_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
)

const syncTable = `CREATE TABLE %s (id bigint PRIMARY KEY, v bigint NOT NULL, name text, big text)`

// dump renders a table for comparison (the large column by hash).
func dump(t testing.TB, pool *pgxpool.Pool, table string) []string {
	rows, err := pool.Query(tctx(t, 30*time.Second), `SELECT format('%s|%s|%s|%s', id, v, name, md5(big)) FROM `+table+` ORDER BY id`)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return out
}

func waitSame(t testing.TB, src, dst *pgxpool.Pool, srcTable, dstTable string) {
	t.Helper()
	var a, b []string
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		a, b = dump(t, src, srcTable), dump(t, dst, dstTable)
		if slices_equal(a, b) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	require.Equal(t, a, b, "target never caught up with the source")
}

func slices_equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// runSync runs a sync until the test ends; done is closed when Run
// returns, with its error in *runErr. prepare runs before Run.
func runSync(t testing.TB, srcURL string, src *pgxpool.Pool, target *pgxpool.Pool, cfg cdc.SyncConfig, prepare ...func(*cdc.Sync)) (s *cdc.Sync, done <-chan struct{}, runErr *error) {
	s, err := cdc.NewSync(srcURL, target, cfg)
	require.NoError(t, err)
	for _, p := range prepare {
		p(s)
	}
	ctx, cancel := context.WithCancel(context.Background())
	closed := make(chan struct{})
	runErr = new(error)
	go func() { *runErr = s.Run(ctx); close(closed) }()
	t.Cleanup(func() {
		cancel()
		<-closed
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := cdc.DropSlot(c, src, "", cfg.Name, true); err != nil {
			t.Errorf("drop slot %s: %v", cfg.Name, err)
		}
	})
	return s, closed, runErr
}

// The copy and the stream together: rows present before the sync, then
// concurrent inserts, updates (some leaving a TOASTed column unchanged),
// deletes and one large transaction, to a table in another database on
// another server.
func TestSyncCopiesThenStreams(t *testing.T) {
	t.Parallel()
	srcURL, src := logicalDB(t)
	dst := dimmertest.Pool(t, dimmertest.Database(t))
	ctx := tctx(t, 3*time.Minute)
	_, err := src.Exec(ctx, fmt.Sprintf(syncTable, "items"))
	require.NoError(t, err)
	_, err = dst.Exec(ctx, fmt.Sprintf(syncTable, "items_copy"))
	require.NoError(t, err)
	// big is stored out of line (TOAST), so updates that leave it alone
	// send it as "unchanged".
	_, err = src.Exec(ctx, `INSERT INTO items SELECT i, 1, 'n' || i, (SELECT string_agg(md5(i::text || j::text), '') FROM generate_series(1, 300) j) FROM generate_series(1, 2000) i`)
	require.NoError(t, err)
	name := dimmertest.Name("sync_")
	s, done, runErr := runSync(t, srcURL, src, dst, cdc.SyncConfig{Name: name, Source: backfill.Table{Name: "items"},
		Target: backfill.Table{Name: "items_copy"}, VersionColumn: "v", BatchSize: 500, Logger: quiet(t)})
	require.Eventually(t, func() bool {
		select {
		case <-done:
			t.Fatalf("sync ended: %v", *runErr)
		default:
		}
		return s.Streaming()
	}, time.Minute, 10*time.Millisecond)

	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 150 {
				id := 1 + (i*4+w)%2000
				var err error
				switch i % 5 {
				case 0: // leaves big unchanged
					_, err = src.Exec(ctx, `UPDATE items SET v = v + 1, name = name || '+' WHERE id = $1`, id)
				case 1:
					_, err = src.Exec(ctx, `UPDATE items SET v = v + 1, big = repeat('x', 5000) || $1 WHERE id = $1`, id)
				case 2:
					_, err = src.Exec(ctx, `DELETE FROM items WHERE id = $1`, id)
				case 3:
					_, err = src.Exec(ctx, `INSERT INTO items VALUES ($1, 1, 'new', 'small') ON CONFLICT (id) DO UPDATE SET v = items.v + 1`, 10000+id)
				case 4: // two changes of one key in one transaction
					err = pgx.BeginFunc(ctx, src, func(tx pgx.Tx) error {
						if _, err := tx.Exec(ctx, `UPDATE items SET v = v + 1, name = 'first' WHERE id = $1`, id); err != nil {
							return err
						}
						_, err := tx.Exec(ctx, `UPDATE items SET v = v + 1, name = 'second' WHERE id = $1`, id)
						return err
					})
				}
				require.NoError(t, err)
			}
		}()
	}
	wg.Wait()
	// Keys change: the rows leave their old keys on the target too.
	_, err = src.Exec(ctx, `UPDATE items SET id = id + 50000, v = v + 1 WHERE id <= 50`)
	require.NoError(t, err)
	// A transaction larger than a batch: applied in parts, confirmed once.
	_, err = src.Exec(ctx, `INSERT INTO items SELECT i, 1, 'bulk', 'b' FROM generate_series(20001, 23000) i`)
	require.NoError(t, err)
	// Caught up means equal, with no writes in between.
	require.NoError(t, s.CaughtUp(ctx, src))
	require.Equal(t, dump(t, src, "items"), dump(t, dst, "items_copy"))
	select {
	case <-done:
		t.Fatalf("sync ended: %v", *runErr)
	default:
	}
}

func TestSyncRefusesBadInput(t *testing.T) {
	t.Parallel()
	srcURL, src := logicalDB(t)
	ctx := tctx(t, time.Minute)
	_, err := src.Exec(ctx, `CREATE TABLE nopk (id int, v int); CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL UNIQUE, v int)`)
	require.NoError(t, err)
	sink := func(context.Context, []cdc.Change) error { return nil }
	nothingLeft := func(t *testing.T) {
		assert.Zero(t, count(t, src, `SELECT count(*) FROM pg_replication_slots WHERE database = current_database()`), "slot left behind")
		assert.Zero(t, count(t, src, `SELECT count(*) FROM pg_publication`), "publication left behind")
	}
	t.Run("no primary key", func(t *testing.T) {
		s, err := cdc.NewSync(srcURL, nil, cdc.SyncConfig{Name: "nopk_sync", Source: backfill.Table{Name: "nopk"}, Sink: sink, VersionColumn: "v"})
		require.NoError(t, err)
		err = s.Run(ctx)
		require.ErrorIs(t, err, cdc.ErrNoReplicaIdentity)
		assert.Contains(t, err.Error(), "public.nopk")
		nothingLeft(t)
	})
	t.Run("key outside the replica identity", func(t *testing.T) {
		s, err := cdc.NewSync(srcURL, nil, cdc.SyncConfig{Name: "code_sync", Source: backfill.Table{Name: "t"}, Key: []string{"code"}, Sink: sink, VersionColumn: "v"})
		require.NoError(t, err)
		err = s.Run(ctx)
		require.ErrorIs(t, err, cdc.ErrNoReplicaIdentity)
		assert.Contains(t, err.Error(), `"code"`)
		nothingLeft(t)
	})
	t.Run("missing table", func(t *testing.T) {
		s, err := cdc.NewSync(srcURL, nil, cdc.SyncConfig{Name: "x_sync", Source: backfill.Table{Name: "nosuch"}, Sink: sink, VersionColumn: "v"})
		require.NoError(t, err)
		require.ErrorIs(t, s.Run(ctx), cdc.ErrNoTable)
		nothingLeft(t)
	})
	t.Run("target cannot hold a source type", func(t *testing.T) {
		_, err := src.Exec(ctx, `CREATE TABLE typed (id int PRIMARY KEY, v int NOT NULL, doc jsonb, n int, s varchar(10));
CREATE TABLE typed_copy (id bigint PRIMARY KEY, v bigint NOT NULL, doc int, n numeric, s text);
CREATE TABLE typed_ok (id bigint PRIMARY KEY, v bigint NOT NULL, doc text, n numeric, s text);
CREATE TABLE typed_nokey (id bigint, v bigint NOT NULL, doc text, n numeric, s text)`)
		require.NoError(t, err)
		s, err := cdc.NewSync(srcURL, src, cdc.SyncConfig{Name: "typed_sync", Source: backfill.Table{Name: "typed"},
			Target: backfill.Table{Name: "typed_copy"}, VersionColumn: "v"})
		require.NoError(t, err)
		err = s.Run(ctx)
		require.ErrorIs(t, err, cdc.ErrColumnType)
		var te *cdc.ColumnTypeError
		require.ErrorAs(t, err, &te)
		assert.Equal(t, cdc.ColumnTypeError{Table: "typed_copy", Column: "doc", SourceType: "jsonb", TargetType: "integer"}, *te)
		assert.Contains(t, err.Error(), `typed_copy column "doc" is integer, the source's is jsonb`)
		nothingLeft(t)
		assert.Zero(t, count(t, src, `SELECT count(*) FROM typed_copy`))

		// No unique index on the key to upsert by.
		s, err = cdc.NewSync(srcURL, src, cdc.SyncConfig{Name: "typed_sync", Source: backfill.Table{Name: "typed"},
			Target: backfill.Table{Name: "typed_nokey"}, VersionColumn: "v"})
		require.NoError(t, err)
		var fe *cdc.FieldError
		require.ErrorAs(t, s.Run(ctx), &fe)
		assert.Equal(t, "Target", fe.Field)
		assert.Contains(t, fe.Reason, "unique index on exactly the key (id)")
		nothingLeft(t)

		// Assignment casts (int to bigint and numeric, varchar to text) and
		// any type into a string column are taken.
		s, err = cdc.NewSync(srcURL, src, cdc.SyncConfig{Name: "typed_sync", Source: backfill.Table{Name: "typed"},
			Target: backfill.Table{Name: "typed_ok"}, VersionColumn: "v"})
		require.NoError(t, err)
		require.NoError(t, s.Prepare(ctx))
		require.NoError(t, cdc.DropSlot(ctx, src, "", "typed_sync", true))
		nothingLeft(t)
	})
	t.Run("config", func(t *testing.T) {
		_, err := cdc.NewSync(srcURL, nil, cdc.SyncConfig{Name: "y", Source: backfill.Table{Name: "t"}, Sink: sink})
		var fe *cdc.FieldError
		require.ErrorAs(t, err, &fe)
		assert.Equal(t, "VersionColumn", fe.Field)
		_, err = cdc.NewSync(srcURL, nil, cdc.SyncConfig{Name: "y", Source: backfill.Table{Name: "t"}, VersionColumn: "v"})
		require.ErrorAs(t, err, &fe)
		assert.Equal(t, "Target", fe.Field)
	})
}

// A column added to the source while every column is synced stops the
// sync with an error naming it; nothing of the new shape is applied.
func TestSyncStopsOnSchemaChange(t *testing.T) {
	t.Parallel()
	srcURL, src := logicalDB(t)
	ctx := tctx(t, 2*time.Minute)
	_, err := src.Exec(ctx, `CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL); INSERT INTO t VALUES (1, 1)`)
	require.NoError(t, err)
	var mu sync.Mutex
	var got []cdc.Change
	sink := func(_ context.Context, cs []cdc.Change) error {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, cs...)
		return nil
	}
	name := dimmertest.Name("sync_")
	s, done, runErr := runSync(t, srcURL, src, nil, cdc.SyncConfig{Name: name, Source: backfill.Table{Name: "t"}, Sink: sink, VersionColumn: "v", Logger: quiet(t)})
	require.Eventually(t, s.Streaming, time.Minute, 10*time.Millisecond)
	_, err = src.Exec(ctx, `INSERT INTO t VALUES (2, 1); TRUNCATE t; INSERT INTO t VALUES (3, 1); UPDATE t SET id = 30, v = 2 WHERE id = 3`)
	require.NoError(t, err)
	require.Eventually(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(got) >= 5 }, 30*time.Second, 10*time.Millisecond)
	_, err = src.Exec(ctx, `ALTER TABLE t ADD COLUMN secret text; INSERT INTO t VALUES (4, 1, 's')`)
	require.NoError(t, err)
	select {
	case <-done:
		require.ErrorIs(t, *runErr, cdc.ErrSchemaChanged)
		assert.Contains(t, (*runErr).Error(), `"secret"`)
	case <-time.After(30 * time.Second):
		t.Fatal("the sync did not stop on the added column")
	}
	mu.Lock()
	defer mu.Unlock()
	var ops []string
	for _, c := range got {
		op := fmt.Sprintf("%s:%v", c.Op, c.Row["id"])
		if c.OldKey != nil {
			op += fmt.Sprintf("(from %v)", c.OldKey["id"])
		}
		ops = append(ops, op)
	}
	assert.Equal(t, "copy:1 insert:2 truncate:<nil> insert:3 update:30(from 3)", strings.Join(ops, " "))
}

// A source transaction of 200,000 rows is streamed and applied in
// batches, never held whole: while the target is locked (the apply
// waits), reading stops once four batches are held, and the transaction's
// end is not confirmed until all of it is applied. Then every row arrives.
func TestSyncLargeTransactionBoundedMemory(t *testing.T) {
	t.Parallel()
	srcURL, src := logicalDB(t)
	dst := dimmertest.Pool(t, dimmertest.Database(t))
	ctx := tctx(t, 2*time.Minute)
	const rows, batch = 200_000, 2000
	// The bound Buffered documents: the batch being read, two queued, the
	// one being applied.
	const bound = 4 * batch
	_, err := src.Exec(ctx, `CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL, name text)`)
	require.NoError(t, err)
	_, err = dst.Exec(ctx, `CREATE TABLE items_copy (id bigint PRIMARY KEY, v bigint NOT NULL, name text)`)
	require.NoError(t, err)
	name := dimmertest.Name("sync_")
	s, done, runErr := runSync(t, srcURL, src, dst, cdc.SyncConfig{Name: name, Source: backfill.Table{Name: "items"},
		Target: backfill.Table{Name: "items_copy"}, VersionColumn: "v", BatchSize: batch, Logger: quiet(t)})
	require.Eventually(t, s.Streaming, time.Minute, 5*time.Millisecond)

	var peak atomic.Int64
	stopWatch := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			if n := int64(s.Buffered()); n > peak.Load() {
				peak.Store(n)
			}
			select {
			case <-stopWatch:
				return
			case <-time.After(200 * time.Microsecond):
			}
		}
	}()

	// Writes to the target wait behind this lock.
	lock, err := dst.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = lock.Rollback(context.WithoutCancel(ctx)) }()
	_, err = lock.Exec(ctx, `LOCK TABLE items_copy IN EXCLUSIVE MODE`)
	require.NoError(t, err)

	_, err = src.Exec(ctx, `INSERT INTO items SELECT i, 1, 'row ' || i FROM generate_series(1, $1) i`, rows)
	require.NoError(t, err)
	var end pglogrepl.LSN
	require.NoError(t, src.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()`).Scan(&end))

	// The reader fills the pipeline and then waits for the apply.
	require.Eventually(t, func() bool { return s.Buffered() >= bound-batch }, time.Minute, time.Millisecond)
	require.Never(t, func() bool { return s.Buffered() > bound }, 300*time.Millisecond, time.Millisecond,
		"the sync kept reading while nothing could be applied")
	applied, err := pglogrepl.ParseLSN(s.Applied())
	require.NoError(t, err)
	assert.Less(t, applied, end, "the transaction was confirmed before it was applied")
	require.NoError(t, lock.Rollback(ctx))

	require.NoError(t, s.CaughtUp(ctx, src))
	close(stopWatch)
	<-watched
	assert.Equal(t, rows, count(t, dst, `SELECT count(*) FROM items_copy`))
	assert.Equal(t, rows, count(t, dst, `SELECT count(DISTINCT id) FROM items_copy WHERE name = 'row ' || id AND v = 1`))
	assert.LessOrEqual(t, peak.Load(), int64(bound), "changes held at once")
	assert.Zero(t, s.Buffered())
	t.Logf("%d rows in one transaction; at most %d changes held at once (bound %d)", rows, peak.Load(), bound)
	select {
	case <-done:
		t.Fatalf("sync ended: %v", *runErr)
	default:
	}
}

// A sync the other way between the same two tables is refused while the
// first runs, naming both tables and why, and nothing of it is created;
// once the first stops, it runs.
func TestSyncRefusesOppositeSync(t *testing.T) {
	t.Parallel()
	aURL, a := logicalDB(t)
	bURL, b := logicalDB(t)
	ctx := tctx(t, time.Minute)
	for _, db := range []*pgxpool.Pool{a, b} {
		_, err := db.Exec(ctx, fmt.Sprintf(syncTable, "acct"))
		require.NoError(t, err)
	}
	fwdName, revName := dimmertest.Name("fwd_"), dimmertest.Name("rev_")
	fwd, err := cdc.NewSync(aURL, b, cdc.SyncConfig{Name: fwdName, Source: backfill.Table{Name: "acct"}, Target: backfill.Table{Name: "acct"},
		VersionColumn: "v", Logger: quiet(t)})
	require.NoError(t, err)
	fctx, stopFwd := context.WithCancel(ctx)
	fwdDone := make(chan error, 1)
	go func() { fwdDone <- fwd.Run(fctx) }()
	defer func() {
		stopFwd()
		<-fwdDone
		require.NoError(t, cdc.DropSlot(context.Background(), a, "", fwdName, true))
	}()
	require.Eventually(t, fwd.Streaming, 30*time.Second, 5*time.Millisecond)

	rev, err := cdc.NewSync(bURL, a, cdc.SyncConfig{Name: revName, Source: backfill.Table{Name: "acct"}, Target: backfill.Table{Name: "acct"},
		VersionColumn: "v", SkipCopy: true, Logger: quiet(t)})
	require.NoError(t, err)
	err = rev.Run(ctx)
	require.ErrorIs(t, err, cdc.ErrOppositeSync)
	aDB, bDB := a.Config().ConnConfig.Database, b.Config().ConnConfig.Database
	assert.Contains(t, err.Error(), bDB+"/public.acct into "+aDB+"/public.acct")
	assert.Contains(t, err.Error(), "replay the other's writes")
	assert.Zero(t, count(t, b, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, revName), "slot created")
	// A sync that runs the same way is not mistaken for one the other way.
	_, err = a.Exec(ctx, `INSERT INTO acct VALUES (1, 1, 'a', 'b')`)
	require.NoError(t, err)
	require.NoError(t, fwd.CaughtUp(ctx, a))
	assert.Equal(t, 1, count(t, b, `SELECT count(*) FROM acct`))

	// The forward sync stops: the reverse one runs.
	stopFwd()
	require.ErrorIs(t, <-fwdDone, context.Canceled)
	fwdDone <- nil
	rctx, stopRev := context.WithCancel(ctx)
	revDone := make(chan error, 1)
	go func() { revDone <- rev.Run(rctx) }()
	require.Eventually(t, rev.Streaming, 30*time.Second, 5*time.Millisecond)
	_, err = b.Exec(ctx, `INSERT INTO acct VALUES (2, 1, 'b', 'b')`)
	require.NoError(t, err)
	require.NoError(t, rev.CaughtUp(ctx, b))
	assert.Equal(t, 2, count(t, a, `SELECT count(*) FROM acct`))
	stopRev()
	require.ErrorIs(t, <-revDone, context.Canceled)
	require.NoError(t, cdc.DropSlot(ctx, b, "", revName, true))
}

// A position the sync has applied is confirmed to the server at once, not
// at the next StatusInterval: a cutover waits for it with writers held.
func TestSyncConfirmsAppliedPositionAtOnce(t *testing.T) {
	t.Parallel()
	srcURL, src := logicalDB(t)
	ctx := tctx(t, time.Minute)
	_, err := src.Exec(ctx, fmt.Sprintf(syncTable, "conf")+`; `+fmt.Sprintf(syncTable, "conf_copy"))
	require.NoError(t, err)
	name := dimmertest.Name("conf_")
	s, _, _ := runSync(t, srcURL, src, src, cdc.SyncConfig{Name: name, Source: backfill.Table{Name: "conf"},
		Target: backfill.Table{Name: "conf_copy"}, VersionColumn: "v", StatusInterval: 30 * time.Second, Logger: quiet(t)})
	require.Eventually(t, s.Streaming, time.Minute, 10*time.Millisecond)
	for i := range 3 {
		_, err := src.Exec(ctx, `INSERT INTO conf VALUES ($1, 1, 'n', '')`, i)
		require.NoError(t, err)
		start := time.Now()
		require.NoError(t, cdc.WaitSlot(ctx, src, name))
		assert.Less(t, time.Since(start), 5*time.Second, "the slot's confirmed position waited for the status interval")
	}
	assert.Equal(t, 3, count(t, src, `SELECT count(*) FROM conf_copy`))
}
