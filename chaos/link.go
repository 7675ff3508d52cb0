package chaos

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/rs/zerolog"
)

// ErrClosed is returned by every fault switch of a closed [Link].
var ErrClosed = errors.New("chaos: link closed")

// Toxic names used on the embedded proxy. One name per fault and direction so
// switching a fault again updates it in place instead of stacking a second one.
const (
	toxicLatency   = "latency"
	toxicBlackUp   = "blackhole_up"
	toxicBlackDown = "blackhole_down"
	toxicBWUp      = "bandwidth_up"
	toxicBWDown    = "bandwidth_down"
	toxicTimeout   = "timeout"
	toxicResetPeer = "reset_peer"
)

var linkSeq atomic.Uint64

// quietOnce raises zerolog's global level to Info once: toxiproxy's
// bandwidth toxic logs every interruption at Trace level through zerolog's
// global logger, which would otherwise spray JSON over test output.
var quietOnce sync.Once

func quiet() {
	quietOnce.Do(func() {
		if zerolog.GlobalLevel() < zerolog.InfoLevel {
			zerolog.SetGlobalLevel(zerolog.InfoLevel)
		}
	})
}

// Link is a TCP proxy on 127.0.0.1 in front of one upstream address (a
// Postgres, Redis or Kafka server), whose faults are switched at run time.
// Clients connect to [Link.Addr] instead of the upstream; with no fault
// switched on, bytes pass unchanged.
//
// A Link is safe for concurrent use. Faults combine: latency and a bandwidth
// limit can be on together, a blackhole on top of them stops everything.
type Link struct {
	upstream string
	addr     string

	mu       sync.Mutex // serialises fault switches; the proxy has its own locks
	proxy    *toxiproxy.Proxy
	refusing bool
	closed   bool
	active   map[string]string // toxic name -> fault description
}

// NewLink starts a link listening on an ephemeral port of 127.0.0.1 that
// forwards every accepted connection to upstream ("host:port"). The upstream
// is dialled per accepted connection, not now, so a link may be created
// before its server is up.
func NewLink(ctx context.Context, upstream string) (*Link, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	host, port, err := net.SplitHostPort(upstream)
	if err != nil || host == "" || port == "" {
		return nil, fmt.Errorf("chaos: upstream %q is not host:port: %v", upstream, err)
	}
	quiet()
	// The proxy logs every accepted connection; tests and services have their
	// own logs, so the embedded server stays quiet.
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	name := fmt.Sprintf("chaos-%d", linkSeq.Add(1))
	p := toxiproxy.NewProxy(server, name, "127.0.0.1:0", upstream)
	nop := zerolog.Nop()
	p.Logger = &nop
	if err := p.Start(); err != nil {
		return nil, fmt.Errorf("chaos: start link to %s: %w", upstream, err)
	}
	return &Link{
		upstream: upstream,
		addr:     p.Listen, // the real port, written by Start before it returns
		proxy:    p,
		active:   map[string]string{},
	}, nil
}

// Addr is the "127.0.0.1:port" clients dial instead of the upstream. It stays
// the same for the link's life, across [Link.Refuse] and [Link.Reset].
func (l *Link) Addr() string { return l.addr }

// Upstream is the address the link forwards to.
func (l *Link) Upstream() string { return l.upstream }

// Dial connects to the link whatever address it is given, so it fits every
// client's dial seam: pgconn.Config.DialFunc, redis.Options.Dialer and
// kgo.Dialer all have this signature. Use it when the client learns
// addresses it would otherwise dial directly (a Kafka broker advertises its
// own address in metadata).
func (l *Link) Dial(ctx context.Context, network, _ string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, network, l.addr)
}

func (l *Link) setToxic(name, typ, stream string, attrs any, what string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	body := map[string]any{"name": name, "type": typ, "stream": stream, "toxicity": 1.0, "attributes": attrs}
	raw, err := json.Marshal(body)
	if err != nil {
		return err
	}
	if l.proxy.Toxics.GetToxic(name) != nil {
		_, err = l.proxy.Toxics.UpdateToxicJson(name, bytes.NewReader(raw))
	} else {
		_, err = l.proxy.Toxics.AddToxicJson(bytes.NewReader(raw))
	}
	if err != nil {
		return fmt.Errorf("chaos: set %s on link to %s: %w", what, l.upstream, err)
	}
	l.active[name] = what
	return nil
}

