package cdc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.opentelemetry.io/otel/metric"
	"golang.org/x/sync/errgroup"

	"github.com/dimmer-dev/dimmer/internal/connstr"
	"github.com/dimmer-dev/dimmer/outbox"
)

// RelayConfig tunes a [Relay]. Zero fields take the documented defaults.
type RelayConfig struct {
	// Slot is the replication slot to read (made with [CreateSlot]).
	// Required.
	Slot string
	// Publication is the slot's publication; default the slot's name.
	Publication string
	// Prefix selects the logical decoding messages relayed; default
	// [DefaultPrefix].
	Prefix string
	// Schema holds the slot registry the slot was created in (the fence
	// lease lives there); default "dimmer".
	Schema string
	// ID names the relay in logs; default host-pid-random.
	ID string
	// BatchSize bounds one Publish call (one record per key). Default 5000.
	BatchSize int
	// MaxInFlight bounds the Publish calls running at once; a key is in at
	// most one of them. Default 4.
	MaxInFlight int
	// MaxPending bounds the records read from the log and not yet
	// acknowledged; reading pauses above it (a larger transaction is still
	// taken whole). Default 100000.
	MaxPending int
	// StatusInterval is how often the acknowledged position is reported to
	// the server (a crashed relay re-sends what was acknowledged since the last report). Default 100ms.
	StatusInterval time.Duration
	// FenceTTL is how long a successful ownership check lets the relay
	// publish: a relay that cannot confirm it still owns the slot for this
	// long stops publishing, before the server can hand the slot to a
	// standby (it must stay below the server's wal_sender_timeout minus
	// StatusInterval, checked at start). Default 5s.
	FenceTTL time.Duration
	// StandbyPoll is how often a standby tries to take the slot. Default
	// 500ms.
	StandbyPoll time.Duration
	// PublishTimeout bounds one Publish call. Default 5s, at most FenceTTL.
	PublishTimeout time.Duration
	// BackoffMin and BackoffMax bound the retry delay of a failed record
	// (its key waits; other keys go on). Defaults 100ms and 30s.
	BackoffMin, BackoffMax time.Duration
	// Logger receives role changes and errors. Default slog.Default().
	Logger *slog.Logger
	// MeterProvider receives metrics. Default: the global provider.
	MeterProvider metric.MeterProvider
}

