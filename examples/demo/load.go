package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dimmer-dev/dimmer/examples/orders/ordersvc"
	"github.com/dimmer-dev/dimmer/flags"
)

// load is the load generator: workers on loopback, each owning its orders
// (one request at a time per order, as one user's session would), bounded
// in count and time. It remembers every acknowledged write to check later
// that none was lost.
type load struct {
	urls    []string
	client  *http.Client
	workers int
	pause   time.Duration
	max     int64

	// holdWrites turns every worker's writes into reads while it is set.
	holdWrites atomic.Bool

	requests, failures atomic.Int64
	nonAuth, staleRead atomic.Int64
	unexpected         atomic.Int64
	authNewFailures    atomic.Int64

	mu     sync.Mutex
	acked  map[string]ordersvc.Order // order id -> last acknowledged state
	writes []ackedWrite              // every acknowledged (order, version)
	notes  []string
}

type ackedWrite struct {
	ID      string
	Version int64
}

func newLoad(urls []string, workers int, pause time.Duration, max int64) *load {
	return &load{urls: urls, client: &http.Client{Timeout: 10 * time.Second}, workers: workers, pause: pause, max: max,
		acked: map[string]ordersvc.Order{}}
}

func (l *load) note(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.notes) < 20 {
		l.notes = append(l.notes, fmt.Sprintf(format, args...))
	}
}

// run drives the workers until ctx ends or the request budget is spent;
// seeds are legacy orders shared out among the workers.
func (l *load) run(ctx context.Context, seeds []string, customers int) {
	var wg sync.WaitGroup
	for w := range l.workers {
		var mine []string
		for i := w; i < len(seeds); i += l.workers {
			mine = append(mine, seeds[i])
		}
		wg.Go(func() { l.worker(ctx, w, mine, customers) })
	}
	wg.Wait()
}

func (l *load) worker(ctx context.Context, w int, owned []string, customers int) {
	rng := rand.New(rand.NewPCG(uint64(w), 42))
	for n := 0; ctx.Err() == nil; n++ {
		if l.requests.Load() >= l.max {
			return
		}
		url := l.urls[(w+n)%len(l.urls)]
		p := rng.IntN(100)
		if l.holdWrites.Load() && len(owned) > 0 {
			p = 50 + p/2 // reads only
		}
		switch {
		case p < 20 || len(owned) == 0:
			cust := fmt.Sprintf("cust-%d", rng.IntN(customers))
			body := map[string]any{"customer_id": cust, "lines": []ordersvc.Line{{SKU: fmt.Sprintf("sku-%d", rng.IntN(97)), Qty: 1 + rng.IntN(3), PriceCents: int64(100 + rng.IntN(900))}}}
			var o ordersvc.Order
			if l.do(ctx, http.MethodPost, url+"/orders", body, &o) {
				l.ack(o)
				owned = append(owned, o.ID)
			}
		case p < 50:
			id := owned[rng.IntN(len(owned))]
			var o ordersvc.Order
			if l.do(ctx, http.MethodPost, url+"/orders/"+id+"/lines", ordersvc.Line{SKU: fmt.Sprintf("sku-%d", rng.IntN(97)), Qty: 1 + rng.IntN(3), PriceCents: int64(100 + rng.IntN(900))}, &o) {
				l.ack(o)
			}
		case p < 85:
			id := owned[rng.IntN(len(owned))]
			var o ordersvc.Order
			if l.do(ctx, http.MethodGet, url+"/orders/"+id, nil, &o) {
				l.mu.Lock()
				prev, ok := l.acked[id]
				l.mu.Unlock()
				if ok && o.Version < prev.Version {
					l.staleRead.Add(1)
					l.note("stale read of %s: version %d after version %d was acknowledged", id, o.Version, prev.Version)
				}
			}
		default:
			var list []ordersvc.Order
			l.do(ctx, http.MethodGet, url+fmt.Sprintf("/customers/cust-%d/orders", rng.IntN(customers)), nil, &list)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(l.pause):
		}
	}
}

func (l *load) ack(o ordersvc.Order) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if prev, ok := l.acked[o.ID]; !ok || prev.Version < o.Version {
		l.acked[o.ID] = o
	}
	l.writes = append(l.writes, ackedWrite{o.ID, o.Version})
}

// do sends one request and decodes a 2xx answer into out. A failure is
// classified by the side the service names and the stage it served in.
func (l *load) do(ctx context.Context, method, url string, body, out any) bool {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return false
	}
	resp, err := l.client.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			l.requests.Add(1)
			l.failures.Add(1)
			l.unexpected.Add(1)
			l.note("%s %s: %v", method, url, err)
		}
		return false
	}
	defer resp.Body.Close()
	l.requests.Add(1)
	if resp.StatusCode/100 == 2 {
		return json.NewDecoder(resp.Body).Decode(out) == nil
	}
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	l.failures.Add(1)
	stage, _ := flags.ParseStage(resp.Header.Get(ordersvc.HeaderStage))
	end, _ := flags.ParseStage(resp.Header.Get(ordersvc.HeaderStageEnd))
	side := resp.Header.Get(ordersvc.HeaderFailedSide)
	// A request spanning a flag change was served by the authoritative
	// side of the stage at its start or at its end.
	authoritative := side == stage.Authoritative().String() || side == end.Authoritative().String()
	switch {
	case resp.StatusCode >= 500 && authoritative && side == flags.New.String():
		// The new store failed while it was authoritative: the caller
		// sees it, as with any store; the watchdog reacts to these.
		l.authNewFailures.Add(1)
	case resp.StatusCode >= 500 && side != "" && !authoritative:
		l.nonAuth.Add(1)
		l.note("%s %s: %d in %s..%s, failed side %s: %s", method, url, resp.StatusCode, stage, end, side, bytes.TrimSpace(msg))
	default:
		l.unexpected.Add(1)
		l.note("%s %s: %d in %s (side %q): %s", method, url, resp.StatusCode, stage, side, bytes.TrimSpace(msg))
	}
	return false
}

func (l *load) snapshot() (map[string]ordersvc.Order, []ackedWrite, []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	m := make(map[string]ordersvc.Order, len(l.acked))
	for k, v := range l.acked {
		m[k] = v
	}
	return m, slices.Clone(l.writes), slices.Clone(l.notes)
}
