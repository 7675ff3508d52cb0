package cdc_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

// TestMain doubles as a relay process for the crash test: with
// DIMMER_CDC_RELAY_CHILD set it runs a relay until it is killed.
func TestMain(m *testing.M) {
	if os.Getenv("DIMMER_CDC_RELAY_CHILD") != "" {
		os.Exit(relayChild())
	}
	if os.Getenv("DIMMER_CDC_SYNC_CHILD") != "" {
		os.Exit(syncChild())
	}
	os.Exit(m.Run())
}

func relayChild() int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	cl, err := kgo.NewClient(kafkasink.ClientOptions(strings.Split(os.Getenv("DIMMER_CDC_BROKERS"), ",")...)...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer cl.Close()
	kp, err := kafkasink.New(cl)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	r, err := cdc.NewRelay(os.Getenv("DIMMER_CDC_URL"), kp, cdc.RelayConfig{Slot: os.Getenv("DIMMER_CDC_SLOT"), ID: "child",
		BatchSize: 20, FenceTTL: time.Second})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	go func() {
		for !r.Active() {
			time.Sleep(5 * time.Millisecond)
		}
		fmt.Println("active")
	}()
	if err := r.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func syncChild() int {
	ctx := context.Background()
	target, err := pgxpool.New(ctx, os.Getenv("DIMMER_CDC_TARGET"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	s, err := cdc.NewSync(os.Getenv("DIMMER_CDC_URL"), target, cdc.SyncConfig{Name: os.Getenv("DIMMER_CDC_SLOT"),
		Source: backfill.Table{Name: "items"}, Target: backfill.Table{Name: "items_copy"}, VersionColumn: "v", BatchSize: 500})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	go func() {
		for !s.Streaming() {
			time.Sleep(5 * time.Millisecond)
		}
		fmt.Println("streaming")
	}()
	fmt.Fprintln(os.Stderr, s.Run(ctx))
	return 1
}

// The sync process is killed with SIGKILL while it applies a large
// transaction (part of it applied, none of it confirmed) and concurrent
// updates: a new sync resumes from the confirmed position and the target
// ends equal to the source.
func TestSyncKilledMidTransactionResumes(t *testing.T) {
	t.Parallel()
	srcURL, src := logicalDB(t)
	dstURL := dimmertest.Database(t)
	dst := dimmertest.Pool(t, dstURL)
	ctx := tctx(t, 3*time.Minute)
	_, err := src.Exec(ctx, fmt.Sprintf(syncTable, "items")+`; INSERT INTO items SELECT i, 1, 'n', 'b' FROM generate_series(1, 1000) i`)
	require.NoError(t, err)
	_, err = dst.Exec(ctx, fmt.Sprintf(syncTable, "items_copy"))
	require.NoError(t, err)
	name := dimmertest.Name("sync_")
	child := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), "DIMMER_CDC_SYNC_CHILD=1", "DIMMER_CDC_URL="+srcURL, "DIMMER_CDC_TARGET="+dstURL, "DIMMER_CDC_SLOT="+name)
	child.Stderr = os.Stderr
	out, err := child.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, child.Start())
	killed := false
	t.Cleanup(func() {
		if !killed {
			_ = child.Process.Kill()
			_ = child.Wait()
		}
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "streaming\n", line)

	updates := make(chan struct{})
	go func() {
		defer close(updates)
		for i := range 300 {
			_, err := src.Exec(ctx, `UPDATE items SET v = v + 1, name = name || '+' WHERE id = $1`, 1+i%1000)
			require.NoError(t, err)
		}
	}()
	// One transaction of 30,000 rows: applied in batches of 500.
	_, err = src.Exec(ctx, `INSERT INTO items SELECT i, 1, 'bulk', 'b' FROM generate_series(100001, 130000) i`)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		return count(t, dst, `SELECT count(*) FROM items_copy WHERE id > 100000`) > 0
	}, time.Minute, time.Millisecond)
	require.NoError(t, child.Process.Signal(syscall.SIGKILL))
	killed = true
	_ = child.Wait()
	partial := count(t, dst, `SELECT count(*) FROM items_copy WHERE id > 100000`)
	t.Logf("killed the sync with %d of the 30000 rows of the large transaction applied", partial)
	<-updates

	_, _, _ = runSync(t, srcURL, src, dst, cdc.SyncConfig{Name: name, Source: backfill.Table{Name: "items"},
		Target: backfill.Table{Name: "items_copy"}, VersionColumn: "v", BatchSize: 500, Logger: quiet(t)})
	waitSame(t, src, dst, "items", "items_copy")
}

