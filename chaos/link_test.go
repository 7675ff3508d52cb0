package chaos_test

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/chaos"
	"github.com/dimmer-dev/dimmer/dimmertest"
)

// echoServer is a real TCP server on loopback that writes back what it reads.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, _ = io.Copy(c, c)
				_ = c.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

func newLink(t *testing.T, upstream string) *chaos.Link {
	t.Helper()
	l, err := chaos.NewLink(context.Background(), upstream)
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	return l
}

// roundTrip writes msg and reads it back, failing after timeout.
func roundTrip(c net.Conn, msg []byte, timeout time.Duration) error {
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	_, err := io.ReadFull(c, buf)
	return err
}

func dial(t *testing.T, l *chaos.Link) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", l.Addr(), time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestLinkPassesBytesAndAddsLatency(t *testing.T) {
	t.Parallel()
	l := newLink(t, echoServer(t))
	c := dial(t, l)

	start := time.Now()
	require.NoError(t, roundTrip(c, []byte("ping"), time.Second))
	assert.Less(t, time.Since(start), 50*time.Millisecond, "a healthy link adds no delay")

	require.NoError(t, l.SetLatency(150*time.Millisecond, 20*time.Millisecond))
	assert.Equal(t, []string{"latency 150ms±20ms"}, l.Faults())
	start = time.Now()
	require.NoError(t, roundTrip(c, []byte("slow"), 2*time.Second), "latency applies to an open connection")
	took := time.Since(start)
	assert.GreaterOrEqual(t, took, 120*time.Millisecond)
	assert.Less(t, took, time.Second)

	require.NoError(t, l.SetLatency(0, 0))
	start = time.Now()
	require.NoError(t, roundTrip(c, []byte("fast"), time.Second))
	assert.Less(t, time.Since(start), 50*time.Millisecond)
	assert.Empty(t, l.Faults())
}

func TestLinkBlackholeHangsReadsUntilHealed(t *testing.T) {
	t.Parallel()
	l := newLink(t, echoServer(t))
	c := dial(t, l)
	require.NoError(t, roundTrip(c, []byte("a"), time.Second))

	require.NoError(t, l.Blackhole(true))
	err := roundTrip(c, []byte("b"), 300*time.Millisecond)
	var ne net.Error
	require.ErrorAs(t, err, &ne, "an open connection hangs")
	assert.True(t, ne.Timeout())

	// New connections are accepted, then hang too.
	c2 := dial(t, l)
	err = roundTrip(c2, []byte("c"), 300*time.Millisecond)
	require.ErrorAs(t, err, &ne)
	assert.True(t, ne.Timeout())

	require.NoError(t, l.Heal())
	assert.Empty(t, l.Faults())
	c3 := dial(t, l)
	require.NoError(t, roundTrip(c3, []byte("d"), time.Second), "a new connection works after healing")
	// The blackholed connection was dropped when the partition ended.
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	_, err = c.Read(make([]byte, 1))
	assert.Error(t, err)
}

func TestLinkRefuseAndReset(t *testing.T) {
	t.Parallel()
	l := newLink(t, echoServer(t))
	c := dial(t, l)
	require.NoError(t, roundTrip(c, []byte("x"), time.Second))

	require.NoError(t, l.Reset())
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	_, err := c.Read(make([]byte, 1))
	require.Error(t, err, "Reset closes open connections")
	require.NoError(t, roundTrip(dial(t, l), []byte("y"), time.Second), "and accepts new ones")

	require.NoError(t, l.Refuse(true))
	assert.Equal(t, []string{"refusing connections"}, l.Faults())
	_, err = net.DialTimeout("tcp", l.Addr(), time.Second)
	require.ErrorIs(t, err, syscall.ECONNREFUSED)

	require.NoError(t, l.Refuse(false))
	require.NoError(t, roundTrip(dial(t, l), []byte("z"), time.Second), "listening again on the same address")
}

