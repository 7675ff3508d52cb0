package outbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel/metric"
)

// RelayConfig tunes a [Relay]. Zero fields take the documented defaults.
type RelayConfig struct {
	// ID names the relay in leases and logs; default host-pid-random. Two
	// live relays must not share an ID. On a partitioned table (see
	// Config.Partitions) give each relay a stable one: a relay's bucket
	// range follows its ID's rank among the live relays, so one that comes
	// back under its old ID takes its old range back, where a new ID
	// moves the other relays' ranges too.
	ID string
	// BatchSize bounds the messages one cycle publishes (one per key).
	// Default 1000 (it drained a backlog faster than 500 or 2000, each
	// cycle's round trips being spread over more messages).
	BatchSize int
	// PollInterval is the fallback wake-up when no NOTIFY arrives (missed
	// notifications, retries coming due). Default 1s.
	PollInterval time.Duration
	// LeaseTTL is how long a bucket lease lasts without renewal. Renewed
	// every LeaseTTL/3. A relay whose database session ends (killed,
	// crashed, stopped) loses its buckets within LivenessInterval; one that
	// hangs with its session open holds them this long. Default 10s.
	LeaseTTL time.Duration
	// LivenessInterval is how often a relay looks for relays whose
	// registration session has ended, to take their buckets over. Default
	// 50ms; it costs one small query (of pg_locks) per interval per relay.
	LivenessInterval time.Duration
	// PublishTimeout bounds one Publish call (it is also cut at the lease's
	// local deadline). Default 5s; must be below LeaseTTL/2.
	PublishTimeout time.Duration
	// MaxAttempts failed publishes make a message a dead letter, which
	// holds back only its own key. Default 10.
	MaxAttempts int
	// BackoffMin and BackoffMax bound the exponential retry delay (with
	// jitter). Defaults 100ms and 1m.
	BackoffMin, BackoffMax time.Duration
	// VacuumEvery runs VACUUM on the table after this many rows deleted by
	// this relay (one relay at a time), keeping dead tuples bounded between
	// autovacuum runs. Default 50000; negative disables.
	VacuumEvery int
	// StatsInterval is how often backlog and oldest-age gauges refresh.
	// Default 10s.
	StatsInterval time.Duration
	// Logger receives lease changes, dead letters and errors. Default
	// slog.Default().
	Logger *slog.Logger
	// MeterProvider receives metrics. Default: the global provider (a no-op
	// unless the service set one).
	MeterProvider metric.MeterProvider
}

func (c *RelayConfig) withDefaults() {
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
		c.BatchSize = 1000
	}
	def(&c.PollInterval, time.Second)
	def(&c.LeaseTTL, 10*time.Second)
	def(&c.LivenessInterval, 50*time.Millisecond)
	def(&c.PublishTimeout, min(5*time.Second, c.LeaseTTL/3))
	if c.MaxAttempts == 0 {
		c.MaxAttempts = 10
	}
	def(&c.BackoffMin, 100*time.Millisecond)
	def(&c.BackoffMax, time.Minute)
	if c.VacuumEvery == 0 {
		c.VacuumEvery = 50000
	}
	def(&c.StatsInterval, 10*time.Second)
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports the first field out of range.
func (c RelayConfig) Validate() error {
	switch {
	case c.BatchSize < 1 || c.BatchSize > 10000:
		return badConfig("BatchSize", "must be 1..10000, got %d", c.BatchSize)
	case c.PollInterval < time.Millisecond:
		return badConfig("PollInterval", "must be at least 1ms, got %v", c.PollInterval)
	case c.LeaseTTL < 100*time.Millisecond:
		return badConfig("LeaseTTL", "must be at least 100ms, got %v", c.LeaseTTL)
	case c.LivenessInterval < time.Millisecond || c.LivenessInterval > c.LeaseTTL:
		return badConfig("LivenessInterval", "must be in [1ms, LeaseTTL = %v], got %v", c.LeaseTTL, c.LivenessInterval)
	case c.PublishTimeout <= 0 || c.PublishTimeout > c.LeaseTTL/2:
		return badConfig("PublishTimeout", "must be in (0, LeaseTTL/2 = %v], got %v", c.LeaseTTL/2, c.PublishTimeout)
	case c.MaxAttempts < 1:
		return badConfig("MaxAttempts", "must be at least 1, got %d", c.MaxAttempts)
	case c.BackoffMin <= 0 || c.BackoffMax < c.BackoffMin:
		return badConfig("BackoffMin", "must be positive and at most BackoffMax (%v), got %v", c.BackoffMax, c.BackoffMin)
	case c.StatsInterval <= 0:
		return badConfig("StatsInterval", "must be positive, got %v", c.StatsInterval)
	case len(c.ID) > 200:
		return badConfig("ID", "is longer than 200 bytes")
	}
	return nil
}

type lease struct {
	epoch    int64
	deadline time.Time // local clock; strictly before the database expiry
}

// Relay publishes an outbox's messages. Several relays (in one process or
// many) share the work by leasing key buckets; see the package doc for the
// ordering and delivery guarantees.
type Relay struct {
	o    *Outbox
	pool *pgxpool.Pool
	pub  Publisher
	cfg  RelayConfig
	log  *slog.Logger
	m    *metrics

	fastSQL, walkSQL, ackSQL, ackSpanSQL, ackEachSQL, failSQL string
	// The relays' registration: control is the NOTIFY channel of joins and
	// releases; sessionClass the advisory lock class of registration
	// sessions; alive is the SQL test that relay row r's session lives.
	control      string
	sessionClass int32
	alive        string

	pid       atomic.Int32 // of the registration session; 0 while unregistered
	rebalance atomic.Bool  // a relay joined, left or released buckets

	mu     sync.Mutex // guards held for Buckets()
	held   map[int]lease
	cursor map[int]string

	running     atomic.Bool
	stop        chan struct{}
	stopOnce    sync.Once
	releaseOnce sync.Once
	done        chan struct{}
	cancel      atomic.Pointer[context.CancelFunc]
	wake        chan struct{}

	bg        sync.WaitGroup
	vacuuming atomic.Bool
	deleted   int

	seen map[string]struct{} // fetch's lanes, kept between cycles to reuse its memory

	stmts stmts // the statements for the buckets held at the last fetch
}

// stmts are the statements that name the buckets held, rebuilt when they
// change (leases move seldom, so each set is prepared once).
type stmts struct {
	key                               string // the buckets, sorted, comma-separated
	fast, ack, ackSpan, ackEach, fail string
}

