package cdc_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/internal/benchgoal"
	"github.com/dimmer-dev/dimmer/internal/benchloop"
	"github.com/dimmer-dev/dimmer/outbox"
)

const (
	drainMessages = 100_000
	drainKeys     = 20_000
)

// BenchmarkLogRelayThroughput drains a fixed backlog to Kafka (kfake): the
// log-mode relay reading the backlog from its slot, against the same
// hand-written polling loop the table-mode relay is measured against in
// outbox/bench_test.go (select 500, produce, delete; no order, no
// leases), on the same server, interleaved over three rounds.
func BenchmarkLogRelayThroughput(b *testing.B) {
	seeds := brokers(b)
	topic := dimmertest.Name("drain_")
	createTopic(b, seeds, topic, 16)
	ctx := tctx(b, 20*time.Minute)
	payload := make([]byte, 100)
	url, pool := logicalDB(b)

	handWritten := func() float64 {
		return benchloop.Drain(b, ctx, pool, seeds, "hw", topic, drainMessages, drainKeys, payload)
	}
	e, err := cdc.NewEmitter()
	require.NoError(b, err)
	logRelay := func() float64 {
		name := slot(b, pool, cdc.SlotSpec{Purpose: "relay"})
		// The backlog, written after the slot exists, in transactions of
		// 1,000 messages.
		for i := 0; i < drainMessages; i += 1000 {
			ms := make([]outbox.Message, 1000)
			for j := range ms {
				ms[j] = outbox.Message{Topic: topic, Key: fmt.Sprint("k", (i+j)%drainKeys), Payload: payload}
			}
			require.NoError(b, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
				_, err := e.EnqueueBatch(ctx, tx, ms)
				return err
			}))
		}
		kp := producer(b, seeds)
		var acked atomic.Int64
		all := make(chan struct{})
		pub := outbox.PublisherFunc(func(c context.Context, batch []outbox.Record) []error {
			res := kp.Publish(c, batch)
			ok := int64(0)
			for _, err := range res {
				if err == nil {
					ok++
				}
			}
			if n := acked.Add(ok); n >= drainMessages && n-ok < drainMessages {
				close(all)
			}
			return res
		})
		r, err := cdc.NewRelay(url, pub, cdc.RelayConfig{Slot: name, Logger: quiet(b)})
		require.NoError(b, err)
		done := make(chan error, 1)
		go func() { done <- r.Run(ctx) }()
		// The clock starts once the relay holds the slot, as the table
		// relays' starts once they hold their leases: connecting is not
		// draining.
		for !r.Active() {
			time.Sleep(100 * time.Microsecond)
		}
		start := time.Now()
		<-all
		rate := drainMessages / time.Since(start).Seconds()
		require.NoError(b, r.Shutdown(ctx))
		require.NoError(b, <-done)
		require.NoError(b, cdc.DropSlot(ctx, pool, "", name, true))
		return rate
	}
	var hwT, logT float64
	for range 3 {
		hwT += drainMessages / handWritten()
		logT += drainMessages / logRelay()
	}
	hw, lr := 3*drainMessages/hwT, 3*drainMessages/logT
	b.Logf("hand-written polling loop %.0f msg/s, log-mode relay %.0f msg/s (from holding the slot)", hw, lr)
	benchgoal.Report(b, "cdc_log_relay_throughput", lr, "msg/s", benchgoal.AtLeast, 50000)
	benchgoal.Report(b, "cdc_log_relay_vs_handwritten", lr/hw, "x", benchgoal.AtLeast, 1.0)
}