// The relay process is killed with SIGKILL while it publishes: a new
// relay resumes from the slot's confirmed position; nothing committed is
// lost, per key the order holds, and only the unacknowledged tail is sent
// again (counted).
func TestRelayKilledMidStreamResumes(t *testing.T) {
	t.Parallel()
	url, pool := logicalDB(t)
	name := slot(t, pool, cdc.SlotSpec{Purpose: "relay"})
	seeds := brokers(t)
	topic := dimmertest.Name("orders_")
	createTopic(t, seeds, topic, 4)
	ctx := tctx(t, 2*time.Minute)

	child := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), "DIMMER_CDC_RELAY_CHILD=1", "DIMMER_CDC_URL="+url, "DIMMER_CDC_SLOT="+name,
		"DIMMER_CDC_BROKERS="+strings.Join(seeds, ","))
	child.Stderr = os.Stderr
	out, err := child.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, child.Start())
	killed := false
	t.Cleanup(func() {
		if !killed {
			_ = child.Process.Kill()
			_ = child.Wait()
		}
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "active\n", line)

	e, err := cdc.NewEmitter()
	require.NoError(t, err)
	const keys, txs = 20, 60
	writes := make(chan struct{})
	go func() {
		defer close(writes)
		writeCounted(t, ctx, pool, e, topic, keys, txs, 4)
	}()
	// Kill it mid-stream: writes still going on, a quarter published.
	admin, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	require.NoError(t, err)
	defer admin.Close()
	require.Eventually(t, func() bool {
		ends, err := kadm.NewClient(admin).ListEndOffsets(ctx, topic)
		require.NoError(t, err)
		var n int64
		ends.Each(func(o kadm.ListedOffset) { n += o.Offset })
		return n >= keys*txs/4
	}, time.Minute, time.Millisecond)
	require.NoError(t, child.Process.Signal(syscall.SIGKILL))
	killed = true
	_ = child.Wait()
	var mid string
	require.NoError(t, pool.QueryRow(ctx, `SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1`, name).Scan(&mid))
	t.Logf("killed the relay; the slot's confirmed position is %s", mid)

	kp := producer(t, seeds)
	r, err := cdc.NewRelay(url, kp, cdc.RelayConfig{Slot: name, ID: "successor", Logger: quiet(t)})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	<-writes
	var end string
	require.NoError(t, pool.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&end))
	require.Eventually(t, func() bool {
		var ok bool
		require.NoError(t, pool.QueryRow(ctx, `SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1`, name, end).Scan(&ok))
		return ok
	}, time.Minute, 20*time.Millisecond)
	require.NoError(t, r.Shutdown(ctx))
	require.NoError(t, <-done)

	want := map[string]int{}
	for k := range keys {
		want[fmt.Sprint("k", k)] = txs
	}
	recs := consumeAll(t, seeds, topic)
	dups := checkOrder(t, recs, want)
	t.Logf("%d records, %d committed messages, %d re-sent after the kill", len(recs), keys*txs, dups)
	assert.Equal(t, keys*txs+dups, len(recs))
}