func (l *Link) removeToxics(names ...string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	return l.removeLocked(names...)
}

func (l *Link) removeLocked(names ...string) error {
	for _, n := range names {
		if _, ok := l.active[n]; !ok {
			continue
		}
		if err := l.proxy.Toxics.RemoveToxic(context.Background(), n); err != nil {
			return fmt.Errorf("chaos: remove %s from link to %s: %w", n, l.upstream, err)
		}
		delete(l.active, n)
	}
	return nil
}

// SetLatency delays every chunk the upstream sends back by d, give or take
// jitter (uniform in [d-jitter, d+jitter)), so each request/response round
// trip takes about d longer. SetLatency(0, 0) removes the delay.
func (l *Link) SetLatency(d, jitter time.Duration) error {
	if d < 0 || jitter < 0 || jitter > d {
		return fmt.Errorf("chaos: SetLatency(%v, %v): latency and jitter must be >= 0 and jitter <= latency", d, jitter)
	}
	if d == 0 {
		return l.removeToxics(toxicLatency)
	}
	return l.setToxic(toxicLatency, "latency", "downstream",
		map[string]int64{"latency": d.Milliseconds(), "jitter": jitter.Milliseconds()},
		fmt.Sprintf("latency %v±%v", d, jitter))
}

// LimitBandwidth caps each direction of every connection at kbps kilobytes
// per second. 0 removes the limit.
func (l *Link) LimitBandwidth(kbps int64) error {
	if kbps < 0 {
		return fmt.Errorf("chaos: LimitBandwidth(%d): rate must be >= 0 KB/s", kbps)
	}
	if kbps == 0 {
		return l.removeToxics(toxicBWUp, toxicBWDown)
	}
	what := fmt.Sprintf("bandwidth %d KB/s", kbps)
	if err := l.setToxic(toxicBWUp, "bandwidth", "upstream", map[string]int64{"rate": kbps}, what); err != nil {
		return err
	}
	return l.setToxic(toxicBWDown, "bandwidth", "downstream", map[string]int64{"rate": kbps}, what)
}

// Blackhole(true) keeps accepting connections but delivers nothing either
// way: every read on the client side hangs until the client's own deadline,
// as behind a dead router. Blackhole(false) ends it; the connections that
// were blackholed are closed then (their bytes are lost, as in a real
// partition) and new ones work.
func (l *Link) Blackhole(on bool) error {
	if !on {
		return l.removeToxics(toxicBlackUp, toxicBlackDown)
	}
	attrs := map[string]int64{"timeout": 0}
	if err := l.setToxic(toxicBlackUp, "timeout", "upstream", attrs, "blackhole"); err != nil {
		return err
	}
	return l.setToxic(toxicBlackDown, "timeout", "downstream", attrs, "blackhole")
}

// Timeout stops delivering data and closes each connection d after the
// fault is switched on (or after the connection is opened, for new ones):
// a server that hangs, then drops the client. Timeout(0) removes it.
func (l *Link) Timeout(d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("chaos: Timeout(%v): must be >= 0", d)
	}
	if d == 0 {
		return l.removeToxics(toxicTimeout)
	}
	return l.setToxic(toxicTimeout, "timeout", "upstream",
		map[string]int64{"timeout": max(d.Milliseconds(), 1)}, fmt.Sprintf("timeout after %v", d))
}

// ResetPeer(true) resets (TCP RST) every connection as soon as the client
// sends anything, including connections opened while it is on: the server
// accepts, then every request fails with "connection reset by peer".
func (l *Link) ResetPeer(on bool) error {
	if !on {
		return l.removeToxics(toxicResetPeer)
	}
	return l.setToxic(toxicResetPeer, "reset_peer", "upstream", map[string]int64{"timeout": 0}, "reset peer")
}

// Reset closes every connection open through the link now, as a server
// restart or a killed backend would; new connections are accepted again
// at once (unless [Link.Refuse] is on).
func (l *Link) Reset() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	if l.refusing {
		return nil // stopped proxies hold no connections
	}
	l.proxy.Stop()
	if err := l.proxy.Start(); err != nil {
		l.refusing = true
		return fmt.Errorf("chaos: reopen link %s after reset: %w", l.addr, err)
	}
	return nil
}

