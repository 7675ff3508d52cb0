package dimmertest

import (
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
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

// URL is u (a URL of the target) with its host replaced by the proxy's.
func (p *HangingProxy) URL(t testing.TB, u string) string {
	t.Helper()
	pu, err := url.Parse(u)
	if err != nil {
		t.Fatalf("hanging proxy: %v", err)
	}
	pu.Host = p.Addr()
	return pu.String()
}

// Hang stops all forwarding, for good.
func (p *HangingProxy) Hang() { p.hung.Store(true) }

// Close closes the listener and every connection: a client's next read
// fails at once. Clients that close after a cancelled statement (pgx gives
// such a connection 15 s) should be closed after the proxy.
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