// NewRelay returns a relay that publishes o's messages from pool through
// pub. It does nothing until [Relay.Run].
func (o *Outbox) NewRelay(pool *pgxpool.Pool, pub Publisher, cfg RelayConfig) (*Relay, error) {
	if pool == nil {
		return nil, badConfig("pool", "is nil")
	}
	if pub == nil {
		return nil, badConfig("Publisher", "is nil")
	}
	cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	m, err := newMetrics(cfg.MeterProvider, o)
	if err != nil {
		return nil, err
	}
	r := &Relay{
		o: o, pool: pool, pub: pub, cfg: cfg, m: m,
		log:    cfg.Logger.With("outbox", o.cfg.Schema+"."+o.cfg.Table, "relay", cfg.ID),
		held:   map[int]lease{},
		cursor: map[int]string{},
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
		wake:   make(chan struct{}, 1),
	}
	r.control = o.channel + "_relays"
	r.sessionClass = o.lockNS + 2
	// A registration session holds the advisory lock (sessionClass, its
	// pid) until it ends; pg_locks shows it to every session of the
	// cluster. A pid reused by a new session cannot hold that lock unless
	// it is a relay's registration itself.
	r.alive = fmt.Sprintf(`(r.pid IS NULL OR EXISTS (SELECT 1 FROM pg_locks k
	WHERE k.locktype = 'advisory' AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
	AND k.classid = %d::oid AND k.objid = r.pid::oid AND k.objsubid = 2 AND k.granted))`, uint32(r.sessionClass))
	t, l := o.table, o.leases
	// The fast path. Per key, seq order is commit order and a visible row's
	// earlier rows are visible too (see doc.go), so in any prefix of the
	// leased buckets' rows in seq order, read in one snapshot, the first row
	// of each lane is that lane's head. One walk of the primary key gives
	// the heads of every lane present in the first $2 rows; only those are
	// read in full, ready ones first. The leased buckets are written into
	// the statement (see statementsFor).
	r.fastSQL = `SELECT ` + headColumns + ` FROM ` + t + ` t ` + bucketFilter + ` ORDER BY t.seq LIMIT $1`
	// The slow path, for when the prefix is crowded by a few lanes (a hot
	// key, a dead letter or a backing-off message holding many successors):
	// a loose index scan. Per leased bucket, walk the lanes after the
	// bucket's round-robin cursor, one index probe per lane, and take each
	// lane's oldest row, so a long blocked lane costs one probe, not a scan
	// of its backlog.
	r.walkSQL = `WITH RECURSIVE walk(bucket, lane, seq, depth) AS (
	SELECT h.bucket, h.lane, h.seq, 1
	FROM unnest($1::int4[], $2::text[]) AS c(bucket, after)
	CROSS JOIN LATERAL (
		SELECT t.bucket, t.lane, t.seq FROM ` + t + ` t
		WHERE t.bucket = c.bucket AND t.lane > c.after COLLATE "C"
		ORDER BY t.lane, t.seq LIMIT 1) h
	UNION ALL
	SELECT n.bucket, n.lane, n.seq, w.depth + 1
	FROM walk w CROSS JOIN LATERAL (
		SELECT t.bucket, t.lane, t.seq FROM ` + t + ` t
		WHERE t.bucket = w.bucket AND t.lane > w.lane
		ORDER BY t.lane, t.seq LIMIT 1) n
	WHERE w.depth < $3
)
SELECT ` + headColumns + `
FROM walk w CROSS JOIN LATERAL (SELECT * FROM ` + t + ` t WHERE t.seq = w.seq AND t.bucket = w.bucket) t`
	// The fence: the statement that deletes (or records a failure) checks,
	// in its own snapshot, that this relay still holds each bucket at the
	// epoch it published under: the lease rows in held, of the batch's
	// buckets ($2) still owned by this relay ($4) at those epochs ($3). An
	// acknowledgement locks no lease row: racing a takeover it can only
	// delete rows this relay published and the broker acknowledged, so the
	// worst case is a duplicate publish by the new owner, never a loss or a
	// reordered first delivery; once the takeover has committed, the stale
	// relay's statements match nothing.
	held := `FROM ` + l + ` l JOIN unnest($2::int4[], $3::int8[]) AS m(bucket, epoch)
	ON l.bucket = m.bucket AND l.epoch = m.epoch WHERE l.owner = $4`
	fence := `t.bucket = ANY(ARRAY(SELECT l.bucket ` + held + `))`
	// The acknowledgement checks the fence once per statement, not per row:
	// every bucket of the batch still held at its epoch, or nothing is
	// deleted. Only then (a lease lost mid-batch) does ackEachSQL delete
	// the rows of the buckets still held.
	allHeld := `(SELECT count(*) ` + held + `) = cardinality($2::int4[])`
	r.ackSQL = `DELETE FROM ` + t + ` t WHERE t.seq = ANY($1::int8[]) ` + pruneFilter + ` AND ` + allHeld
	// A batch in a short range of seqs (all of it, for one relay holding
	// every bucket on a backlog of distinct keys; every few seqs, when
	// several relays share the table) is deleted by that range: one walk
	// of the primary key rather than a descent per row. A bitmap over the
	// range ($6, bit i for seq $1+i; the offset is int4, which get_bit
	// takes in every version) picks the batch's rows out of it, so it is
	// exact like the list: a row that came into the range since the fetch
	// is not taken.
	r.ackSpanSQL = `DELETE FROM ` + t + ` t WHERE t.seq BETWEEN $1::int8 AND $5::int8 ` + pruneFilter + `
	AND get_bit($6::bytea, (t.seq - $1::int8)::int4) = 1 AND ` + allHeld
	r.ackEachSQL = `DELETE FROM ` + t + ` t WHERE t.seq = ANY($1::int8[]) ` + pruneFilter + ` AND ` + fence
	// Recording a failure locks the lease rows it checks: unlike a
	// deletion, an attempt counted under a lease being taken over would
	// delay, or dead-letter, a message its new owner is publishing. A
	// takeover in progress is waited for, then its new epoch seen.
	lockedFence := `t.bucket = ANY(ARRAY(SELECT l.bucket ` + held + ` FOR SHARE OF l))`
	r.failSQL = `UPDATE ` + t + ` t SET attempts = t.attempts + 1, last_error = f.err,
	next_attempt_at = clock_timestamp() + f.delay_ms * interval '1 millisecond',
	dead_at = CASE WHEN t.attempts + 1 >= $5 THEN clock_timestamp() END
FROM unnest($1::int8[], $6::text[], $7::float8[]) AS f(seq, err, delay_ms)
WHERE t.seq = f.seq ` + pruneFilter + ` AND ` + lockedFence + `
RETURNING t.seq, t.id, t.lane, t.dead_at IS NOT NULL, t.last_error`
	return r, nil
}