// Refuse(true) closes every current connection and stops listening, so new
// connections are refused: the server is down. Refuse(false) listens again
// on the same address.
func (l *Link) Refuse(on bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	return l.refuseLocked(on)
}

func (l *Link) refuseLocked(on bool) error {
	if on == l.refusing {
		return nil
	}
	if on {
		l.proxy.Stop()
		l.refusing = true
		return nil
	}
	if err := l.proxy.Start(); err != nil {
		return fmt.Errorf("chaos: listen again on %s: %w", l.addr, err)
	}
	l.refusing = false
	return nil
}

// Heal switches every fault off: no latency, bandwidth limit, blackhole,
// timeout or reset, and the link listens again.
func (l *Link) Heal() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	names := make([]string, 0, len(l.active))
	for n := range l.active {
		names = append(names, n)
	}
	if err := l.removeLocked(names...); err != nil {
		return err
	}
	return l.refuseLocked(false)
}

// Faults describes the faults switched on now, sorted; empty when healthy.
func (l *Link) Faults() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, what := range l.active {
		if !slices.Contains(out, what) {
			out = append(out, what)
		}
	}
	if l.refusing && !l.closed {
		out = append(out, "refusing connections")
	}
	slices.Sort(out)
	return out
}

// Close stops listening and closes every connection through the link. It
// is idempotent.
func (l *Link) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	l.proxy.Stop()
	l.proxy.Toxics.ResetToxics(context.Background())
	return nil
}

// String names the link for logs: "127.0.0.1:port->upstream".
func (l *Link) String() string { return l.addr + "->" + l.upstream }

// ThroughLink rewrites a postgres:// or redis:// (rediss://) URL so that it
// connects through l: the URL's host and port are replaced by the link's
// address, everything else (user, database, parameters) is kept. The URL's
// own host must be the link's upstream, so a test cannot point a link at
// one server and the client at another by mistake.
func ThroughLink(rawURL string, l *Link) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", fmt.Errorf("chaos: ThroughLink: not a URL: %w", err)
	}
	switch u.Scheme {
	case "postgres", "postgresql", "redis", "rediss", "unix":
	default:
		return "", fmt.Errorf("chaos: ThroughLink: scheme %q is not postgres, postgresql, redis or rediss", u.Scheme)
	}
	if u.Scheme == "unix" || u.Host == "" {
		return "", fmt.Errorf("chaos: ThroughLink: %s URL has no TCP host to route through the link", u.Scheme)
	}
	if strings.Contains(u.Host, ",") {
		return "", fmt.Errorf("chaos: ThroughLink: URL names several hosts (%s); use one link per host", u.Host)
	}
	if want := hostPort(u); !sameAddr(want, l.upstream) {
		return "", fmt.Errorf("chaos: ThroughLink: URL host %s is not the link's upstream %s", want, l.upstream)
	}
	u.Host = l.addr
	return u.String(), nil
}

// UpstreamOf returns the "host:port" a postgres:// or redis:// URL connects
// to, with the scheme's default port when the URL has none: the argument
// [NewLink] wants.
func UpstreamOf(rawURL string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", fmt.Errorf("chaos: UpstreamOf: not a URL: %w", err)
	}
	if u.Host == "" || strings.Contains(u.Host, ",") {
		return "", fmt.Errorf("chaos: UpstreamOf: URL %q must name exactly one TCP host", u.Redacted())
	}
	return hostPort(u), nil
}

func hostPort(u *url.URL) string {
	host, port := u.Hostname(), u.Port()
	if host == "" {
		host = "localhost"
	}
	if port == "" {
		switch u.Scheme {
		case "redis", "rediss":
			port = "6379"
		default:
			port = "5432"
		}
	}
	return net.JoinHostPort(host, port)
}

// sameAddr compares host:port pairs, treating localhost and 127.0.0.1 alike.
func sameAddr(a, b string) bool {
	norm := func(s string) string {
		h, p, err := net.SplitHostPort(s)
		if err != nil {
			return s
		}
		if h == "localhost" || h == "::1" {
			h = "127.0.0.1"
		}
		return net.JoinHostPort(h, p)
	}
	return norm(a) == norm(b)
}