// BenchmarkLogRelayLatency: commit-to-ack at a steady 1,000 msg/s, each
// message its own transaction.
func BenchmarkLogRelayLatency(b *testing.B) {
	seeds := brokers(b)
	topic := dimmertest.Name("lat_")
	createTopic(b, seeds, topic, 8)
	ctx := tctx(b, 5*time.Minute)
	url, pool := logicalDB(b)
	name := slot(b, pool, cdc.SlotSpec{Purpose: "relay"})
	kp := producer(b, seeds)
	clock := benchloop.NewAckClock()
	r, err := cdc.NewRelay(url, clock.Publisher(kp), cdc.RelayConfig{Slot: name, Logger: quiet(b)})
	require.NoError(b, err)
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() { require.NoError(b, r.Shutdown(ctx)); require.NoError(b, <-done) }()
	require.Eventually(b, r.Active, 30*time.Second, time.Millisecond)
	e, err := cdc.NewEmitter()
	require.NoError(b, err)
	send := func(pool *pgxpool.Pool, i int) {
		id := uuid.Must(uuid.NewV7())
		_, err := e.EnqueuePool(ctx, pool, outbox.Message{ID: id, Topic: topic, Key: fmt.Sprint("k", i%500), Payload: []byte("x")})
		require.NoError(b, err)
		clock.Committed(id)
	}
	tick := time.NewTicker(time.Millisecond)
	for i := range 3000 {
		<-tick.C
		send(pool, i)
	}
	tick.Stop()
	require.Eventually(b, clock.AllAcked, 30*time.Second, time.Millisecond)
	lat := clock.Take()
	p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
	b.Logf("commit-to-ack at 1,000 msg/s: p50 %v, p99 %v", p50, p99)
	benchgoal.Report(b, "cdc_log_relay_commit_to_ack_p99", float64(p99)/float64(time.Millisecond), "ms", benchgoal.AtMost, 10)
}

// BenchmarkLogSourceDecode compares the two ways an outbox can reach the
// log, by what the server's pgoutput decoding delivers per second (read
// through pg_logical_slot_get_binary_changes, so only the server's side is
// timed): inserts into an outbox-shaped table, one transactional logical
// decoding message per outbox message, and messages packed 1,000 to a
// record as Emitter.EnqueueBatch writes them. The table mode would also
// have to delete (and vacuum) every row it relayed; messages store nothing.
func BenchmarkLogSourceDecode(b *testing.B) {
	ctx := tctx(b, 10*time.Minute)
	_, pool := logicalDB(b)
	const n = 100_000
	_, err := pool.Exec(ctx, `CREATE TABLE ob (seq bigserial PRIMARY KEY, id uuid NOT NULL, key text, topic text NOT NULL, payload bytea NOT NULL, headers jsonb)`)
	require.NoError(b, err)
	decode := func(spec cdc.SlotSpec, write func(), messages bool) float64 {
		name := slot(b, pool, spec)
		write()
		start := time.Now()
		var got int
		require.NoError(b, pool.QueryRow(ctx, `SELECT count(*) FROM pg_logical_slot_get_binary_changes($1, NULL, NULL,
'proto_version', '1', 'publication_names', $2, 'messages', $3)`, name, name, fmt.Sprint(messages)).Scan(&got))
		require.Greater(b, got, 0)
		return n / time.Since(start).Seconds()
	}
	rows := decode(cdc.SlotSpec{Tables: []string{"ob"}}, func() {
		for range 100 {
			_, err := pool.Exec(ctx, `INSERT INTO ob (id, key, topic, payload) SELECT gen_random_uuid(), 'k' || (i % 20000), 'topic', decode(repeat('00', 100), 'hex') FROM generate_series(1, 1000) i`)
			require.NoError(b, err)
		}
	}, false)
	e, err := cdc.NewEmitter()
	require.NoError(b, err)
	msgs := func(packed bool) func() {
		return func() {
			for i := 0; i < n; i += 1000 {
				ms := make([]outbox.Message, 1000)
				for j := range ms {
					ms[j] = outbox.Message{Topic: "topic", Key: fmt.Sprint("k", (i+j)%20000), Payload: make([]byte, 100)}
				}
				require.NoError(b, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
					if packed {
						_, err := e.EnqueueBatch(ctx, tx, ms)
						return err
					}
					for _, m := range ms {
						if _, err := e.Enqueue(ctx, tx, m); err != nil {
							return err
						}
					}
					return nil
				}))
			}
		}
	}
	single := decode(cdc.SlotSpec{}, msgs(false), true)
	packed := decode(cdc.SlotSpec{}, msgs(true), true)
	b.Logf("server-side decoding: table inserts %.0f msg/s, one message per outbox message %.0f msg/s, packed messages %.0f msg/s", rows, single, packed)
}