// The network to Postgres is cut while the relay streams (every connection
// closed, new ones refused for a while): the relay reconnects, and nothing
// is lost or reordered.
func TestRelaySurvivesNetworkCut(t *testing.T) {
	t.Parallel()
	url, pool := logicalDB(t)
	name := slot(t, pool, cdc.SlotSpec{Purpose: "relay"})
	seeds := brokers(t)
	topic := dimmertest.Name("orders_")
	createTopic(t, seeds, topic, 4)
	ctx := tctx(t, 2*time.Minute)
	proxy := newCutProxy(t, hostOf(t, url))
	kp := producer(t, seeds)
	r, err := cdc.NewRelay(proxy.via(t, url), kp, cdc.RelayConfig{Slot: name, BatchSize: 20, FenceTTL: time.Second,
		StandbyPoll: 50 * time.Millisecond, Logger: quiet(t)})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	require.Eventually(t, r.Active, 30*time.Second, 5*time.Millisecond)
	e, err := cdc.NewEmitter()
	require.NoError(t, err)
	const keys, txs = 20, 60
	writes := make(chan struct{})
	go func() {
		defer close(writes)
		writeCounted(t, ctx, pool, e, topic, keys, txs, 4)
	}()
	admin, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	require.NoError(t, err)
	defer admin.Close()
	require.Eventually(t, func() bool {
		ends, err := kadm.NewClient(admin).ListEndOffsets(ctx, topic)
		require.NoError(t, err)
		var n int64
		ends.Each(func(o kadm.ListedOffset) { n += o.Offset })
		return n >= keys*txs/4
	}, time.Minute, time.Millisecond)
	proxy.refuse.Store(true)
	proxy.cut()
	require.Eventually(t, func() bool { return !r.Active() }, 30*time.Second, 5*time.Millisecond)
	refusedFrom := proxy.accepts.Load()
	time.Sleep(300 * time.Millisecond) // the outage: reconnects are refused
	require.Greater(t, proxy.accepts.Load(), refusedFrom, "the relay tried to reconnect during the outage")
	proxy.refuse.Store(false)
	<-writes
	var end string
	require.NoError(t, pool.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&end))
	require.Eventually(t, func() bool {
		var ok bool
		require.NoError(t, pool.QueryRow(ctx, `SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1`, name, end).Scan(&ok))
		return ok
	}, time.Minute, 20*time.Millisecond)
	require.NoError(t, r.Shutdown(ctx))
	require.NoError(t, <-done)
	want := map[string]int{}
	for k := range keys {
		want[fmt.Sprint("k", k)] = txs
	}
	dups := checkOrder(t, consumeAll(t, seeds, topic), want)
	t.Logf("re-sent after the cut: %d", dups)
}

