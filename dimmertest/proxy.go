package dimmertest

import (
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/internal/connstr"
)

// HangingProxy forwards loopback connections to a server until [HangingProxy.Hang];
// from then on it forwards nothing in either direction and answers no new
// connection, like a server that hangs, without closing anything: what a
// client sees of a database or broker that stops answering mid-run.
type HangingProxy struct {
	ln    net.Listener
	hung  atomic.Bool
	mu    sync.Mutex
	conns []net.Conn
}

// NewHangingProxy listens on 127.0.0.1 and forwards to target (host:port);
// everything is closed when the test ends.
func NewHangingProxy(t testing.TB, target string) *HangingProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("hanging proxy: %v", err)
	}
	p := &HangingProxy{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.track(c)
			if p.hung.Load() {
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
	t.Cleanup(p.Close)
	return p
}

// Addr is the proxy's host:port.
func (p *HangingProxy) Addr() string { return p.ln.Addr().String() }

// HangingPool opens a pool on DIMMER_POSTGRES_URL's database through a
// [HangingProxy] of its own, with search_path set to schema (unless ""). It
// connects lazily, so a proxy hung at once is a database that never
// answered. When the test ends the proxy is closed before the pool: pgx
// gives a connection whose statement was cancelled 15 s to close on a
// server that does not answer.
func HangingPool(t testing.TB, schema string) (*HangingProxy, *pgxpool.Pool) {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(PostgresURL())
	if err != nil {
		t.Fatalf("DIMMER_POSTGRES_URL: %v", connstr.ParseError(err))
	}
	p := NewHangingProxy(t, net.JoinHostPort(cfg.ConnConfig.Host, strconv.Itoa(int(cfg.ConnConfig.Port))))
	host, port, _ := net.SplitHostPort(p.Addr())
	portN, _ := strconv.Atoi(port)
	cfg.ConnConfig.Host, cfg.ConnConfig.Port = host, uint16(portN)
	cfg.ConnConfig.Fallbacks = nil
	if schema != "" {
		cfg.ConnConfig.RuntimeParams["search_path"] = schema
	}
	pool, err := pgxpool.NewWithConfig(ctx(t), cfg)
	if err != nil {
		t.Fatalf("open pool: %v", err)
	}
	t.Cleanup(func() {
		p.Close()
		pool.Close()
	})
	return p, pool
}

// Hang stops all forwarding, for good.
func (p *HangingProxy) Hang() { p.hung.Store(true) }

// Close closes the listener and every connection: a client's next read
// fails at once.
func (p *HangingProxy) Close() {
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

func (p *HangingProxy) track(c net.Conn) {
	p.mu.Lock()
	p.conns = append(p.conns, c)
	p.mu.Unlock()
}

// pipe copies until the proxy hangs, then stops reading: what was sent
// stays unanswered.
func (p *HangingProxy) pipe(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if p.hung.Load() {
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