// BenchmarkSyncApply: rows inserted into the source in one statement reach
// the target through the sync (decoded, batched, upserted with the version
// guard), against copying the same rows with INSERT … SELECT between the
// same two tables' databases... here the same database, the cheapest copy
// there is; two interleaved rounds.
//
// Not goals, they bound the ratio: the same rows as one version-guarded
// upsert (what the apply alone costs the target), and the same insert read
// from a slot of its own by a bare receive loop that applies nothing (what
// the WAL sender alone takes from the commit to the last row, with the
// sync's pgoutput options).
func BenchmarkSyncApply(b *testing.B) {
	ctx := tctx(b, 10*time.Minute)
	srcURL, src := logicalDB(b)
	const n = 100_000
	var syncT, baseT, upT, sendT time.Duration
	for round := range 2 {
		srcT, dstT, baseTbl, upTbl, rawTbl := fmt.Sprint("src", round), fmt.Sprint("dst", round), fmt.Sprint("base", round), fmt.Sprint("up", round), fmt.Sprint("raw", round)
		for _, t := range []string{srcT, dstT, baseTbl, upTbl, rawTbl} {
			_, err := src.Exec(ctx, `CREATE TABLE `+t+` (id bigint PRIMARY KEY, v bigint NOT NULL, name text, payload text)`)
			require.NoError(b, err)
		}
		name := dimmertest.Name("sync_")
		s, err := cdc.NewSync(srcURL, src, cdc.SyncConfig{Name: name, Source: backfill.Table{Name: srcT}, Target: backfill.Table{Name: dstT},
			VersionColumn: "v", Logger: quiet(b)})
		require.NoError(b, err)
		sctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- s.Run(sctx) }()
		for !s.Streaming() {
			time.Sleep(time.Millisecond)
		}
		var end string
		_, err = src.Exec(ctx, `INSERT INTO `+srcT+` SELECT i, 1, 'name ' || i, repeat('p', 100) FROM generate_series(1, $1) i`, n)
		require.NoError(b, err)
		require.NoError(b, src.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&end))
		start := time.Now()
		endLSN, err := pglogrepl.ParseLSN(end)
		require.NoError(b, err)
		for {
			applied, err := pglogrepl.ParseLSN(s.Applied())
			require.NoError(b, err)
			if applied >= endLSN {
				break
			}
			time.Sleep(time.Millisecond)
		}
		syncT += time.Since(start)
		cancel()
		require.ErrorIs(b, <-done, context.Canceled)
		require.NoError(b, cdc.DropSlot(ctx, src, "", name, true))
		require.Equal(b, n, count(b, src, `SELECT count(*) FROM `+dstT))

		sendT += walSenderAlone(b, ctx, srcURL, src, rawTbl, n)

		start = time.Now()
		_, err = src.Exec(ctx, `INSERT INTO `+baseTbl+` SELECT * FROM `+srcT)
		require.NoError(b, err)
		baseT += time.Since(start)

		// What the apply alone costs the server: the same rows as one
		// version-guarded upsert (not a goal; it bounds the ratio).
		start = time.Now()
		_, err = src.Exec(ctx, `INSERT INTO `+upTbl+` AS t SELECT * FROM `+srcT+` ON CONFLICT (id) DO UPDATE
SET v = EXCLUDED.v, name = EXCLUDED.name, payload = EXCLUDED.payload WHERE t.v <= EXCLUDED.v`)
		require.NoError(b, err)
		upT += time.Since(start)
	}
	syncRate, baseRate, upRate, sendRate := 2*n/syncT.Seconds(), 2*n/baseT.Seconds(), 2*n/upT.Seconds(), 2*n/sendT.Seconds()
	b.Logf("sync applied %.0f rows/s, INSERT … SELECT %.0f rows/s, the same as a version-guarded upsert %.0f rows/s (%.2fx)",
		syncRate, baseRate, upRate, upRate/baseRate)
	b.Logf("the WAL sender alone (commit to last row received, nothing applied) %.0f rows/s: %.2fx INSERT … SELECT, the most the sync could reach; the sync reached %.2f of it",
		sendRate, sendRate/baseRate, syncRate/sendRate)
	benchgoal.Report(b, "cdc_sync_apply_vs_insert_select", syncRate/baseRate, "x", benchgoal.AtLeast, 0.5)
}