// The network between the sync and both the source and the target is cut
// while it streams (every connection closed, reconnects refused for a
// while), and later its WAL sender is terminated on the server: the sync
// reconnects by itself
// and resumes from its confirmed position. Nothing is lost (the target
// ends equal to the source), per key the versions the target takes never
// go backwards (commit order kept, no older change applied over a newer
// one), and what was re-sent after a cut only rewrote versions the target
// already had (counted).
func TestSyncSurvivesNetworkCut(t *testing.T) {
	t.Parallel()
	srcURL, src := logicalDB(t)
	dstURL := dimmertest.Database(t)
	dst := dimmertest.Pool(t, dstURL)
	ctx := tctx(t, 2*time.Minute)
	const keys, writes = 100, 1200
	_, err := src.Exec(ctx, fmt.Sprintf(syncTable, "items")+fmt.Sprintf(`; INSERT INTO items SELECT i, 1, 'n', 'b' FROM generate_series(1, %d) i`, keys))
	require.NoError(t, err)
	_, err = dst.Exec(ctx, fmt.Sprintf(syncTable, "items_copy")+`;
CREATE TABLE applied_log (seq bigserial PRIMARY KEY, id bigint NOT NULL, v bigint NOT NULL);
CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO applied_log (id, v) VALUES (NEW.id, NEW.v); RETURN NEW; END $$;
CREATE TRIGGER log_apply AFTER INSERT OR UPDATE ON items_copy FOR EACH ROW EXECUTE FUNCTION log_apply()`)
	require.NoError(t, err)
	// Both the source and the target are reached through the network
	// that fails.
	proxy := newCutProxy(t, hostOf(t, srcURL))
	tproxy := newCutProxy(t, hostOf(t, dstURL))
	target := dimmertest.Pool(t, tproxy.via(t, dstURL))
	name := dimmertest.Name("sync_")
	s, done, runErr := runSync(t, proxy.via(t, srcURL), src, target, cdc.SyncConfig{Name: name, Source: backfill.Table{Name: "items"},
		Target: backfill.Table{Name: "items_copy"}, VersionColumn: "v", BatchSize: 50, Logger: quiet(t)})
	running := func() bool {
		select {
		case <-done:
			t.Fatalf("sync ended: %v", *runErr)
		default:
		}
		return true
	}
	require.Eventually(t, func() bool { return running() && s.Streaming() }, time.Minute, 5*time.Millisecond)

	// Four writers, each bumping the versions of its own keys, one
	// transaction per write.
	written := make(chan struct{})
	go func() {
		defer close(written)
		var wg sync.WaitGroup
		for w := range 4 {
			wg.Go(func() {
				for i := range writes / 4 {
					id := 1 + (i*4+w)%keys
					_, err := src.Exec(ctx, `UPDATE items SET v = v + 1, name = $2 WHERE id = $1`, id, fmt.Sprint("w", w, "-", i))
					assert.NoError(t, err)
				}
			})
		}
		wg.Wait()
	}()
	streamedSome := func(n int) func() bool {
		return func() bool { return count(t, dst, `SELECT count(*) FROM applied_log`) >= keys+n }
	}

	// The network fails mid-stream: reconnects are refused until it is back.
	require.Eventually(t, streamedSome(writes/5), time.Minute, time.Millisecond)
	proxy.refuse.Store(true)
	tproxy.refuse.Store(true)
	proxy.cut()
	tproxy.cut()
	require.Eventually(t, func() bool { return running() && !s.Streaming() }, 30*time.Second, time.Millisecond)
	refusedFrom := proxy.accepts.Load()
	require.Eventually(t, func() bool { return proxy.accepts.Load() >= refusedFrom+2 }, 30*time.Second, time.Millisecond,
		"the sync did not try to reconnect during the outage")
	proxy.refuse.Store(false)
	tproxy.refuse.Store(false)
	require.Eventually(t, func() bool { return running() && s.Streaming() }, 30*time.Second, time.Millisecond)
	// The sync marked its direction on the target again (the mark went
	// with its cut connection).
	require.Eventually(t, func() bool {
		return count(t, dst, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
	AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`) == 1
	}, 30*time.Second, 5*time.Millisecond)

	// Then the server ends the WAL sender (FATAL: terminating connection).
	n := count(t, dst, `SELECT count(*) FROM applied_log`)
	require.Eventually(t, streamedSome(n-keys+writes/10), time.Minute, time.Millisecond)
	require.Equal(t, 1, count(t, src, `SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = $1 AND active`, name))
	require.Eventually(t, func() bool {
		return running() && count(t, src, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active`, name) == 1 && s.Streaming()
	}, 30*time.Second, 5*time.Millisecond)

	<-written
	require.NoError(t, s.CaughtUp(ctx, src))
	require.Equal(t, dump(t, src, "items"), dump(t, dst, "items_copy"), "lost changes")
	running()

	last := map[int64]int64{}
	seen := map[[2]int64]bool{}
	rewrites := 0
	rows, err := dst.Query(ctx, `SELECT id, v FROM applied_log ORDER BY seq`)
	require.NoError(t, err)
	var id, v int64
	_, err = pgx.ForEachRow(rows, []any{&id, &v}, func() error {
		require.GreaterOrEqual(t, v, last[id], "key %d went back from version %d to %d", id, last[id], v)
		last[id] = v
		if seen[[2]int64{id, v}] {
			rewrites++
		}
		seen[[2]int64{id, v}] = true
		return nil
	})
	require.NoError(t, err)
	t.Logf("two cuts; %d row writes re-applied a version the target already had", rewrites)
}