func TestLinkResetPeerAndTimeout(t *testing.T) {
	t.Parallel()
	l := newLink(t, echoServer(t))
	require.NoError(t, l.ResetPeer(true))
	err := roundTrip(dial(t, l), []byte("x"), time.Second)
	require.Error(t, err)
	assert.False(t, isTimeout(err), "a reset fails fast, it does not hang: %v", err)
	require.NoError(t, l.ResetPeer(false))
	require.NoError(t, roundTrip(dial(t, l), []byte("y"), time.Second))

	require.NoError(t, l.Timeout(200*time.Millisecond))
	c := dial(t, l)
	start := time.Now()
	err = roundTrip(c, []byte("z"), 3*time.Second)
	require.Error(t, err)
	assert.False(t, isTimeout(err), "the link closed the connection before the client gave up: %v", err)
	assert.GreaterOrEqual(t, time.Since(start), 150*time.Millisecond)
	require.NoError(t, l.Heal())
	require.NoError(t, roundTrip(dial(t, l), []byte("w"), time.Second))
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestLinkLimitsBandwidth(t *testing.T) {
	t.Parallel()
	l := newLink(t, echoServer(t))
	c := dial(t, l)
	msg := make([]byte, 32<<10)
	require.NoError(t, l.LimitBandwidth(64)) // 64 KB/s each way: 32 KB takes ~0.5 s
	start := time.Now()
	require.NoError(t, roundTrip(c, msg, 5*time.Second))
	took := time.Since(start)
	assert.GreaterOrEqual(t, took, 350*time.Millisecond)
	require.NoError(t, l.LimitBandwidth(0))
	start = time.Now()
	require.NoError(t, roundTrip(c, msg, 5*time.Second))
	assert.Less(t, time.Since(start), 200*time.Millisecond)
}

func TestLinkValidatesAndCloses(t *testing.T) {
	t.Parallel()
	_, err := chaos.NewLink(context.Background(), "nohostport")
	require.ErrorContains(t, err, `upstream "nohostport" is not host:port`)

	l := newLink(t, echoServer(t))
	require.ErrorContains(t, l.SetLatency(time.Millisecond, time.Second), "jitter <= latency")
	require.ErrorContains(t, l.LimitBandwidth(-1), "rate must be >= 0")
	require.ErrorContains(t, l.Timeout(-time.Second), "must be >= 0")

	require.NoError(t, l.Close())
	require.NoError(t, l.Close(), "Close is idempotent")
	require.ErrorIs(t, l.Blackhole(true), chaos.ErrClosed)
	_, err = net.DialTimeout("tcp", l.Addr(), time.Second)
	require.Error(t, err, "a closed link does not listen")
}

func TestThroughLinkRewritesURLs(t *testing.T) {
	t.Parallel()
	l := newLink(t, "127.0.0.1:5432")
	got, err := chaos.ThroughLink("postgres://u:p@localhost:5432/db?sslmode=disable", l)
	require.NoError(t, err)
	assert.Equal(t, "postgres://u:p@"+l.Addr()+"/db?sslmode=disable", got)
	got, err = chaos.ThroughLink("postgresql://127.0.0.1/db", l)
	require.NoError(t, err, "the scheme's default port")
	assert.Equal(t, "postgresql://"+l.Addr()+"/db", got)

	_, err = chaos.ThroughLink("redis://127.0.0.1:6379/0", l)
	require.ErrorContains(t, err, "is not the link's upstream 127.0.0.1:5432")
	_, err = chaos.ThroughLink("mysql://127.0.0.1:5432/x", l)
	require.ErrorContains(t, err, `scheme "mysql"`)
	_, err = chaos.ThroughLink("postgres://h1:5432,h2:5432/x", l)
	require.ErrorContains(t, err, "several hosts")

	up, err := chaos.UpstreamOf("redis://localhost/3")
	require.NoError(t, err)
	assert.Equal(t, "localhost:6379", up)
}

// The link carries real protocols: Postgres and Redis clients work through
// it, and see the faults as they would in production.
func TestLinkCarriesPostgresAndRedis(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	pgUp, err := chaos.UpstreamOf(dimmertest.PostgresURL())
	require.NoError(t, err)
	pl := newLink(t, pgUp)
	pgURL, err := chaos.ThroughLink(dimmertest.PostgresURL(), pl)
	require.NoError(t, err)
	conn, err := pgx.Connect(ctx, pgURL)
	if err != nil {
		dimmertest.Unavailable(t, "PostgreSQL through a link", err)
	}
	defer conn.Close(context.Background())
	var one int
	require.NoError(t, conn.QueryRow(ctx, "SELECT 1").Scan(&one))
	require.NoError(t, pl.Reset())
	err = conn.QueryRow(ctx, "SELECT 1").Scan(&one)
	require.Error(t, err, "the backend connection was reset under pgx")

	client, _ := dimmertest.Redis(t) // skips when Redis is down
	_ = client
	rUp, err := chaos.UpstreamOf(dimmertest.RedisURL())
	require.NoError(t, err)
	rl := newLink(t, rUp)
	opts, err := redis.ParseURL(dimmertest.RedisURL())
	require.NoError(t, err)
	opts.Dialer = rl.Dial // the dial seam, instead of a rewritten URL
	opts.MaxRetries = -1
	// Without it go-redis bounds a command by ReadTimeout (3s), not by ctx.
	opts.ContextTimeoutEnabled = true
	rc := redis.NewClient(opts)
	defer rc.Close()
	require.NoError(t, rc.Ping(ctx).Err())
	require.NoError(t, rl.Blackhole(true))
	pctx, pcancel := context.WithTimeout(ctx, 300*time.Millisecond)
	err = rc.Ping(pctx).Err()
	pcancel()
	require.Error(t, err, "PING hangs behind a blackhole")
	require.NoError(t, rl.Heal())
	require.Eventually(t, func() bool { return rc.Ping(ctx).Err() == nil }, 5*time.Second, 20*time.Millisecond)
}
