package backfill

import (
	"context"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Signal is a live reason to slow down, consulted before every chunk.
type Signal interface {
	// Name identifies the signal in progress reports and logs.
	Name() string
	// Hold returns how long to wait before the next chunk (0: go on) and
	// what was seen. An error holds the job for a poll interval: a signal
	// that cannot be read is not taken as "all clear".
	Hold(ctx context.Context) (time.Duration, string, error)
}

type signalFunc struct {
	name string
	f    func(context.Context) (time.Duration, string, error)
}

func (s signalFunc) Name() string { return s.name }
func (s signalFunc) Hold(ctx context.Context) (time.Duration, string, error) {
	return s.f(ctx)
}

// SignalFunc makes a Signal from a function.
func SignalFunc(name string, hold func(context.Context) (time.Duration, string, error)) Signal {
	return signalFunc{name, hold}
}

// ReplicationLag holds the job while any replica of the pool's server is more
// than maxLag behind in replay (pg_stat_replication.replay_lag), for as long
// as the excess, at least 100ms. With no replica attached it never holds.
func ReplicationLag(pool *pgxpool.Pool, maxLag time.Duration) Signal {
	return SignalFunc("replication-lag", func(ctx context.Context) (time.Duration, string, error) {
		var secs float64
		var name string
		err := pool.QueryRow(ctx, `SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8,
	coalesce((SELECT application_name FROM pg_stat_replication ORDER BY replay_lag DESC NULLS LAST LIMIT 1), '')
FROM pg_stat_replication`).Scan(&secs, &name)
		if err != nil {
			return 0, "", fmt.Errorf("read pg_stat_replication: %w", err)
		}
		lag := time.Duration(secs * float64(time.Second))
		if lag <= maxLag {
			return 0, "", nil
		}
		return max(lag-maxLag, 100*time.Millisecond), fmt.Sprintf("replica %q replays %s behind (limit %s)", name, lag.Round(time.Millisecond), maxLag), nil
	})
}

// Latency holds the job while the service's own latency signal (its p99 of
// the operations the backfill must not hurt, say) is above limit; the hold
// grows with the excess. current is called before every chunk.
func Latency(name string, current func() time.Duration, limit time.Duration) Signal {
	return SignalFunc(name, func(context.Context) (time.Duration, string, error) {
		l := current()
		if l <= limit {
			return 0, "", nil
		}
		return min(max(l-limit, 50*time.Millisecond)*4, 5*time.Second), fmt.Sprintf("%s at %s (limit %s)", name, l.Round(time.Microsecond), limit), nil
	})
}

// sizer adapts the chunk size to the target chunk time: an EWMA of the time
// per row, the size that would take the target at that pace, bounded, and
// never more than doubling per chunk (a sudden fast chunk is not trusted).
type sizer struct {
	target   time.Duration
	min, max int
	size     int
	perRow   float64 // ns, EWMA
	// scale shrinks the target below full duty (1 otherwise).
	scale float64
}

const ewmaAlpha = 0.3

// rateChunkTime is the most of a rate limit's budget one chunk may take:
// the limit holds over any window to within one chunk per worker, so over
// any 5 s to within 5 %.
const rateChunkTime = 250 * time.Millisecond

func newSizer(c Config) *sizer {
	s := &sizer{target: c.TargetChunkTime, min: c.MinChunk, max: c.MaxChunk, size: c.InitialChunk, scale: 1}
	if c.RowsPerSecond > 0 {
		// A rate limit bounds the chunk, below MinChunk if need be: one
		// chunk is a burst the pacer only answers after it.
		rc := max(1, int(c.RowsPerSecond*rateChunkTime.Seconds()/float64(max(c.Workers, 1))))
		s.max = min(s.max, rc)
		s.min = min(s.min, s.max)
		s.size = min(s.size, s.max)
	}
	return s
}

func (s *sizer) observe(rows int, took time.Duration) {
	if rows <= 0 {
		return
	}
	pr := float64(took) / float64(rows)
	if s.perRow == 0 {
		s.perRow = pr
	} else {
		s.perRow = ewmaAlpha*pr + (1-ewmaAlpha)*s.perRow
	}
	next := int(float64(s.target) * s.scale / max(s.perRow, 1))
	next = min(next, 2*s.size)
	s.size = min(max(next, s.min), s.max)
}

// backoff halves the chunk when a signal holds the job: smaller chunks hold
// locks and I/O for less time.
func (s *sizer) backoff() { s.size = max(s.min, s.size/2) }

// duty is the share of time this process's workers copy while signals are
// configured: halved whenever a signal holds the job, won back by 1/16 per
// second without a hold (additive increase, multiplicative decrease), so
// the rate settles where the signals stop complaining instead of swinging
// between full speed and a hold. Each chunk is followed by a rest in
// proportion. The increase goes by time, not by chunk: a signal reports
// the harm of the last second or so, and a job probing faster than that
// overshoots whatever its chunk size. It starts low and, until the first
// hold, doubles every second (slow start): a job guarded by signals is
// there not to hurt something, and a signal only sees harm after it is
// done.
type duty struct {
	mu    sync.Mutex
	share float64
	since time.Time // of the last hold or increase
	held  bool      // ever: slow start is over
	now   func() time.Time
}

const (
	minDuty    = 1.0 / 32
	startDuty  = 1.0 / 8
	dutyStep   = 1.0 / 16
	dutyPeriod = time.Second
)

func newDuty() *duty { return &duty{share: startDuty, since: time.Now(), now: time.Now} }

func (d *duty) cut() {
	d.mu.Lock()
	d.share = max(d.share/2, minDuty)
	d.since = d.now()
	d.held = true
	d.mu.Unlock()
}

// ran accounts a chunk that took took; held tells whether a signal held it
// back before it started. It returns the rest due after it, and the share.
func (d *duty) ran(took time.Duration, held bool) (time.Duration, float64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	switch dt := float64(now.Sub(d.since)) / float64(dutyPeriod); {
	case held:
	case !d.held:
		d.share = min(1, d.share*math.Pow(2, dt))
	default:
		d.share = min(1, d.share+dutyStep*dt)
	}
	d.since = now
	if d.share >= 1 {
		return 0, 1
	}
	return time.Duration(float64(took) * (1 - d.share) / d.share), d.share
}

// pacer spaces chunks so the job stays under a rows/s limit across workers.
type pacer struct {
	mu   sync.Mutex
	rate float64
	next time.Time
}

// paceSlack is the credit a chunk may start with: what the moments
// between one chunk's wake-up and the next one's start (a claim, a
// transaction's begin) would otherwise lose on every chunk, which kept the
// rate several per cent under the limit. Idle time beyond it earns no
// credit, so a burst is at most this much of the rate.
const paceSlack = 50 * time.Millisecond

// take accounts a chunk of rows that started at started and returns how long
// the caller must wait before its next chunk.
func (p *pacer) take(rows int, started time.Time) time.Duration {
	if p == nil || p.rate <= 0 || rows <= 0 {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if from := started.Add(-paceSlack); p.next.Before(from) {
		p.next = from
	}
	p.next = p.next.Add(time.Duration(float64(rows) / p.rate * float64(time.Second)))
	return time.Until(p.next)
}

// broadcast wakes every waiter at once: ch is taken before looking, so a
// signal between the look and the wait is not missed.
type broadcast struct {
	mu sync.Mutex
	c  chan struct{}
}

func newBroadcast() *broadcast { return &broadcast{c: make(chan struct{})} }

func (b *broadcast) ch() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.c
}

func (b *broadcast) signal() {
	b.mu.Lock()
	close(b.c)
	b.c = make(chan struct{})
	b.mu.Unlock()
}

// wait returns when c is signalled, after d, or when ctx ends.
func (b *broadcast) wait(ctx context.Context, c <-chan struct{}, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-c:
		return nil
	case <-t.C:
		return nil
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
