package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
)

func installOutbox(t *testing.T, buckets int) (*pgxpool.Pool, *outbox.Outbox, []string) {
	t.Helper()
	pool, schema := dimmertest.Schema(t)
	ob, err := outbox.New(outbox.Config{Schema: schema, Buckets: buckets})
	require.NoError(t, err)
	require.NoError(t, ob.Install(context.Background(), pool))
	return pool, ob, []string{"--db", dimmertest.PostgresURL(), "--schema", schema}
}

func pendingRows(t *testing.T, pool *pgxpool.Pool, ob *outbox.Outbox) int64 {
	t.Helper()
	s, err := ob.Stats(context.Background(), pool, "")
	require.NoError(t, err)
	return s.Pending
}

// TestOutboxRelayCommand runs `dimmer outbox relay` in-process against an
// in-process Kafka cluster: it delivers what services enqueued, each key in
// order, and a signal (the cancelled command context) stops it gracefully:
// exit 0, leases handed back.
func TestOutboxRelayCommand(t *testing.T) {
	t.Parallel()
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1))
	require.NoError(t, err)
	t.Cleanup(cluster.Close)
	seeds := cluster.ListenAddrs()
	admin, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	require.NoError(t, err)
	defer admin.Close()
	ctx, cancelAll := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancelAll()
	created, err := kadm.NewClient(admin).CreateTopic(ctx, 4, 1, nil, "orders")
	require.NoError(t, err)
	require.NoError(t, created.Err)

	pool, ob, db := installOutbox(t, 8)
	var want []string
	for i := range 40 {
		key := fmt.Sprint("order-", i%5)
		_, err := ob.EnqueuePool(ctx, pool, outbox.Message{Topic: "orders", Key: key, Payload: []byte(fmt.Sprint(i)),
			Headers: map[string]string{"n": fmt.Sprint(i)}})
		require.NoError(t, err)
		want = append(want, key+"="+fmt.Sprint(i))
	}

	sig, signal := context.WithCancel(ctx)
	var out, errOut bytes.Buffer
	exited := make(chan int, 1)
	go func() {
		exited <- run(sig, append(append([]string{"outbox", "relay"}, db...),
			"--brokers", strings.Join(seeds, ","), "--poll", "50ms", "--id", "sidecar-1"), &out, &errOut)
	}()
	require.Eventually(t, func() bool { return pendingRows(t, pool, ob) == 0 }, 30*time.Second, 20*time.Millisecond, "the sidecar drains the outbox")

	// A message enqueued while it runs arrives too (NOTIFY wake-up).
	_, err = ob.EnqueuePool(ctx, pool, outbox.Message{Topic: "orders", Key: "order-0", Payload: []byte("late")})
	require.NoError(t, err)
	want = append(want, "order-0=late")
	require.Eventually(t, func() bool { return pendingRows(t, pool, ob) == 0 }, 10*time.Second, 10*time.Millisecond)

	signal() // SIGTERM: main cancels the command's context
	select {
	case code := <-exited:
		require.Equal(t, exitOK, code, "stdout:\n%s\nstderr:\n%s", out.String(), errOut.String())
	case <-time.After(20 * time.Second):
		t.Fatal("the relay did not exit after the signal")
	}
	assert.Contains(t, out.String(), "relay sidecar-1 stopped; leases released")
	var owned int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM outbox_leases WHERE owner IS NOT NULL`).Scan(&owned))
	assert.Zero(t, owned, "a graceful stop hands every lease back")

	// What Kafka holds: every message, each key in enqueue order.
	consumer, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.ConsumeTopics("orders"), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer consumer.Close()
	perKey := map[string][]string{}
	n := 0
	for n < len(want) {
		fs := consumer.PollFetches(ctx)
		require.NoError(t, ctx.Err(), "consumed %d of %d", n, len(want))
		fs.EachRecord(func(r *kgo.Record) {
			perKey[string(r.Key)] = append(perKey[string(r.Key)], string(r.Key)+"="+string(r.Value))
			n++
		})
	}
	wantPerKey := map[string][]string{}
	for _, w := range want {
		k := w[:strings.Index(w, "=")]
		wantPerKey[k] = append(wantPerKey[k], w)
	}
	assert.Equal(t, wantPerKey, perKey)
}

func TestOutboxRelayCommandUsage(t *testing.T) {
	t.Parallel()
	_, _, db := installOutbox(t, 4)
	for name, args := range map[string][]string{
		"unknown publisher":     append([]string{"outbox", "relay", "--publisher", "nats"}, db...),
		"kafka, no brokers":     append([]string{"outbox", "relay", "--brokers", ""}, db...),
		"redis, no URL":         append([]string{"outbox", "relay", "--publisher", "redis", "--redis", ""}, db...),
		"bad relay config":      append([]string{"outbox", "relay", "--publisher", "redis", "--redis", dimmertest.RedisURL(), "--batch-size", "-1"}, db...),
		"no database":           {"outbox", "status"},
		"not installed":         {"outbox", "status", "--db", dimmertest.PostgresURL(), "--schema", dimmertest.Name("nothing_here_")},
		"argument to relay":     append([]string{"outbox", "relay", "extra"}, db...),
		"bad drain timeout":     append([]string{"outbox", "relay", "--drain-timeout", "0s"}, db...),
		"not a message ID":      append([]string{"outbox", "dead", "retry", "not-a-uuid"}, db...),
		"retry without an ID":   append([]string{"outbox", "dead", "retry"}, db...),
		"empty table":           append([]string{"outbox", "status", "--table", ""}, db...),
		"retry IDs and --all":   append([]string{"outbox", "dead", "retry", "--all", "0190f0a8-0000-7000-8000-000000000000"}, db...),
		"--topic without --all": append([]string{"outbox", "dead", "retry", "--topic", "t", "0190f0a8-0000-7000-8000-000000000000"}, db...),
		"--partitions alone":    append([]string{"outbox", "status", "--partitions", "2"}, db...),
		"--partitions uneven":   append([]string{"outbox", "status", "--buckets", "8", "--partitions", "3"}, db...),
	} {
		t.Run(name, func(t *testing.T) {
			r := dimmer(t, nil, args...)
			assert.Equal(t, exitUsage, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
			assert.NotEmpty(t, r.stderr)
		})
	}
	r := dimmer(t, nil, "outbox", "status", "--db", dimmertest.PostgresURL(), "--schema", dimmertest.Name("nothing_here_"))
	assert.Contains(t, r.stderr, "pass --buckets N to install it here")
}

// TestOutboxDeadCommands: dead letters made by a real relay whose broker
// refuses them are listed, retried and skipped from the CLI.
func TestOutboxDeadCommands(t *testing.T) {
	t.Parallel()
	pool, ob, db := installOutbox(t, 4)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	enq := func(key, payload string) uuid.UUID {
		id, err := ob.EnqueuePool(ctx, pool, outbox.Message{Topic: "payments", Key: key, Payload: []byte(payload), Headers: map[string]string{"h": "v"}})
		require.NoError(t, err)
		return id
	}
	first := enq("acct-1", "poison-1")
	enq("acct-1", "waits")
	second := enq("acct-2", "poison-2")
	refuse := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
		errs := make([]error, len(b))
		for i := range errs {
			errs[i] = errors.New("broker refuses:\nrecord too large")
		}
		return errs
	})
	relay, err := ob.NewRelay(pool, refuse, outbox.RelayConfig{MaxAttempts: 1, PollInterval: 10 * time.Millisecond})
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = relay.Run(ctx) }()
	require.Eventually(t, func() bool {
		d, err := ob.DeadLetters(ctx, pool, "", 10)
		require.NoError(t, err)
		return len(d) == 2
	}, 10*time.Second, 10*time.Millisecond)
	require.NoError(t, relay.Shutdown(ctx))
	<-done

	r := dimmer(t, nil, append([]string{"outbox", "dead", "list"}, db...)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	require.Len(t, lines, 3, r.stdout)
	assert.Regexp(t, `^ID\s+TOPIC\s+KEY\s+ATTEMPTS\s+DEAD AT\s+WAITING\s+LAST ERROR`, lines[0])
	assert.Regexp(t, first.String()+`\s+payments\s+acct-1\s+1\s+\S+\s+1\s+broker refuses: record too large`, r.stdout)
	assert.Regexp(t, second.String()+`\s+payments\s+acct-2\s+1\s+\S+\s+0\s+`, r.stdout)

	r = dimmer(t, nil, append([]string{"outbox", "status"}, db...)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "pending 3 (dead letters included)\ndead 2\n")

	r = dimmer(t, nil, append([]string{"outbox", "dead", "retry", first.String()}, db...)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, first.String()+": pending again\n", r.stdout)
	d, err := ob.DeadLetters(ctx, pool, "", 10)
	require.NoError(t, err)
	require.Len(t, d, 1)
	assert.Equal(t, second, d[0].ID)

	// Its headers were hand-edited into something no broker takes: the
	// record of the skip keeps them as stored.
	_, err = pool.Exec(ctx, `UPDATE `+ob.Config().Schema+`.`+ob.Config().Table+` SET headers = '{"h": 1}' WHERE id = $1`, second)
	require.NoError(t, err)
	r = dimmer(t, nil, append([]string{"outbox", "dead", "skip", second.String()}, db...)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	var rec map[string]any
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &rec), r.stdout)
	assert.Equal(t, second.String(), rec["id"])
	assert.Equal(t, "acct-2", rec["key"])
	assert.Equal(t, base64.StdEncoding.EncodeToString([]byte("poison-2")), rec["payload"])
	assert.Equal(t, `{"h": 1}`, rec["headers_stored"])
	assert.NotContains(t, rec, "headers")
	assert.Contains(t, rec["last_error"], "record too large")
	assert.Equal(t, int64(2), pendingRows(t, pool, ob), "the skipped message is gone; the retried one and its successor wait")

	// Already handled: a clear error, exit 1.
	r = dimmer(t, nil, append([]string{"outbox", "dead", "skip", second.String()}, db...)...)
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "no such dead letter")
	r = dimmer(t, nil, append([]string{"outbox", "dead", "list", "--topic", "other"}, db...)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "no dead letters\n", r.stdout)

	// After an outage every key's head is dead: --all brings them back.
	_, err = pool.Exec(ctx, `UPDATE `+ob.Config().Schema+`.`+ob.Config().Table+` SET dead_at = now(), attempts = 10 WHERE id = $1`, first)
	require.NoError(t, err)
	r = dimmer(t, nil, append([]string{"outbox", "dead", "retry", "--all", "--topic", "other"}, db...)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "0 dead letter(s) pending again\n", r.stdout)
	r = dimmer(t, nil, append([]string{"outbox", "dead", "retry", "--all"}, db...)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "1 dead letter(s) pending again\n", r.stdout)
	d, err = ob.DeadLetters(ctx, pool, "", 10)
	require.NoError(t, err)
	assert.Empty(t, d)
}

// The CLI installs a partitioned outbox; --buckets alone later takes the
// layout installed (it installs only what is missing); another layout is
// refused.
func TestOutboxPartitionedFromCLI(t *testing.T) {
	t.Parallel()
	pool, schema := dimmertest.Schema(t)
	db := []string{"--db", dimmertest.PostgresURL(), "--schema", schema}
	r := dimmer(t, nil, append([]string{"outbox", "status", "--buckets", "8", "--partitions", "4"}, db...)...)
	require.Equal(t, exitOK, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	cfg, err := outbox.Installed(context.Background(), pool, schema, outbox.DefaultTable)
	require.NoError(t, err)
	assert.Equal(t, 4, cfg.Partitions)

	r = dimmer(t, nil, append([]string{"outbox", "status", "--buckets", "8"}, db...)...)
	assert.Equal(t, exitOK, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	// Another layout is a wrong flag, named as such.
	r = dimmer(t, nil, append([]string{"outbox", "status", "--buckets", "8", "--partitions", "2"}, db...)...)
	assert.Equal(t, exitUsage, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	assert.Contains(t, r.stderr, "--buckets 8 --partitions 2: "+schema+".outbox is installed with --buckets 8 --partitions 4")
	r = dimmer(t, nil, append([]string{"outbox", "status", "--buckets", "16"}, db...)...)
	assert.Equal(t, exitUsage, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	assert.Contains(t, r.stderr, "--buckets 16: "+schema+".outbox is installed with --buckets 8 --partitions 4")
	assert.NotContains(t, r.stderr, "Config.")
}