// ID returns the relay's ID.
func (r *Relay) ID() string { return r.cfg.ID }

// Buckets returns the buckets this relay currently leases, sorted.
func (r *Relay) Buckets() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]int, 0, len(r.held))
	for b := range r.held {
		out = append(out, b)
	}
	slices.Sort(out)
	return out
}

// ErrRelayRunning: Run was called on a relay that runs or has run.
var ErrRelayRunning = errors.New("outbox: relay already started")

// Run publishes until ctx ends or [Relay.Shutdown] is called. Cancelling ctx
// stops at once, without releasing leases, as after a crash: the other
// relays take the buckets over when they see the relay's session gone
// (within their LivenessInterval); Shutdown hands them over at once, also
// when called after ctx ended. Run returns nil after
// Shutdown, ctx.Err() after cancellation.
func (r *Relay) Run(ctx context.Context) error {
	if !r.running.CompareAndSwap(false, true) {
		return ErrRelayRunning
	}
	defer close(r.done)
	// Cancellable before the first statement: a Shutdown whose ctx ends
	// while the layout check waits on a database that does not answer
	// must be able to stop it.
	ctx, cancel := context.WithCancel(ctx)
	r.cancel.Store(&cancel)
	defer func() {
		cancel() // stops the listener and any vacuum
		r.bg.Wait()
	}()
	// A Shutdown that came first (Run not yet running) also stops the
	// check: nothing else would, on a database that does not answer.
	checkCtx, stopCheck := context.WithCancel(ctx)
	go func() {
		select {
		case <-r.stop:
			stopCheck()
		case <-checkCtx.Done():
		}
	}()
	err := r.checkLayout(checkCtx)
	stopCheck()
	select {
	case <-r.stop:
		return nil
	default:
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return err
	}

	r.bg.Add(2)
	go func() {
		defer r.bg.Done()
		r.listen(ctx)
	}()
	// The gauges are refreshed beside the publishing loop: counting a long
	// backlog is not the loop's work and would hold up its next batch.
	go func() {
		defer r.bg.Done()
		r.refreshStatsEvery(ctx, r.cfg.StatsInterval)
	}()

	r.log.Info("outbox relay started")
	var nextLease time.Time
	errDelay := 50 * time.Millisecond
	for {
		select {
		case <-r.stop:
			return nil // Shutdown releases the leases
		default:
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		now := time.Now()
		if rebalance := r.rebalance.Swap(false); rebalance || !now.Before(nextLease) {
			if err := r.maintainLeases(ctx); err != nil && ctx.Err() == nil {
				r.log.Warn("outbox lease maintenance failed", "err", err)
			}
			nextLease = now.Add(r.cfg.LeaseTTL / 3)
		}
		n, err := r.cycle(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var wait time.Duration
		switch {
		case err != nil:
			r.log.Warn("outbox relay cycle failed", "err", err)
			wait = errDelay
			errDelay = min(2*errDelay, r.cfg.PollInterval)
		case n > 0:
			errDelay = 50 * time.Millisecond
			continue // the next heads of these lanes may be waiting
		default:
			errDelay = 50 * time.Millisecond
			wait = r.cfg.PollInterval
		}
		wait = max(0, min(wait, time.Until(nextLease)))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
		case <-r.stop:
		case <-r.wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// checkLayout refuses to relay a table installed with another bucket count
// or partition count than the relay's Config: it would lease buckets that
// are not the table's, or lease a plain table's way on a partitioned one.
// A relay-only process does not install, so this is where it learns. A
// database that does not answer yet is not a mismatch: the relay rides
// that out as always.
func (r *Relay) checkLayout(ctx context.Context) error {
	var buckets, parts int
	err := r.pool.QueryRow(ctx, `SELECT (SELECT buckets FROM `+r.o.meta+`), `+partitionCount, r.o.table).Scan(&buckets, &parts)
	switch {
	case err != nil:
		r.log.Warn("outbox relay could not check the installed layout", "err", err)
	case buckets != r.o.cfg.Buckets:
		return fmt.Errorf("%w: %s was installed with %d buckets, Config.Buckets is %d", ErrSchemaMismatch, r.o.table, buckets, r.o.cfg.Buckets)
	case parts != r.o.cfg.Partitions:
		return fmt.Errorf("%w: %s was installed with %d partitions, Config.Partitions is %d", ErrSchemaMismatch, r.o.table, parts, r.o.cfg.Partitions)
	}
	return nil
}

// releaseGrace is how long Shutdown may still spend handing the leases
// back once its ctx has ended.
const releaseGrace = time.Second

// Shutdown stops the relay gracefully: the batch in flight completes, its
// leases are released so other relays take over at once, the relay is
// deregistered, and background work is waited for. If ctx ends first the
// relay is stopped abruptly and ctx's error returned.
//
// The leases are released and the relay deregistered in every case, even
// when ctx or Run's context has already ended (as with `go relay.Run(ctx);
// defer relay.Shutdown(ctx)`): that clean-up runs on a context of its own,
// bounded by LeaseTTL (after which the leases would have lapsed anyway) and
// by a second past ctx's end, so Shutdown returns within about a second of
// ctx even when the database does not answer; other relays then take the
// buckets over when they see this relay's session gone. Calling Shutdown
// again does nothing more.
func (r *Relay) Shutdown(ctx context.Context) error {
	r.stopOnce.Do(func() { close(r.stop) })
	if !r.running.Load() {
		return nil
	}
	var err error
	select {
	case <-r.done: // already stopped (its context ended): nothing to wait for
	default:
		select {
		case <-r.done:
		case <-ctx.Done():
			if c := r.cancel.Load(); c != nil {
				(*c)()
			}
			<-r.done
			err = ctx.Err()
		}
	}
	// Run has returned: nothing of this relay is in flight any more.
	r.releaseOnce.Do(func() {
		// Once the caller has stopped waiting, the release gets a grace
		// period, enough for a database that answers; one that does not
		// would otherwise hold Shutdown for LeaseTTL past ctx.
		// (AfterFunc on a ctx that has ended already runs at once.)
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.LeaseTTL)
		defer cancel()
		defer context.AfterFunc(ctx, func() { time.AfterFunc(releaseGrace, cancel) })()
		if r.release(rctx) {
			r.log.Info("outbox relay stopped; leases released")
		}
	})
	return err
}

// listen keeps the relay registered and wakes it on NOTIFY. It holds one
// connection of the pool (the registration session) and registers again
// after a connection failure; polling covers any gap in wake-ups.
func (r *Relay) listen(ctx context.Context) {
	delay := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := r.listenOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		// The registration session is gone, so the other relays take this
		// relay's buckets over: stop publishing for them at once rather
		// than at their local deadlines. Registering again gives them up
		// in the database too, then takes a fair share afresh.
		r.pid.Store(0)
		if held := r.Buckets(); len(held) > 0 {
			r.drop(held...)
			r.log.Warn("outbox relay registration lost; leases dropped", "buckets", held, "err", err)
		} else {
			r.log.Warn("outbox relay registration lost; registering again", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, 5*time.Second)
	}
}

// listenOnce registers the relay on a connection of its own and listens
// until that connection fails or ctx ends. The connection holds the
// session's advisory lock, so the relay's registration dies with it
// (killed process, crash, network reset) and the other relays see that
// in pg_locks within their LivenessInterval.
func (r *Relay) listenOnce(ctx context.Context) error {
	c, err := r.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	conn := c.Hijack() // session lock and LISTEN state must not go back to the pool
	defer conn.Close(context.Background())
	// Register, in one round trip: lock (sessionClass, pid) for the
	// session's life, listen, and give back buckets still leased under
	// this ID (they belong to a dead predecessor, a restart with the same
	// ID, or to this relay before its registration was lost).
	var pid int32
	batch := &pgx.Batch{}
	batch.Queue(`SELECT pg_backend_pid() FROM pg_advisory_lock($1::int4, pg_backend_pid())`, r.sessionClass).
		QueryRow(func(row pgx.Row) error { return row.Scan(&pid) })
	batch.Queue("LISTEN " + pgx.Identifier{r.o.channel}.Sanitize())
	batch.Queue("LISTEN " + pgx.Identifier{r.control}.Sanitize())
	// The registration row is locked before the leases, the order in which
	// another relay reaping a dead predecessor of this ID locks them.
	batch.Queue(`INSERT INTO `+r.o.relays+` (id, seen_at, pid) VALUES ($1, now(), pg_backend_pid())
ON CONFLICT (id) DO UPDATE SET seen_at = now(), pid = EXCLUDED.pid`, r.cfg.ID)
	batch.Queue(`UPDATE `+r.o.leases+` SET owner = NULL, expires_at = '-infinity' WHERE owner = $1`, r.cfg.ID)
	batch.Queue(`SELECT pg_notify($1, $2)`, r.control, r.cfg.ID) // the others rebalance now
	if err := conn.SendBatch(ctx, batch).Close(); err != nil {
		return fmt.Errorf("register relay: %w", err)
	}
	r.pid.Store(pid)
	r.rebalance.Store(true)
	r.signal() // take a share now, and anything committed before LISTEN took effect

	deadSQL := `SELECT EXISTS (SELECT 1 FROM ` + r.o.relays + ` r WHERE r.pid IS NOT NULL AND NOT ` + r.alive + `)`
	nextProbe := time.Now().Add(r.cfg.LivenessInterval)
	for {
		wctx, cancel := context.WithDeadline(ctx, nextProbe)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		switch {
		case err == nil:
			if n.Channel == r.control {
				if n.Payload != r.cfg.ID {
					r.rebalance.Store(true)
				}
			}
			r.signal()
		case ctx.Err() != nil:
			return ctx.Err()
		case !pgconn.Timeout(err) || conn.IsClosed():
			return err
		}
		if time.Now().Before(nextProbe) {
			continue
		}
		var dead bool
		if err := conn.QueryRow(ctx, deadSQL).Scan(&dead); err != nil {
			return fmt.Errorf("look for dead relays: %w", err)
		}
		if dead {
			r.rebalance.Store(true)
			r.signal()
		}
		nextProbe = time.Now().Add(r.cfg.LivenessInterval)
	}
}

func (r *Relay) signal() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// active returns the leased buckets still safe to publish for, their
// epochs, and the earliest local lease deadline.
func (r *Relay) active() (buckets []int32, epochs []int64, deadline time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	for b, l := range r.held {
		if l.deadline.After(now) {
			buckets = append(buckets, int32(b))
			epochs = append(epochs, l.epoch)
			if deadline.IsZero() || l.deadline.Before(deadline) {
				deadline = l.deadline
			}
		}
	}
	return buckets, epochs, deadline
}

func (r *Relay) drop(buckets ...int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, b := range buckets {
		delete(r.held, b)
		delete(r.cursor, b)
	}
}

// maintainLeases heartbeats, gives the buckets of relays whose session
// ended back (at once, not after LeaseTTL), renews the leases held, and
// moves toward its fair share (see share) by releasing
// surplus or acquiring free and expired buckets. Whatever it frees, it
// announces on the control channel so the relays short of their share take
// it at once. It runs between cycles, so nothing of a released bucket is in
// flight. Unregistered (no session yet, or lost), it does nothing.
func (r *Relay) maintainLeases(ctx context.Context) error {
	pid := r.pid.Load()
	if pid == 0 {
		return nil
	}
	start := time.Now()
	ttl := ms(r.cfg.LeaseTTL)
	deadline := start.Add(r.cfg.LeaseTTL - r.cfg.LeaseTTL/10)
	r.mu.Lock()
	var bs []int32
	var es []int64
	for b, l := range r.held {
		bs = append(bs, int32(b))
		es = append(es, l.epoch)
	}
	r.mu.Unlock()

	batch := &pgx.Batch{}
	batch.Queue(`INSERT INTO `+r.o.relays+` (id, seen_at, pid) VALUES ($1, now(), $2)
ON CONFLICT (id) DO UPDATE SET seen_at = now(), pid = EXCLUDED.pid`, r.cfg.ID, pid)
	// A relay whose registration session ended is dead: its row goes and
	// its buckets are freed (the takeover bumps their epochs, fencing off
	// anything of it still in flight).
	var reaped []string
	var freed int
	batch.Queue(`WITH dead AS (DELETE FROM ` + r.o.relays + ` r WHERE r.pid IS NOT NULL AND NOT ` + r.alive + ` RETURNING r.id),
freed AS (UPDATE ` + r.o.leases + ` SET owner = NULL, expires_at = '-infinity' WHERE owner IN (SELECT id FROM dead) RETURNING bucket)
SELECT ARRAY(SELECT id FROM dead), (SELECT count(*) FROM freed)`).QueryRow(func(row pgx.Row) error { return row.Scan(&reaped, &freed) })
	var liveIDs []string
	batch.Queue(`SELECT ARRAY(SELECT r.id FROM `+r.o.relays+` r WHERE r.seen_at > now() - $1 * interval '1 millisecond' AND `+r.alive+`
	ORDER BY r.id COLLATE "C")`, ttl).
		QueryRow(func(row pgx.Row) error { return row.Scan(&liveIDs) })
	renewed := map[int]bool{}
	batch.Queue(`UPDATE `+r.o.leases+` l SET expires_at = now() + $2 * interval '1 millisecond'
FROM unnest($3::int4[], $4::int8[]) AS m(bucket, epoch)
WHERE l.bucket = m.bucket AND l.epoch = m.epoch AND l.owner = $1
RETURNING l.bucket`, r.cfg.ID, ttl, bs, es).Query(func(rows pgx.Rows) error {
		var b int32
		_, err := pgx.ForEachRow(rows, []any{&b}, func() error { renewed[int(b)] = true; return nil })
		return err
	})
	if err := r.pool.SendBatch(ctx, batch).Close(); err != nil {
		return fmt.Errorf("renew leases: %w", err)
	}
	if len(reaped) > 0 {
		r.log.Info("outbox relays gone with their sessions; their buckets freed", "relays", reaped, "buckets", freed)
	}
	r.mu.Lock()
	var lost []int
	for b, l := range r.held {
		if renewed[b] {
			l.deadline = deadline
			r.held[b] = l
		} else {
			lost = append(lost, b)
			delete(r.held, b)
			delete(r.cursor, b)
		}
	}
	have := len(r.held)
	r.mu.Unlock()
	if len(lost) > 0 {
		r.log.Warn("outbox leases lost", "buckets", lost)
	}

	fair, live, lo, hi := r.share(liveIDs)
	announce := freed > 0
	var surplus []int
	if r.o.cfg.Partitions > 1 {
		// Each relay's share is a range of its own ([lo, hi)), so with
		// as many relays as partitions, or a divisor of them, each holds
		// whole partitions; after relays leave and join, the buckets
		// outside a relay's range go back to the relay whose range they
		// are in, at once.
		for _, b := range r.Buckets() {
			if b < lo || b >= hi {
				surplus = append(surplus, b)
			}
		}
	} else {
		// One table: the highest buckets over the share go, and any free
		// bucket is taken, lowest first.
		if have > fair {
			surplus = r.Buckets()[fair:]
		}
		lo, hi = 0, r.o.cfg.Buckets
	}
	if len(surplus) > 0 {
		r.drop(surplus...)
		if _, err := r.pool.Exec(ctx, `UPDATE `+r.o.leases+` SET owner = NULL, expires_at = '-infinity'
WHERE owner = $1 AND bucket = ANY($2::int4[])`, r.cfg.ID, toInt32(surplus)); err != nil {
			return fmt.Errorf("release surplus leases: %w", err)
		}
		announce = true
		have -= len(surplus)
		r.log.Info("outbox leases released to balance", "buckets", surplus, "relays", live)
	}
	if have < fair {
		// Free buckets of the relay's range only: one outside it would go
		// back at the next tick, and two relays each holding the other's
		// would trade them back and forth for ever. Every bucket is in the
		// range of a live relay, which takes it when it is freed.
		rows, err := r.pool.Query(ctx, `UPDATE `+r.o.leases+` l SET owner = $1, epoch = l.epoch + 1,
	expires_at = now() + $2 * interval '1 millisecond'
WHERE l.bucket IN (SELECT bucket FROM `+r.o.leases+`
	WHERE (owner IS NULL OR expires_at < now()) AND bucket >= $4 AND bucket < $5
	ORDER BY bucket LIMIT $3 FOR UPDATE SKIP LOCKED)
RETURNING l.bucket, l.epoch`, r.cfg.ID, ttl, fair-have, lo, hi)
		if err != nil {
			return fmt.Errorf("acquire leases: %w", err)
		}
		var b int32
		var e int64
		var got []int
		_, err = pgx.ForEachRow(rows, []any{&b, &e}, func() error {
			got = append(got, int(b))
			r.mu.Lock()
			r.held[int(b)] = lease{epoch: e, deadline: deadline}
			r.mu.Unlock()
			return nil
		})
		if err != nil {
			return fmt.Errorf("acquire leases: %w", err)
		}
		if len(got) > 0 {
			r.log.Info("outbox leases acquired", "buckets", got, "relays", live)
		}
	}
	if announce {
		if _, err := r.pool.Exec(ctx, `SELECT pg_notify($1, $2)`, r.control, r.cfg.ID); err != nil {
			return fmt.Errorf("announce released leases: %w", err)
		}
	}
	return nil
}

// share is this relay's fair share of the buckets among the live relays
// (sorted by ID): buckets/live, plus one for the first buckets%live of
// them, so the shares add up to the bucket count exactly and the relays
// settle evenly (6/5/5 of 16) rather than leave one short (6/6/4). The
// shares laid end to end in ID order give each relay a range of buckets,
// [lo, hi), which a relay on a partitioned table holds.
func (r *Relay) share(liveIDs []string) (fair, live, lo, hi int) {
	rank, found := slices.BinarySearch(liveIDs, r.cfg.ID)
	if !found {
		// Not seen as live (a clock or visibility race): count in.
		liveIDs = slices.Insert(slices.Clone(liveIDs), rank, r.cfg.ID)
	}
	live = len(liveIDs)
	n := r.o.cfg.Buckets
	fair = n / live
	if rank < n%live {
		fair++
	}
	lo = rank*(n/live) + min(rank, n%live)
	return fair, live, lo, lo + fair
}

// release gives back every lease and deregisters, in one round trip. It
// reports whether that worked.
func (r *Relay) release(ctx context.Context) bool {
	held := r.Buckets()
	r.drop(held...)
	batch := &pgx.Batch{}
	// The registration row goes before the leases: by now the session is
	// closed, so another relay may be reaping this one, and it locks them in
	// that order; the other order deadlocks with it.
	batch.Queue(`DELETE FROM `+r.o.relays+` WHERE id = $1`, r.cfg.ID)
	batch.Queue(`UPDATE `+r.o.leases+` SET owner = NULL, expires_at = '-infinity' WHERE owner = $1`, r.cfg.ID)
	batch.Queue(`SELECT pg_notify($1, $2)`, r.control, r.cfg.ID) // the others take over now
	if err := r.pool.SendBatch(ctx, batch).Close(); err != nil {
		r.log.Warn("outbox lease release failed; the leases lapse after LeaseTTL", "err", err)
		return false
	}
	return true
}

func toInt32(bs []int) []int32 {
	out := make([]int32, len(bs))
	for i, b := range bs {
		out[i] = int32(b)
	}
	return out
}

// heads are rows of a head query, as two parallel slices: recs is what
// the publisher is handed, without another copy.
type heads struct {
	recs []Record
	meta []headMeta
}

// headMeta is what the relay needs of a head besides the record.
type headMeta struct {
	bucket int32
	lane   string
	ready  bool
	// broken says why the row cannot be published as it is stored (a hand
	// edit): it is dead-lettered without a publish.
	broken string
}

func (h *heads) add(rec Record, m headMeta) {
	h.recs = append(h.recs, rec)
	h.meta = append(h.meta, m)
}

// queryHeads runs a head query.
func (r *Relay) queryHeads(ctx context.Context, sql string, capacity int, args ...any) (heads, error) {
	rows, err := r.pool.Query(ctx, sql, append([]any{headFormats}, args...)...)
	if err != nil {
		return heads{}, err
	}
	defer rows.Close()
	var d headDecoder
	if err := d.check(rows.FieldDescriptions()); err != nil {
		// A statement that failed has no columns: its error is the news.
		rows.Close()
		if qerr := rows.Err(); qerr != nil {
			return heads{}, qerr
		}
		return heads{}, err
	}
	hs := heads{recs: make([]Record, 0, capacity), meta: make([]headMeta, 0, capacity)}
	for rows.Next() {
		hs.add(Record{}, headMeta{})
		if err := d.decode(rows.RawValues(), &hs.recs[len(hs.recs)-1], &hs.meta[len(hs.meta)-1]); err != nil {
			return heads{}, err
		}
	}
	return hs, rows.Err()
}

// walk runs the slow path over the leased buckets, advancing each
// bucket's round-robin cursor.
func (r *Relay) walk(ctx context.Context, buckets []int32) (heads, error) {
	depth := max(1, (r.cfg.BatchSize+len(buckets)-1)/len(buckets))
	afters := make([]string, len(buckets))
	r.mu.Lock()
	for i, b := range buckets {
		afters[i] = r.cursor[int(b)]
	}
	r.mu.Unlock()
	hs, err := r.queryHeads(ctx, r.walkSQL, depth*len(buckets), buckets, afters, depth)
	if err != nil {
		return heads{}, err
	}
	// Advance each bucket's cursor; a bucket that had fewer lanes than the
	// depth was walked to its end and starts over.
	perBucket := map[int32]int{}
	last := map[int32]string{}
	for _, m := range hs.meta {
		perBucket[m.bucket]++
		last[m.bucket] = m.lane
	}
	r.mu.Lock()
	for _, b := range buckets {
		if _, ok := r.held[int(b)]; !ok {
			continue
		}
		if perBucket[b] >= depth {
			r.cursor[int(b)] = last[b]
		} else {
			delete(r.cursor, int(b))
		}
	}
	r.mu.Unlock()
	return hs, nil
}

// bucketFilter marks where the fast path's statement filters by the leased
// buckets; pruneFilter where the statements that write name them for a
// partitioned table.
const (
	bucketFilter = "/* buckets */"
	pruneFilter  = "/* prune */"
)

// statementsFor returns the statements for the leased buckets. They are
// written into them rather than passed:
//   - in the fast path, a parameter makes the planner's generic plan
//     search the array row by row, while a constant array is searched by
//     hash, and holding every bucket needs no filter at all;
//   - on a partitioned table, constant bucket ranges let the planner leave
//     the other relays' partitions out of the writes, which would
//     otherwise walk their rows in the same seq range.
//
// A relay's bucket set changes only when leases move, so it prepares few
// statements.
func (r *Relay) statementsFor(buckets []int32) *stmts {
	sorted := slices.Clone(buckets)
	slices.Sort(sorted)
	var key strings.Builder
	for i, b := range sorted {
		if i > 0 {
			key.WriteByte(',')
		}
		key.WriteString(strconv.Itoa(int(b)))
	}
	if key.String() == r.stmts.key {
		return &r.stmts
	}
	all := len(sorted) == r.o.cfg.Buckets
	filter := `WHERE t.bucket = ANY('{` + key.String() + `}'::int4[])`
	if all {
		// Every bucket: a range, so a row whose bucket was edited out of
		// it (no lease fences it, so no acknowledgement would delete it)
		// is not published over and over.
		filter = fmt.Sprintf(`WHERE t.bucket BETWEEN 0 AND %d`, r.o.cfg.Buckets-1)
	}
	prune := ""
	if r.o.cfg.Partitions > 1 && !all {
		prune = "AND " + bucketRanges(sorted)
	}
	w := func(sql string) string { return strings.Replace(sql, pruneFilter, prune, 1) }
	r.stmts = stmts{key: key.String(), fast: strings.Replace(r.fastSQL, bucketFilter, filter, 1),
		ack: w(r.ackSQL), ackSpan: w(r.ackSpanSQL), ackEach: w(r.ackEachSQL), fail: w(r.failSQL)}
	return &r.stmts
}

// bucketRanges is a condition true for the sorted buckets, as ranges: a
// btree checks a range of the primary key's second column within the seq
// range it walks, where a list would be searched element by element.
func bucketRanges(sorted []int32) string {
	var parts []string
	for i := 0; i < len(sorted); {
		j := i
		for j+1 < len(sorted) && sorted[j+1] == sorted[j]+1 {
			j++
		}
		parts = append(parts, fmt.Sprintf("t.bucket BETWEEN %d AND %d", sorted[i], sorted[j]))
		i = j + 1
	}
	return "(" + strings.Join(parts, " OR ") + ")"
}

// fetch returns up to BatchSize ready heads of the leased buckets, in seq
// order, and the ready heads that cannot be published as stored.
func (r *Relay) fetch(ctx context.Context, buckets []int32) (heads, heads, error) {
	window := r.cfg.BatchSize
	hs, err := r.queryHeads(ctx, r.statementsFor(buckets).fast, window, window)
	if err != nil {
		return heads{}, heads{}, fmt.Errorf("fetch: %w", err)
	}
	var broken heads
	scanned := len(hs.recs)
	// The batch is gathered in place, over the rows already read.
	batch := heads{recs: hs.recs[:0], meta: hs.meta[:0]}
	if r.seen == nil {
		r.seen = make(map[string]struct{}, window)
	}
	seen := r.seen
	clear(seen)
	take := func(from heads) {
		for i, m := range from.meta {
			if _, ok := seen[m.lane]; ok {
				continue
			}
			seen[m.lane] = struct{}{}
			switch {
			case m.ready && m.broken != "":
				broken.add(from.recs[i], m)
			case m.ready && len(batch.recs) < r.cfg.BatchSize:
				batch.add(from.recs[i], m)
			}
		}
	}
	take(hs)
	if scanned >= window && len(batch.recs) < max(1, r.cfg.BatchSize/4) {
		// The window was full but yielded few heads: a few lanes crowd the
		// front of the queue. Find the other lanes' heads past them.
		more, err := r.walk(ctx, buckets)
		if err != nil {
			return heads{}, heads{}, fmt.Errorf("fetch: %w", err)
		}
		take(more)
	}
	return batch, broken, nil
}

// cycle publishes one batch: the ready head of each lane found, at most
// BatchSize (so a key has at most one message in flight). It returns how
// many heads it published or failed.
//
// The next batch is not fetched while this one is published: on a
// database short of CPU the fetch and the acknowledgement, run at once,
// slowed each other by more than the overlap saved (measured, relay
// benchmark: a 1,000-message cycle 16-20 ms overlapped, 10-11 ms in turn).
func (r *Relay) cycle(ctx context.Context) (int, error) {
	buckets, epochs, deadline := r.active()
	if len(buckets) == 0 {
		return 0, nil
	}
	epochOf := make(map[int32]int64, len(buckets))
	for i, b := range buckets {
		epochOf[b] = epochs[i]
	}
	hs, broken, err := r.fetch(ctx, buckets)
	if err != nil {
		return 0, err
	}
	if len(broken.recs) > 0 {
		if err := r.deadLetter(ctx, broken, epochOf); err != nil {
			return 0, err
		}
	}
	if len(hs.recs) == 0 {
		return len(broken.recs), nil
	}
	bucketOf := make([]int32, len(hs.meta))
	for i, m := range hs.meta {
		bucketOf[i] = m.bucket
	}
	return r.deliver(ctx, hs.recs, bucketOf, epochOf, deadline)
}

// deliver publishes a batch and acknowledges or records the failure of
// each record, fenced by the leases' epochs.
func (r *Relay) deliver(ctx context.Context, batch []Record, bucketOf []int32, epochOf map[int32]int64, deadline time.Time) (int, error) {
	pctx, cancel := context.WithDeadline(ctx, minTime(deadline, time.Now().Add(r.cfg.PublishTimeout)))
	results := r.pub.Publish(pctx, batch)
	cancel()
	if ctx.Err() != nil {
		return 0, ctx.Err()
	}
	if len(results) != len(batch) {
		err := fmt.Errorf("publisher returned %d results for %d records", len(results), len(batch))
		results = make([]error, len(batch))
		for i := range results {
			results[i] = err
		}
	}
	okSeqs := make([]int64, 0, len(batch))
	okCreated := make([]time.Time, 0, len(batch))
	okB := make([]int32, 0, len(batch))
	var failSeqs []int64
	var failB []int32
	var failErrs []string
	var failDelay []float64
	for i, err := range results {
		if err == nil {
			okSeqs = append(okSeqs, batch[i].Seq)
			okCreated = append(okCreated, batch[i].CreatedAt)
			okB = append(okB, bucketOf[i])
			continue
		}
		failSeqs = append(failSeqs, batch[i].Seq)
		failB = append(failB, bucketOf[i])
		failErrs = append(failErrs, truncate(err.Error(), 2000))
		failDelay = append(failDelay, ms(r.backoff(batch[i].Attempts+1)))
	}
	if len(okSeqs) > 0 {
		if err := r.ack(ctx, okSeqs, okCreated, okB, epochOf); err != nil {
			return len(batch), err
		}
	}
	if len(failSeqs) > 0 {
		r.m.publishErrors.Add(ctx, int64(len(failSeqs)), r.m.attrs)
		if err := r.fail(ctx, failSeqs, failB, epochOf, failErrs, failDelay, r.cfg.MaxAttempts); err != nil {
			return len(batch), err
		}
	}
	return len(batch), nil
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// fenceArgs lists the distinct buckets of a batch with the epochs held.
func fenceArgs(bs []int32, epochOf map[int32]int64) ([]int32, []int64) {
	seen := map[int32]bool{}
	var buckets []int32
	var epochs []int64
	for _, b := range bs {
		if !seen[b] {
			seen[b] = true
			buckets = append(buckets, b)
			epochs = append(epochs, epochOf[b])
		}
	}
	return buckets, epochs
}

func (r *Relay) ack(ctx context.Context, seqs []int64, created []time.Time, bs []int32, epochOf map[int32]int64) error {
	buckets, epochs := fenceArgs(bs, epochOf)
	var affected int64
	var now time.Time
	b := &pgx.Batch{}
	// An acknowledgement lost with a database crash only makes a duplicate
	// (the row is published again, after its earlier attempt), so its
	// commit does not wait for the WAL to reach disk. The setting is local
	// to the batch's transaction; the pooled connection keeps its own.
	b.Queue(`SELECT set_config('synchronous_commit', 'off', true)`)
	var del *pgx.QueuedQuery
	if first, last := slices.Min(seqs), slices.Max(seqs); last-first < maxSpan*int64(len(seqs)) {
		del = b.Queue(r.stmts.ackSpan, first, buckets, epochs, r.cfg.ID, last, bitmap(seqs, first, last))
	} else {
		del = b.Queue(r.stmts.ack, seqs, buckets, epochs, r.cfg.ID)
	}
	del.Exec(func(ct pgconn.CommandTag) error {
		affected = ct.RowsAffected()
		return nil
	})
	// The database clock, as the rows' created_at, in the same round trip.
	b.Queue(`SELECT clock_timestamp()`).QueryRow(func(row pgx.Row) error { return row.Scan(&now) })
	if err := r.pool.SendBatch(ctx, b).Close(); err != nil {
		return fmt.Errorf("ack: %w", err)
	}
	if affected == 0 && len(buckets) > 1 {
		// A bucket changed hands since fetch: delete what is still held.
		ct, err := r.pool.Exec(ctx, r.stmts.ackEach, seqs, buckets, epochs, r.cfg.ID)
		if err != nil {
			return fmt.Errorf("ack: %w", err)
		}
		affected = ct.RowsAffected()
	}
	n := int(affected)
	if n == len(seqs) {
		for _, c := range created {
			r.m.commitToAck.Record(ctx, now.Sub(c).Seconds(), r.m.attrs)
		}
	}
	r.m.published.Add(ctx, int64(n), r.m.attrs)
	if n < len(seqs) {
		// Fenced off: some bucket changed hands since fetch. Those rows
		// stay for the new owner (a duplicate publish, never a loss).
		r.log.Warn("outbox ack fenced off: lease lost mid-batch", "acked", n, "published", len(seqs))
		r.forceRenew(ctx)
	}
	r.deleted += n
	r.maybeVacuum(ctx)
	return nil
}

// maxSpan bounds the range a batch is deleted by, in rows of the range per
// row of the batch: the walk of the range reads every row in it.
const maxSpan = 8

// bitmap has bit i set, least significant first within each byte (as
// PostgreSQL's get_bit counts), for each seq first+i in seqs.
func bitmap(seqs []int64, first, last int64) []byte {
	bits := make([]byte, (last-first)/8+1)
	for _, s := range seqs {
		i := s - first
		bits[i/8] |= 1 << (i % 8)
	}
	return bits
}

// forceRenew re-checks leases right away after a fenced-off write.
func (r *Relay) forceRenew(ctx context.Context) {
	if err := r.maintainLeases(ctx); err != nil && ctx.Err() == nil {
		r.log.Warn("outbox lease maintenance failed", "err", err)
	}
}

// deadLetter records heads that cannot be published as stored as dead
// letters at once: publishing them again would not help, and an operator
// must fix or skip them (their keys wait meanwhile, as for any dead letter).
func (r *Relay) deadLetter(ctx context.Context, hs heads, epochOf map[int32]int64) error {
	seqs := make([]int64, len(hs.recs))
	bs := make([]int32, len(hs.recs))
	errs := make([]string, len(hs.recs))
	delays := make([]float64, len(hs.recs))
	for i, rec := range hs.recs {
		seqs[i], bs[i], errs[i] = rec.Seq, hs.meta[i].bucket, "not published: "+hs.meta[i].broken
	}
	r.m.publishErrors.Add(ctx, int64(len(seqs)), r.m.attrs)
	return r.fail(ctx, seqs, bs, epochOf, errs, delays, 1)
}

// fail records a failed attempt of each seq, fenced by the leases; one that
// reaches maxAttempts becomes a dead letter.
func (r *Relay) fail(ctx context.Context, seqs []int64, bs []int32, epochOf map[int32]int64, errs []string, delays []float64, maxAttempts int) error {
	buckets, epochs := fenceArgs(bs, epochOf)
	rows, err := r.pool.Query(ctx, r.stmts.fail, seqs, buckets, epochs, r.cfg.ID, maxAttempts, errs, delays)
	if err != nil {
		return fmt.Errorf("record failure: %w", err)
	}
	var seq int64
	var id uuid.UUID
	var lane string
	var dead bool
	var lastErr string
	n := 0
	_, err = pgx.ForEachRow(rows, []any{&seq, &id, &lane, &dead, &lastErr}, func() error {
		n++
		if dead {
			r.m.deadLetters.Add(ctx, 1, r.m.attrs)
			r.log.Error("outbox message dead-lettered; its key is held until it is retried or skipped",
				"id", id, "lane", lane, "seq", seq, "max_attempts", maxAttempts, "err", lastErr)
		} else {
			r.m.retries.Add(ctx, 1, r.m.attrs)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("record failure: %w", err)
	}
	if n < len(seqs) {
		r.forceRenew(ctx)
	}
	return nil
}

// backoff is the delay before attempt n+1: exponential from BackoffMin,
// capped at BackoffMax, with "equal jitter" (half fixed, half random) so
// retries of many keys do not synchronise.
func (r *Relay) backoff(attempt int) time.Duration {
	d := r.cfg.BackoffMax
	if attempt < 40 {
		d = min(r.cfg.BackoffMin<<(attempt-1), r.cfg.BackoffMax)
	}
	half := d / 2
	return half + time.Duration(mrand.Int64N(int64(half)+1))
}

// maybeVacuum keeps dead tuples of delivered rows bounded: after
// VacuumEvery deletions it vacuums the table in the background, one relay
// at a time (a session advisory lock), without blocking publishing. It
// does not truncate the table: cutting its empty tail takes an exclusive
// lock, which every Enqueue and fetch holds off (the vacuum retried it for
// 50ms at a time, while the backlog of the next rounds grew the table), and
// the space is reused by the next messages anyway.
func (r *Relay) maybeVacuum(ctx context.Context) {
	if r.cfg.VacuumEvery < 0 || r.deleted < r.cfg.VacuumEvery || !r.vacuuming.CompareAndSwap(false, true) {
		return
	}
	r.deleted = 0
	r.bg.Add(1)
	go func() {
		defer r.bg.Done()
		defer r.vacuuming.Store(false)
		if err := r.o.vacuum(ctx, r.pool, r.Buckets()); err != nil && ctx.Err() == nil {
			r.log.Warn("outbox vacuum failed; relying on autovacuum", "err", err)
		}
	}()
}

// vacuum vacuums the table, or on a partitioned table the partitions
// holding buckets (those the relay holds), each by one relay at a time.
func (o *Outbox) vacuum(ctx context.Context, pool *pgxpool.Pool, buckets []int) error {
	c, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	targets := map[int]string{-2: o.table} // advisory lock key -> what to vacuum
	if o.cfg.Partitions > 1 {
		targets = map[int]string{}
		for _, b := range buckets {
			p := o.partitionOf(b)
			targets[-1000-p] = o.partition(p)
		}
	}
	for key, target := range targets {
		var got bool
		if err := c.QueryRow(ctx, `SELECT pg_try_advisory_lock($1::int4, $2::int4)`, o.lockNS+1, key).Scan(&got); err != nil {
			return err
		}
		if !got {
			continue
		}
		_, err = c.Exec(ctx, `VACUUM (TRUNCATE false) `+target)
		c.Exec(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1::int4, $2::int4)`, o.lockNS+1, key)
		if err != nil {
			return err
		}
	}
	return nil
}
