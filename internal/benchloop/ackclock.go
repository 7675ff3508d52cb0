package benchloop

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/dimmer-dev/dimmer/outbox"
)

// AckClock times messages from their commit to the broker's first
// acknowledgement, for the relays' commit-to-ack benchmarks: the writer
// calls [AckClock.Committed] once its transaction committed, and the relay
// publishes through [AckClock.Publisher]. A message acknowledged twice (a
// repeat after a hand-over) counts from its first acknowledgement.
type AckClock struct {
	mu        sync.Mutex
	committed map[uuid.UUID]time.Time
	acked     map[uuid.UUID]time.Time
}

// NewAckClock returns an empty clock.
func NewAckClock() *AckClock {
	return &AckClock{committed: map[uuid.UUID]time.Time{}, acked: map[uuid.UUID]time.Time{}}
}

// Committed records that message id committed now.
func (c *AckClock) Committed(id uuid.UUID) {
	now := time.Now()
	c.mu.Lock()
	c.committed[id] = now
	c.mu.Unlock()
}

// Publisher wraps p, recording when each record it delivered was first
// acknowledged.
func (c *AckClock) Publisher(p outbox.Publisher) outbox.Publisher {
	return outbox.PublisherFunc(func(ctx context.Context, batch []outbox.Record) []error {
		res := p.Publish(ctx, batch)
		now := time.Now()
		c.mu.Lock()
		for i, r := range batch {
			if res[i] != nil {
				continue
			}
			if _, ok := c.acked[r.ID]; !ok {
				c.acked[r.ID] = now
			}
		}
		c.mu.Unlock()
		return res
	})
}

// AllAcked reports whether every committed message was acknowledged.
func (c *AckClock) AllAcked() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for id := range c.committed {
		if _, ok := c.acked[id]; !ok {
			return false
		}
	}
	return true
}

// Take returns the commit-to-ack latencies of the messages committed since
// the last Take, sorted, and starts afresh. An acknowledgement observed
// before the writer recorded its commit counts as 0. Call it once
// [AckClock.AllAcked] holds.
func (c *AckClock) Take() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	lat := make([]time.Duration, 0, len(c.committed))
	for id, t0 := range c.committed {
		lat = append(lat, max(0, c.acked[id].Sub(t0)))
	}
	clear(c.committed)
	clear(c.acked)
	slices.Sort(lat)
	return lat
}
