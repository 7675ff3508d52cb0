package outbox_test

import (
	"context"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
)

// muteProxy forwards loopback connections to the test server until it is
// muted; from then on it accepts and forwards nothing, in either direction,
// like a server that hangs.
type muteProxy struct {
	ln    net.Listener
	mute  atomic.Bool
	mu    sync.Mutex
	conns []net.Conn
}

func newMuteProxy(t *testing.T, target string) *muteProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &muteProxy{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.track(c)
			if p.mute.Load() {
				continue // held open, never answered
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.track(up)
			go p.pipe(up, c)
			go p.pipe(c, up)
		}
	}()
	t.Cleanup(p.closeAll)
	return p
}

func (p *muteProxy) closeAll() {
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

func (p *muteProxy) track(c net.Conn) {
	p.mu.Lock()
	p.conns = append(p.conns, c)
	p.mu.Unlock()
}

// pipe copies until muted, then stops reading: the bytes sent stay unanswered.
func (p *muteProxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if p.mute.Load() {
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// poolThrough opens a pool on the test database through the proxy.
func (p *muteProxy) poolThrough(t *testing.T) *pgxpool.Pool {
	u, err := url.Parse(dimmertest.PostgresURL())
	require.NoError(t, err)
	u.Host = p.ln.Addr().String()
	pool, err := pgxpool.New(context.Background(), u.String())
	require.NoError(t, err)
	t.Cleanup(func() {
		// The proxy's connections go first: pgx gives a connection whose
		// statement was cancelled 15 s to close on a server that hangs.
		p.closeAll()
		pool.Close()
	})
	return pool
}

// TestShutdownBoundedOnMuteDatabase: Shutdown returns about when its ctx
// ends although the database stopped answering, whether it hung from the
// start (Run still checking the layout) or mid-run (the relay's next
// statement, and the release of its leases, get no answer).
func TestShutdownBoundedOnMuteDatabase(t *testing.T) {
	t.Parallel()
	_, o := setup(t, outbox.Config{Buckets: 4})
	target, err := url.Parse(dimmertest.PostgresURL())
	require.NoError(t, err)
	pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error { return make([]error, len(b)) })

	for _, muteFromStart := range []bool{true, false} {
		p := newMuteProxy(t, target.Host)
		p.mute.Store(muteFromStart)
		pool := p.poolThrough(t)
		r, err := o.NewRelay(pool, pub, outbox.RelayConfig{PollInterval: 20 * time.Millisecond, Logger: quiet(t)})
		require.NoError(t, err)
		ran := make(chan error, 1)
		go func() { ran <- r.Run(context.Background()) }()
		if muteFromStart {
			time.Sleep(100 * time.Millisecond) // Run waits on its first statement
		} else {
			require.Eventually(t, func() bool { return len(r.Buckets()) == 4 }, 10*time.Second, 5*time.Millisecond)
			p.mute.Store(true)
			time.Sleep(100 * time.Millisecond) // the relay's next statements go unanswered
		}
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		start := time.Now()
		shut := make(chan error, 1)
		go func() { shut <- r.Shutdown(ctx) }()
		select {
		case err = <-shut:
		case <-time.After(10 * time.Second):
			t.Fatalf("Shutdown blocked past its ctx (mute from start: %v)", muteFromStart)
		}
		took := time.Since(start)
		cancel()
		t.Logf("mute from start %v: Shutdown took %v (%v)", muteFromStart, took, err)
		if !muteFromStart {
			assert.ErrorIs(t, err, context.DeadlineExceeded, "the batch in flight never completed")
		}
		// ctx (0.5s), pgx's cut of a cancelled statement (1s), the release's grace (1s).
		assert.Less(t, took, 3500*time.Millisecond, "mute from start: %v", muteFromStart)
		select {
		case <-ran:
		case <-time.After(5 * time.Second):
			t.Fatalf("Run did not return after Shutdown (mute from start: %v)", muteFromStart)
		}
	}

	// Shutdown before Run got going: Run stops at once rather than wait
	// on the database for ever.
	p := newMuteProxy(t, target.Host)
	p.mute.Store(true)
	r, err := o.NewRelay(p.poolThrough(t), pub, outbox.RelayConfig{Logger: quiet(t)})
	require.NoError(t, err)
	require.NoError(t, r.Shutdown(context.Background()))
	ran := make(chan error, 1)
	go func() { ran <- r.Run(context.Background()) }()
	select {
	case err := <-ran:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Run after Shutdown waited on a mute database")
	}
}
