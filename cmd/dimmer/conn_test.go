package main

import (
	"context"
	"io"
	"net"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
)

// muteServer accepts connections on loopback and never answers.
func muteServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			_ = c.Close()
		}
	})
	return ln.Addr().String()
}

// A server that accepts and never answers costs --timeout, not minutes, and
// the error names the store. go-redis prints nothing of its own.
func TestCLIMuteServerTimesOut(t *testing.T) {
	addr := muteServer(t)
	// go-redis's own logger writes to the process's stderr: catch it.
	r, w, err := os.Pipe()
	require.NoError(t, err)
	realStderr := os.Stderr
	os.Stderr = w
	var leaked []byte
	done := make(chan struct{})
	go func() { leaked, _ = io.ReadAll(r); close(done) }()
	defer func() {
		os.Stderr = realStderr
	}()

	for _, tc := range []struct {
		args []string
		name string
	}{
		{[]string{"--store", "postgres://u@" + addr + "/db", "stage", "get", "orders"}, "flag store --store postgres://u@" + addr},
		{[]string{"--store", "host=127.0.0.1 port=" + addr[len("127.0.0.1:"):] + " user=u", "status"}, "flag store --store host=127.0.0.1"},
		{[]string{"--store", "redis://" + addr + "/0", "stage", "get", "orders"}, "flag store --store redis://" + addr},
		{[]string{"outbox", "status", "--db", "postgres://u@" + addr + "/db"}, "outbox database --db"},
		{[]string{"backfill", "status", "--db", "postgres://u@" + addr + "/db"}, "backfill database --db"},
		{[]string{"schema", "status", "--db", "postgres://u@" + addr + "/db"}, "schema database --db"},
		{[]string{"cdc", "status", "--db", "postgres://u@" + addr + "/db"}, "source database --db"},
		{[]string{"cdc", "drop", "s1", "--db", "postgres://u@" + addr + "/db"}, "source database --db"},
	} {
		start := time.Now()
		res := dimmer(t, nil, append([]string{"--timeout", "1s"}, tc.args...)...)
		took := time.Since(start)
		assert.Equal(t, exitError, res.code, "%v: %s", tc.args, res.stderr)
		assert.Less(t, took, 4*time.Second, "%v: a mute server must cost about --timeout", tc.args)
		assert.Contains(t, res.stderr, tc.name, "%v: the error names the store", tc.args)
		assert.Contains(t, res.stderr, "not reachable within --timeout 1s", "%v", tc.args)
	}
	// Kafka: a broker that accepts and never answers.
	_, schema := dimmertest.Schema(t)
	// Both clusters mute: they are asked at once, so the command costs
	// one --timeout, not one per cluster.
	for _, args := range [][]string{
		{"stream", "status", "orders", "--old-brokers", addr, "--new-brokers", addr},
		{"stream", "lag", "orders", "--group", "g", "--old-brokers", addr, "--new-brokers", addr},
		{"stream", "translate", "orders", "--group", "g", "--old-brokers", addr, "--new-brokers", addr},
		{"stream", "replay", "orders", "--group", "g", "--side", "new", "--from-offset", "0", "--old-brokers", addr, "--new-brokers", addr},
		{"outbox", "relay", "--brokers", addr, "--db", dimmertest.PostgresURL(), "--schema", schema, "--buckets", "4"},
	} {
		start := time.Now()
		res := dimmer(t, nil, append([]string{"--timeout", "1s"}, args...)...)
		took := time.Since(start)
		assert.Equal(t, exitError, res.code, "%v: %s", args, res.stderr)
		assert.Less(t, took, 1900*time.Millisecond, "%v: a mute broker must cost about --timeout", args)
		if args[0] == "stream" && args[1] != "replay" {
			assert.Contains(t, res.stderr, "old cluster "+addr+": not reachable within --timeout 1s", args)
			assert.Contains(t, res.stderr, "new cluster "+addr+": not reachable within --timeout 1s", args)
		}
	}
	res := dimmer(t, nil, "--timeout", "0s", "--store", "redis://"+addr, "stage", "get", "orders")
	assert.Equal(t, exitUsage, res.code)

	os.Stderr = realStderr
	require.NoError(t, w.Close())
	<-done
	assert.Empty(t, string(leaked), "nothing may bypass the CLI's logger")
}

// A statement that waits (here on the flag store's install lock, held by
// another session) is cancelled by the server after --timeout.
func TestCLIStatementTimeout(t *testing.T) {
	t.Parallel()
	pool, schema := dimmertest.Schema(t)
	conn, err := pool.Acquire(context.Background())
	require.NoError(t, err)
	defer conn.Release()
	_, err = conn.Exec(context.Background(), `SELECT pg_advisory_lock(hashtextextended($1, 0))`, "dimmer/pgflags/install/"+schema)
	require.NoError(t, err)
	defer func() {
		_, _ = conn.Exec(context.Background(), `SELECT pg_advisory_unlock_all()`)
	}()
	start := time.Now()
	r := dimmer(t, []string{"--timeout", "1s", "--store", dimmertest.PostgresURL(), "--schema", schema}, "stage", "set", "orders", "dualwrite", "--reason", "go")
	assert.Equal(t, exitError, r.code, r.stderr)
	assert.Less(t, time.Since(start), 5*time.Second)
	assert.Contains(t, r.stderr, "statement timeout")
}

// A server that answers with a refusal (no such database, an out-of-range
// Redis database) is not called unreachable: the network is fine.
func TestCLIRefusedIsNotUnreachable(t *testing.T) {
	t.Parallel()
	u, err := url.Parse(dimmertest.PostgresURL())
	require.NoError(t, err)
	u.Path = "/" + dimmertest.Name("nodb_")
	ru, err := url.Parse(dimmertest.RedisURL())
	require.NoError(t, err)
	ru.Path = "/99" // past the default 16 databases
	for _, store := range []string{u.String(), ru.String()} {
		r := dimmer(t, nil, "--store", store, "stage", "get", "orders")
		assert.Equal(t, exitError, r.code, r.stderr)
		assert.Contains(t, r.stderr, "the server refused the connection", store)
		assert.NotContains(t, r.stderr, "not reachable", store)
	}
}