// BenchmarkSyncLag: a steady 2,000 single-row writes/s (inserts and
// updates, each its own transaction, from four writers) for 3 s; the lag of
// each change from its commit to its apply on the target.
func BenchmarkSyncLag(b *testing.B) {
	ctx := tctx(b, 5*time.Minute)
	srcURL, src := logicalDB(b)
	for _, t := range []string{"src", "dst"} {
		_, err := src.Exec(ctx, `CREATE TABLE `+t+` (id bigint PRIMARY KEY, v bigint NOT NULL, name text)`)
		require.NoError(b, err)
	}
	var mu sync.Mutex
	var lags []time.Duration
	name := dimmertest.Name("sync_")
	s, err := cdc.NewSync(srcURL, src, cdc.SyncConfig{Name: name, Source: backfill.Table{Name: "src"}, Target: backfill.Table{Name: "dst"},
		VersionColumn: "v", Logger: quiet(b), OnApplied: func(batch []cdc.Change, at time.Time) {
			mu.Lock()
			defer mu.Unlock()
			for _, c := range batch {
				lags = append(lags, at.Sub(c.CommitTime))
			}
		}})
	require.NoError(b, err)
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.Run(sctx) }()
	defer func() {
		cancel()
		<-done
		require.NoError(b, cdc.DropSlot(context.Background(), src, "", name, true))
	}()
	for !s.Streaming() {
		time.Sleep(time.Millisecond)
	}
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(2 * time.Millisecond) // 500/s per writer
			defer tick.Stop()
			for i := range 1500 {
				<-tick.C
				id := int64(w*100000 + i%300)
				_, err := src.Exec(ctx, `INSERT INTO src VALUES ($1, 1, 'x') ON CONFLICT (id) DO UPDATE SET v = src.v + 1`, id)
				require.NoError(b, err)
			}
		}()
	}
	wg.Wait()
	require.Eventually(b, func() bool { mu.Lock(); defer mu.Unlock(); return len(lags) >= 6000 }, time.Minute, 5*time.Millisecond)
	mu.Lock()
	slices.Sort(lags)
	p50, p99 := lags[len(lags)/2], lags[len(lags)*99/100]
	mu.Unlock()
	b.Logf("sync lag at 2,000 writes/s: p50 %v, p99 %v", p50, p99)
	benchgoal.Report(b, "cdc_sync_lag_p99", float64(p99)/float64(time.Millisecond), "ms", benchgoal.AtMost, 100)
}

// walSenderAlone times, after an n-row single-statement insert into table
// commits, how long the WAL sender takes to send every row to a bare
// receive loop on a slot of its own, read with the sync's options
// (pgoutput protocol 1, binary values).
func walSenderAlone(b *testing.B, ctx context.Context, url string, pool *pgxpool.Pool, table string, n int) time.Duration {
	name := dimmertest.Name("raw_")
	require.NoError(b, cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: name, Tables: []string{table}}))
	defer func() { require.NoError(b, cdc.DropSlot(ctx, pool, "", name, true)) }()
	cfg, err := pgconn.ParseConfig(url)
	require.NoError(b, err)
	cfg.RuntimeParams["replication"] = "database"
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	require.NoError(b, err)
	defer conn.Close(context.WithoutCancel(ctx))
	require.NoError(b, pglogrepl.StartReplication(ctx, conn, name, 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names '" + name + "'", "binary 'true'"}}))
	done := make(chan error, 1)
	go func() {
		rows := 0
		for {
			raw, err := conn.ReceiveMessage(ctx)
			if err != nil {
				done <- err
				return
			}
			cd, ok := raw.(*pgproto3.CopyData)
			if !ok || len(cd.Data) < 1 || cd.Data[0] != pglogrepl.XLogDataByteID {
				continue
			}
			xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
			if err != nil {
				done <- err
				return
			}
			switch xld.WALData[0] {
			case 'I':
				rows++
			case 'C':
				if rows != n {
					done <- fmt.Errorf("%d rows sent, want %d", rows, n)
				}
				done <- nil
				return
			}
		}
	}()
	_, err = pool.Exec(ctx, `INSERT INTO `+table+` SELECT i, 1, 'name ' || i, repeat('p', 100) FROM generate_series(1, $1) i`, n)
	require.NoError(b, err)
	start := time.Now()
	require.NoError(b, <-done)
	return time.Since(start)
}