func (c *RelayConfig) withDefaults() {
	if c.Publication == "" {
		c.Publication = c.Slot
	}
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if c.Schema == "" {
		c.Schema = DefaultSchema
	}
	if c.ID == "" {
		host, _ := os.Hostname()
		var b [4]byte
		_, _ = rand.Read(b[:])
		c.ID = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(b[:]))
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	if c.BatchSize == 0 {
		c.BatchSize = 5000
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = 4
	}
	if c.MaxPending == 0 {
		c.MaxPending = 100000
	}
	def(&c.StatusInterval, 100*time.Millisecond)
	def(&c.FenceTTL, 5*time.Second)
	def(&c.StandbyPoll, 500*time.Millisecond)
	def(&c.PublishTimeout, min(5*time.Second, c.FenceTTL))
	def(&c.BackoffMin, 100*time.Millisecond)
	def(&c.BackoffMax, 30*time.Second)
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports the first field out of range.
func (c RelayConfig) Validate() error {
	switch {
	case !nameRE.MatchString(c.Slot):
		return badConfig("Slot", "must be 1..63 characters of [a-z0-9_], got %q", c.Slot)
	case !nameRE.MatchString(c.Publication):
		return badConfig("Publication", "must be 1..63 characters of [a-z0-9_], got %q", c.Publication)
	case c.BatchSize < 1 || c.BatchSize > 100000:
		return badConfig("BatchSize", "must be 1..100000, got %d", c.BatchSize)
	case c.MaxInFlight < 1 || c.MaxInFlight > 64:
		return badConfig("MaxInFlight", "must be 1..64, got %d", c.MaxInFlight)
	case c.MaxPending < c.BatchSize:
		return badConfig("MaxPending", "must be at least BatchSize (%d), got %d", c.BatchSize, c.MaxPending)
	case c.StatusInterval < time.Millisecond:
		return badConfig("StatusInterval", "must be at least 1ms, got %v", c.StatusInterval)
	case c.FenceTTL < 100*time.Millisecond:
		return badConfig("FenceTTL", "must be at least 100ms, got %v", c.FenceTTL)
	case c.StandbyPoll <= 0:
		return badConfig("StandbyPoll", "must be positive, got %v", c.StandbyPoll)
	case c.PublishTimeout <= 0 || c.PublishTimeout > c.FenceTTL:
		return badConfig("PublishTimeout", "must be in (0, FenceTTL = %v], got %v", c.FenceTTL, c.PublishTimeout)
	case c.BackoffMin <= 0 || c.BackoffMax < c.BackoffMin:
		return badConfig("BackoffMin", "must be positive and at most BackoffMax (%v), got %v", c.BackoffMax, c.BackoffMin)
	}
	return nil
}

// Relay publishes the outbox messages an [Emitter] wrote, read from a
// logical replication slot in commit order. See the package doc for its
// guarantees. Several relays may run on one slot: one reads and publishes,
// the others wait as standbys and take over when it stops.
type Relay struct {
	connString string
	pub        outbox.Publisher
	cfg        RelayConfig
	log        *slog.Logger
	m          *relayMetrics

	active    atomic.Bool
	confirmed atomic.Uint64
	running   atomic.Bool
	stop      chan struct{}
	stopOnce  sync.Once
	done      chan struct{}
}

// NewRelay returns a relay reading cfg.Slot on the database of connString
// (a PostgreSQL URL or DSN; the relay opens a replication connection and a
// regular one) and publishing through pub, e.g. outbox/kafkasink or
// outbox/redissink. It does nothing until [Relay.Run].
func NewRelay(connString string, pub outbox.Publisher, cfg RelayConfig) (*Relay, error) {
	if pub == nil {
		return nil, badConfig("Publisher", "is nil")
	}
	if _, err := pgconn.ParseConfig(connString); err != nil {
		return nil, badConfig("connString", "does not parse: %v", connstr.ParseError(err))
	}
	cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	m, err := newRelayMetrics(cfg.MeterProvider, cfg.Slot)
	if err != nil {
		return nil, err
	}
	return &Relay{
		connString: connString, pub: pub, cfg: cfg, m: m,
		log:  cfg.Logger.With("slot", cfg.Slot, "relay", cfg.ID),
		stop: make(chan struct{}),
		done: make(chan struct{}),
	}, nil
}

// Active reports whether this relay currently owns the slot.
func (r *Relay) Active() bool { return r.active.Load() }

// Confirmed is the log position up to which every message was acknowledged
// by the publisher and reported to the server (as text, e.g. "0/16B3748").
func (r *Relay) Confirmed() string { return pglogrepl.LSN(r.confirmed.Load()).String() }

// Run reads and publishes until ctx ends or [Relay.Shutdown]; while
// another reader holds the slot it waits as a standby. It returns nil after
// Shutdown, ctx's error when ctx ends, and an error wrapping [ErrNoSlot]
// or [ErrWalLevel] when the slot cannot be read at all.
func (r *Relay) Run(ctx context.Context) error {
	if !r.running.CompareAndSwap(false, true) {
		return errors.New("cdc: Relay.Run called twice")
	}
	defer close(r.done)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-r.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	standby := false
	for {
		err := r.session(ctx)
		select {
		case <-r.stop:
			return nil
		default:
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		switch {
		case errors.Is(err, ErrNoSlot), errors.Is(err, ErrWalLevel), errors.Is(err, ErrInvalidConfig):
			return err
		case errors.Is(err, errBusy):
			if !standby {
				r.log.Info("cdc relay: slot is held by another reader; standing by")
				standby = true
			}
		default:
			standby = false
			r.log.Warn("cdc relay: session ended; reconnecting", "err", err)
		}
		select {
		case <-ctx.Done():
			if isStopped(r.stop) {
				return nil
			}
			return ctx.Err()
		case <-time.After(r.cfg.StandbyPoll):
		}
	}
}

func isStopped(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// Shutdown stops the relay: the batch being published finishes (bounded
// by PublishTimeout), its acknowledged position is reported, the slot is
// released for a standby. It waits for Run to return or ctx to end.
func (r *Relay) Shutdown(ctx context.Context) error {
	r.stopOnce.Do(func() { close(r.stop) })
	if !r.running.Load() {
		return nil
	}
	select {
	case <-r.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// entry is one message read from the log and not yet acknowledged.
type entry struct {
	rec       outbox.Record
	tx        *txn
	acked     bool
	inFlight  bool
	notBefore time.Time
}

// txn is a committed transaction whose messages are not all acknowledged.
type txn struct {
	end    pglogrepl.LSN
	left   int
	commit time.Time
}

// relayState is shared by a session's reader and publisher.
type relayState struct {
	mu        sync.Mutex
	pending   []*entry
	txs       []*txn
	confirmed pglogrepl.LSN
	max       int
	more      chan struct{}
	space     chan struct{}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (s *relayState) push(t *txn, es []*entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(es) == 0 && len(s.txs) == 0 {
		s.confirmed = max(s.confirmed, t.end)
		return
	}
	s.txs = append(s.txs, t)
	s.pending = append(s.pending, es...)
	signal(s.more)
}

// idle advances the confirmed position over WAL without messages, when
// nothing read is unacknowledged.
func (s *relayState) idle(end pglogrepl.LSN) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.txs) == 0 && end > s.confirmed {
		s.confirmed = end
	}
}

func (s *relayState) full() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.pending) >= s.max
}

func (s *relayState) position() pglogrepl.LSN {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.confirmed
}

// next picks the oldest unacknowledged record of each key (keyless records
// all qualify), in commit order, up to n, skipping keys backing off or with
// a record in flight, and marks them in flight. wait is how long until a
// backing-off record comes due (0: none).
func (s *relayState) next(n int, now time.Time) (batch []*entry, wait time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := make(map[string]struct{}, min(n, len(s.pending)))
	for _, e := range s.pending {
		if k := e.rec.Key; k != "" {
			if _, ok := seen[k]; ok {
				continue
			}
			seen[k] = struct{}{}
		}
		if e.inFlight {
			continue
		}
		if e.notBefore.After(now) {
			if d := e.notBefore.Sub(now); wait == 0 || d < wait {
				wait = d
			}
			continue
		}
		e.inFlight = true
		batch = append(batch, e)
		if len(batch) == n {
			break
		}
	}
	return batch, wait
}

// done records a batch's results and advances the confirmed position over
// every transaction whose messages are all acknowledged.
func (s *relayState) done(batch []*entry, results []error, backoff func(int) time.Duration) (acked int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	defer signal(s.more) // keys in this batch may have a next record
	for i, e := range batch {
		e.inFlight = false
		if results[i] == nil {
			e.acked = true
			e.tx.left--
			acked++
			continue
		}
		e.rec.Attempts++
		e.notBefore = now.Add(backoff(e.rec.Attempts))
	}
	if acked > 0 {
		kept := s.pending[:0]
		for _, e := range s.pending {
			if !e.acked {
				kept = append(kept, e)
			}
		}
		clear(s.pending[len(kept):])
		s.pending = kept
		i := 0
		for i < len(s.txs) && s.txs[i].left == 0 {
			s.confirmed = s.txs[i].end
			i++
		}
		s.txs = s.txs[i:]
		if len(s.pending) < s.max {
			signal(s.space)
		}
	}
	return acked
}

// session owns the slot until an error, a fence loss or a stop.
func (r *Relay) session(ctx context.Context) error {
	conn, err := replicationConnect(ctx, r.connString)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	fence, err := pgx.Connect(ctx, r.connString)
	if err != nil {
		return fmt.Errorf("cdc: open fencing connection: %w", err)
	}
	defer fence.Close(context.WithoutCancel(ctx))
	if err := CheckLogical(ctx, fence); err != nil {
		return err
	}
	var senderTimeout float64 // ms
	if err := fence.QueryRow(ctx, `SELECT extract(epoch FROM current_setting('wal_sender_timeout')::interval) * 1000`).Scan(&senderTimeout); err != nil {
		return fmt.Errorf("cdc: read wal_sender_timeout: %w", err)
	}
	if senderTimeout > 0 && time.Duration(senderTimeout)*time.Millisecond < r.cfg.FenceTTL+r.cfg.StatusInterval {
		return badConfig("FenceTTL", "plus StatusInterval (%v) must stay below the server's wal_sender_timeout (%vms), or a standby could take the slot while this relay still publishes",
			r.cfg.FenceTTL+r.cfg.StatusInterval, senderTimeout)
	}
	if err := startStreaming(ctx, conn, r.cfg.Slot, r.cfg.Publication, true); err != nil {
		return err
	}
	// Fencing. The slot itself admits one reader, but the previous reader
	// may still be inside a Publish call when the server hands the slot
	// over (its connection was cut, its WAL sender terminated). Every
	// reader therefore publishes only under a lease in the registry,
	// renewed while the server still shows its WAL sender on the slot; a
	// new reader waits out the previous lease before its first publish. A
	// clean shutdown ends the lease at once.
	reg := registry(r.cfg.Schema)
	var wait time.Duration
	err = pgx.BeginFunc(ctx, fence, func(tx pgx.Tx) error {
		var left float64
		err := tx.QueryRow(ctx, `SELECT extract(epoch FROM greatest(fence_until, clock_timestamp()) - clock_timestamp())::float8 FROM `+reg+` WHERE slot = $1 FOR UPDATE`, r.cfg.Slot).Scan(&left)
		wait = time.Duration(left * float64(time.Second))
		return err
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("%w: %s is not registered in %s (create it with CreateSlot)", ErrNoSlot, r.cfg.Slot, reg)
	}
	if err != nil {
		return fmt.Errorf("cdc: read the fence of slot %s: %w", r.cfg.Slot, err)
	}
	base := time.Now()
	var fenceUntil atomic.Int64 // since base; publishing is allowed before it
	renew := `UPDATE ` + reg + ` SET owner = $2, fence_until = now() + make_interval(secs => $3)
WHERE slot = $1 AND (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1) = $4`
	checkFence := func(c context.Context) error {
		start := time.Since(base)
		tag, err := fence.Exec(c, renew, r.cfg.Slot, r.cfg.ID, r.cfg.FenceTTL.Seconds(), int32(conn.PID()))
		if err != nil {
			return fmt.Errorf("cdc: renew the fence of slot %s: %w", r.cfg.Slot, err)
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("%w: slot %s is no longer read by this relay's WAL sender (process %d)", ErrFenced, r.cfg.Slot, conn.PID())
		}
		fenceUntil.Store(int64(start + r.cfg.FenceTTL))
		return nil
	}
	if err := checkFence(ctx); err != nil {
		return err
	}
	if wait > 0 {
		// Publishing starts once the previous lease has run out; reading
		// goes on meanwhile.
		fenceUntil.Store(int64(-time.Hour))
		r.log.Info("cdc relay: waiting out the previous reader's fence", "wait", wait)
	}
	waitUntil := time.Now().Add(wait)
	defer func() {
		// Release the lease: a standby may publish at once.
		c, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_, _ = fence.Exec(c, `UPDATE `+reg+` SET fence_until = now() WHERE slot = $1 AND owner = $2`, r.cfg.Slot, r.cfg.ID)
	}()
	r.active.Store(true)
	r.m.active(ctx, true)
	defer func() { r.active.Store(false); r.m.active(context.WithoutCancel(ctx), false) }()
	r.log.Info("cdc relay: took the slot", "pid", conn.PID())

	st := &relayState{max: r.cfg.MaxPending, more: make(chan struct{}, 1), space: make(chan struct{}, 1)}
	g, gctx := errgroup.WithContext(ctx)
	pubDone := make(chan struct{})
	g.Go(func() error { // fence
		if wait > 0 {
			select {
			case <-gctx.Done():
				return nil
			case <-time.After(wait):
			}
			if err := checkFence(gctx); err != nil && gctx.Err() == nil {
				return err
			}
		}
		t := time.NewTicker(r.cfg.FenceTTL / 4)
		defer t.Stop()
		for {
			select {
			case <-gctx.Done():
				return nil
			case <-t.C:
			}
			if time.Now().Before(waitUntil) {
				continue
			}
			c, cancel := context.WithTimeout(gctx, r.cfg.FenceTTL/2)
			err := checkFence(c)
			cancel()
			if errors.Is(err, ErrFenced) {
				return err
			}
			if time.Since(base) > time.Duration(fenceUntil.Load()) {
				return fmt.Errorf("%w: could not confirm ownership of slot %s for %v: %v", ErrFenced, r.cfg.Slot, r.cfg.FenceTTL, err)
			}
		}
	})
	g.Go(func() error { // publisher
		defer close(pubDone)
		return r.publish(gctx, st, func() bool { return time.Since(base) < time.Duration(fenceUntil.Load()) },
			func() time.Time { return base.Add(time.Duration(fenceUntil.Load())) })
	})
	g.Go(func() error { return r.read(gctx, conn, st) })
	err = g.Wait()
	// The publisher has returned: report what it acknowledged last, so a
	// standby starts after it (best effort: the slot never moves past an
	// unacknowledged record either way).
	<-pubDone
	if !conn.IsClosed() {
		pos := st.position()
		_ = pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{WALWritePosition: pos})
		r.confirmed.Store(uint64(pos))
	}
	r.log.Info("cdc relay: released the slot")
	return err
}

// read decodes the stream into committed transactions and reports the
// acknowledged position to the server.
func (r *Relay) read(ctx context.Context, conn *pgconn.PgConn, st *relayState) error {
	nextStatus := time.Now()
	var cur *txn
	var curEntries []*entry
	var curCommit time.Time
	for {
		if ctx.Err() != nil {
			return nil
		}
		if now := time.Now(); !now.Before(nextStatus) {
			pos := st.position()
			if err := pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{WALWritePosition: pos}); err != nil {
				return fmt.Errorf("cdc: report position: %w", err)
			}
			r.confirmed.Store(uint64(pos))
			nextStatus = now.Add(r.cfg.StatusInterval)
		}
		if cur == nil && st.full() {
			select {
			case <-ctx.Done():
			case <-st.space:
			case <-time.After(time.Until(nextStatus)):
			}
			continue
		}
		rctx, cancel := context.WithDeadline(ctx, nextStatus)
		raw, err := conn.ReceiveMessage(rctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if pgconn.Timeout(err) {
				continue
			}
			return fmt.Errorf("cdc: read slot %s: %w", r.cfg.Slot, err)
		}
		switch msg := raw.(type) {
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("cdc: slot %s: %w", r.cfg.Slot, pgconn.ErrorResponseToPgError(msg))
		case *pgproto3.CopyDone:
			return fmt.Errorf("cdc: slot %s: the server ended the stream", r.cfg.Slot)
		case *pgproto3.CopyData:
			if len(msg.Data) == 0 {
				continue
			}
			switch msg.Data[0] {
			case pglogrepl.PrimaryKeepaliveMessageByteID:
				ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(msg.Data[1:])
				if err != nil {
					return fmt.Errorf("cdc: slot %s: %w", r.cfg.Slot, err)
				}
				if cur == nil {
					st.idle(ka.ServerWALEnd)
				}
				if ka.ReplyRequested {
					nextStatus = time.Time{}
				}
			case pglogrepl.XLogDataByteID:
				xld, err := pglogrepl.ParseXLogData(msg.Data[1:])
				if err != nil {
					return fmt.Errorf("cdc: slot %s: %w", r.cfg.Slot, err)
				}
				lm, err := pglogrepl.Parse(xld.WALData)
				if err != nil {
					return fmt.Errorf("cdc: slot %s: decode: %w", r.cfg.Slot, err)
				}
				switch lm := lm.(type) {
				case *pglogrepl.BeginMessage:
					cur, curEntries, curCommit = &txn{}, nil, lm.CommitTime
				case *pglogrepl.LogicalDecodingMessage:
					if cur == nil || !lm.Transactional || lm.Prefix != r.cfg.Prefix {
						continue
					}
					ms, err := decodeRecord(lm.Content)
					if err != nil {
						// Not written by an Emitter of this version: it can
						// never be published, and holding the slot for it
						// would retain WAL forever.
						r.log.Error("cdc relay: skipping an undecodable message", "lsn", lm.LSN, "err", err)
						r.m.undecodable.Add(ctx, 1, r.m.attrs)
						continue
					}
					for i, m := range ms {
						m.Payload = append([]byte(nil), m.Payload...) // the buffer is reused
						// Seq orders records in commit order: the record's
						// position, then its place in a frame.
						curEntries = append(curEntries, &entry{tx: cur, rec: outbox.Record{Message: m, Seq: int64(lm.LSN)<<16 | int64(min(i, 1<<16-1)), CreatedAt: curCommit}})
					}
				case *pglogrepl.CommitMessage:
					if cur == nil {
						continue
					}
					cur.end, cur.left, cur.commit = lm.TransactionEndLSN, len(curEntries), lm.CommitTime
					st.push(cur, curEntries)
					cur, curEntries = nil, nil
				}
			}
		}
	}
}

func (r *Relay) backoff(attempt int) time.Duration {
	d := r.cfg.BackoffMin << min(attempt-1, 30)
	if d <= 0 || d > r.cfg.BackoffMax {
		d = r.cfg.BackoffMax
	}
	return d/2 + mrand.N(d/2+1)
}

// publish sends batches while the fence holds, up to MaxInFlight at once.
// It returns once every batch it started has finished.
func (r *Relay) publish(ctx context.Context, st *relayState, fenced func() bool, fenceDeadline func() time.Time) error {
	slots := make(chan struct{}, r.cfg.MaxInFlight)
	var inFlight sync.WaitGroup
	defer inFlight.Wait()
	for {
		select {
		case <-ctx.Done():
			return nil
		case slots <- struct{}{}:
		}
		batch, wait := st.next(r.cfg.BatchSize, time.Now())
		if len(batch) == 0 {
			<-slots
			var timer <-chan time.Time
			if wait > 0 {
				timer = time.After(wait)
			}
			select {
			case <-ctx.Done():
				return nil
			case <-st.more:
			case <-timer:
			}
			continue
		}
		for !fenced() {
			select {
			case <-ctx.Done():
				st.done(batch, notSent(len(batch), ctx.Err()), r.backoff)
				return nil
			case <-time.After(5 * time.Millisecond):
			}
		}
		inFlight.Add(1)
		go func() {
			defer inFlight.Done()
			defer func() { <-slots }()
			r.publishBatch(ctx, st, batch, fenceDeadline())
		}()
	}
}

func notSent(n int, err error) []error {
	res := make([]error, n)
	for i := range res {
		res[i] = err
	}
	return res
}

func (r *Relay) publishBatch(ctx context.Context, st *relayState, batch []*entry, fenceDeadline time.Time) {
	recs := make([]outbox.Record, len(batch))
	for i, e := range batch {
		recs[i] = e.rec
	}
	// A batch in flight finishes after a stop (bounded), so a graceful
	// shutdown acknowledges it; it never outlives the fence.
	pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.PublishTimeout)
	defer cancel()
	pctx, cancel2 := context.WithDeadline(pctx, fenceDeadline)
	defer cancel2()
	start := time.Now()
	results := r.pub.Publish(pctx, recs)
	if len(results) != len(batch) {
		results = notSent(len(batch), fmt.Errorf("cdc: publisher returned %d results for %d records", len(results), len(batch)))
	}
	now := time.Now()
	for i, e := range batch {
		if results[i] == nil {
			r.m.commitToAck.Record(ctx, now.Sub(e.tx.commit).Seconds(), r.m.attrs)
		}
	}
	acked := st.done(batch, results, r.backoff)
	r.m.publishTime.Record(ctx, now.Sub(start).Seconds(), r.m.attrs)
	r.m.published.Add(ctx, int64(acked), r.m.attrs)
	if failed := len(batch) - acked; failed > 0 {
		r.m.failed.Add(ctx, int64(failed), r.m.attrs)
		for i, err := range results {
			if err != nil {
				r.log.Warn("cdc relay: publish failed; the key waits and retries", "failed", failed, "key", batch[i].rec.Key, "err", err)
				break
			}
		}
	}
}
