package backfill

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"golang.org/x/sync/errgroup"

	"github.com/dimmer-dev/dimmer/flags"
)

// Result is what one Run did.
type Result struct {
	Job string
	// Rows copied by this process in this run, and in how many chunks.
	Rows, Chunks int64
	// Fallbacks counts chunks whose plain insert met a row written into the
	// target meanwhile (a dual write) and were redone by the version-guarded
	// upsert.
	Fallbacks int64
	// AlreadyDone: the job had finished at this epoch before; nothing ran.
	AlreadyDone bool
	Epoch       int64
	Elapsed     time.Duration
}

// runner is a job resolved for running.
type runner struct {
	b    *Backfiller
	j    *Job
	cfg  Config
	src  querier
	sh   *shape
	fp   string
	doc  string
	fast bool
	// plain: the fast path may insert the rows the target lacks without
	// ON CONFLICT (the target's keys are the source's, no Exprs on them).
	plain bool
	// inPlace: Target is Source; chunks update the Exprs columns.
	inPlace bool
	txPG    *PGSink // written in the checkpoint's transaction
	sink    Sink    // committed on its own, checkpoint right after
	pace    *pacer
	duty    *duty
	// idle wakes this process's idle workers when one of its ranges ends:
	// the last range of the job may have ended, or an idle worker may
	// find one to split. Other processes' ranges are polled.
	idle  *broadcast
	track *tracker
	epoch int64
	// sess holds this process's range locks (see session).
	sess *session
}

func (b *Backfiller) open(ctx context.Context, j *Job) (*runner, error) {
	if err := j.Validate(); err != nil {
		return nil, err
	}
	r := &runner{b: b, j: j, cfg: j.Config.withDefaults(), src: b.pool, idle: newBroadcast()}
	if r.cfg.LockSourceRows {
		r.cfg.TargetChunkTime = min(r.cfg.TargetChunkTime, r.cfg.LockTime)
	}
	if j.SourcePool != nil {
		r.src = j.SourcePool
	}
	sh, err := resolve(ctx, r.src, j)
	if err != nil {
		return nil, err
	}
	r.sh = sh
	spec := SinkSpec{Key: j.Spec.Key, Columns: sh.cols, VersionColumn: j.Spec.VersionColumn}
	sink := j.Sink
	if sink == nil {
		if sink, err = NewPGSink(b.pool, j.Spec.Target); err != nil {
			return nil, err
		}
	}
	if err := sink.Open(ctx, spec); err != nil {
		return nil, err
	}
	if pg, ok := sink.(*PGSink); ok && pg.pool == b.pool {
		r.txPG = pg
		r.fast = j.Transform == nil && r.src == querier(b.pool)
		r.plain = r.fast
		for _, k := range j.Spec.Key {
			if _, ok := j.Spec.Exprs[k]; ok {
				r.plain = false
			}
		}
		if j.Spec.Target.sql() == j.Spec.Source.sql() {
			// In place: every key is present, every row copied is updated
			// and stays locked until the chunk commits.
			r.plain = false
			r.inPlace = true
			lock := r.cfg.LockTime
			if j.Config.LockTime <= 0 {
				lock = inPlaceLockTime
			}
			r.cfg.TargetChunkTime = min(r.cfg.TargetChunkTime, lock)
		}
	} else {
		r.sink = sink
	}
	if pg, ok := sink.(*PGSink); ok && !r.inPlace {
		// An in-place fill updates the Exprs columns of rows that exist.
		if err := pg.checkWritable(ctx, spec); err != nil {
			return nil, err
		}
	}
	desc := sink.Describe()
	if r.txPG != nil {
		// Whatever address each process reaches it by, this is the database
		// the checkpoints are in.
		desc = localSinkDesc(j.Spec.Target)
	}
	r.fp, r.doc = j.fingerprint(desc)
	return r, nil
}

// inPlaceLockTime is an in-place fill's default LockTime. Its UPDATE
// locks every row of the chunk against every write until it commits
// (LockSourceRows' FOR KEY SHARE only holds back deletes and key
// updates), so the share of the service's writes that meet a locked row
// grows with the fill's rate times its chunk time: at 50ms a fill of a
// 300,000-row table at 200,000 rows/s held about 1.7% of the rows at any
// moment, enough to reach the service's p99.
const inPlaceLockTime = 20 * time.Millisecond

// inPlaceTableShare bounds an in-place fill's chunk, as a share of the
// table's estimated rows (never below MinChunk).
const inPlaceTableShare = 0.005

// stageAllows refuses a run in a stage where a backfill would lose rows
// (off: nothing dual-writes the rows created after the upper bound) or is
// pointless (complete).
func stageAllows(migration string, st flags.State, cfg Config) error {
	if (st.Stage == flags.Off && !cfg.AllowStageOff) || st.Stage == flags.Complete {
		return fmt.Errorf("%w: %s is %s; run the backfill in %s (every instance then writes new, so the rows created after the upper bound are covered)",
			ErrStageNotReady, migration, st.Stage, flags.DualWrite)
	}
	return nil
}

// stageOf reads the migration's stage and epoch (off and 0 without a store).
func (b *Backfiller) stageOf(ctx context.Context, migration string) (flags.State, error) {
	if b.store == nil {
		return flags.State{Migration: migration, Stage: flags.DualWrite}, nil
	}
	st, err := b.store.Load(ctx, migration)
	if err != nil {
		return st, fmt.Errorf("backfill: read stage of %s: %w", migration, err)
	}
	return st, nil
}

// Run copies the job to completion (or until ctx ends, an error, or the
// migration's epoch changes), resuming from its checkpoints. Several
// processes may Run the same job at once: they share its ranges by lease.
func (b *Backfiller) Run(ctx context.Context, j Job) (Result, error) {
	start := time.Now()
	r, err := b.open(ctx, &j)
	if err != nil {
		return Result{}, err
	}
	st, err := b.stageOf(ctx, j.Migration)
	if err != nil {
		return Result{}, err
	}
	if err := stageAllows(j.Migration, st, r.cfg); err != nil {
		return Result{}, err
	}
	r.epoch = st.Epoch
	res := Result{Job: j.Name, Epoch: st.Epoch}
	// The lease session connects while the job is prepared: a new
	// connection is slower than the planning of a small job.
	r.sess = newSession(b, j.Name)
	defer r.sess.close(ctx)
	go r.sess.preconnect(ctx)
	done, err := r.prepare(ctx)
	if err != nil {
		return res, err
	}
	if done {
		res.AlreadyDone = true
		res.Elapsed = time.Since(start)
		return res, nil
	}
	if r.inPlace && r.track.total > 0 {
		// A service write waits when it meets a row of the chunk being
		// filled, so the share of writes that wait is the chunk's share of
		// the table, whatever its time: a 20ms chunk of a fast fill is
		// thousands of rows, several percent of a small table. Holding
		// the chunk under inPlaceTableShare keeps that share under the
		// service's p99.
		r.cfg.MaxChunk = min(r.cfg.MaxChunk, max(r.cfg.MinChunk, int(float64(r.track.total)*inPlaceTableShare)))
		r.cfg.InitialChunk = min(r.cfg.InitialChunk, r.cfg.MaxChunk)
	}
	if r.cfg.RowsPerSecond > 0 {
		r.pace = &pacer{rate: r.cfg.RowsPerSecond}
	}
	if len(r.cfg.Signals) > 0 {
		r.duty = newDuty()
	}
	g, gctx := errgroup.WithContext(ctx)
	var mu sync.Mutex
	finished := make(chan struct{})
	var workers sync.WaitGroup
	for i := range r.cfg.Workers {
		workers.Add(1)
		id := fmt.Sprintf("%s/%d", b.workerID, i)
		g.Go(func() error {
			defer workers.Done()
			w := &worker{id: id, sz: newSizer(r.cfg)}
			err := r.work(gctx, w)
			mu.Lock()
			res.Rows += w.rows
			res.Chunks += w.chunks
			res.Fallbacks += w.fallbacks
			mu.Unlock()
			return err
		})
	}
	g.Go(func() error { workers.Wait(); close(finished); return nil })
	if b.store != nil {
		g.Go(func() error { return r.watchEpoch(gctx, finished) })
	}
	if err := g.Wait(); err != nil {
		res.Elapsed = time.Since(start)
		return res, err
	}
	if _, err := b.pool.Exec(ctx, `UPDATE `+b.t.jobs+` SET done = true, finished_at = now(), updated_at = now()
WHERE name = $1 AND NOT done AND NOT EXISTS (SELECT 1 FROM `+b.t.ranges+` WHERE job = $1 AND NOT done)`, j.Name); err != nil {
		return res, fmt.Errorf("backfill: %s: mark done: %w", j.Name, err)
	}
	res.Elapsed = time.Since(start)
	b.logger.Info("backfill done", "job", j.Name, "rows", res.Rows, "elapsed", res.Elapsed)
	return res, nil
}

// watchEpoch stops the job when the migration goes back to off: new is
// stale from then on and the job must start over.
func (r *runner) watchEpoch(ctx context.Context, finished <-chan struct{}) error {
	t := time.NewTicker(r.cfg.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-finished:
			return nil
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		st, err := r.b.stageOf(ctx, r.j.Migration)
		if err != nil {
			r.b.logger.Warn("backfill: cannot read the stage flag", "job", r.j.Name, "err", err)
			continue
		}
		if st.Epoch != r.epoch {
			return fmt.Errorf("%w: %s went back to off (epoch %d -> %d): the new side is stale; run the job again",
				ErrEpochChanged, r.j.Migration, r.epoch, st.Epoch)
		}
	}
}

// prepare registers the job or checks that the stored one is the same, and
// plans the ranges when none are current. It reports whether the job is
// already done at this epoch.
func (r *runner) prepare(ctx context.Context) (bool, error) {
	b := r.b
	tx, err := b.pool.Begin(ctx)
	if err != nil {
		return false, fmt.Errorf("backfill: %s: %w", r.j.Name, err)
	}
	defer rollback(ctx, tx)
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('dimmer.backfill.job/' || $1, 0))`, b.schema+"/"+r.j.Name); err != nil {
		return false, fmt.Errorf("backfill: %s: %w", r.j.Name, err)
	}
	var def, spec string
	var epoch, est int64
	var done bool
	var nranges int
	err = tx.QueryRow(ctx, `SELECT definition, spec::text, epoch, done, ranges, estimated_rows FROM `+b.t.jobs+` WHERE name = $1`, r.j.Name).
		Scan(&def, &spec, &epoch, &done, &nranges, &est)
	fresh := errors.Is(err, pgx.ErrNoRows)
	if err != nil && !fresh {
		return false, fmt.Errorf("backfill: %s: read job: %w", r.j.Name, err)
	}
	if !fresh {
		if def != r.fp {
			return false, &DefinitionChangedError{Job: r.j.Name, Stored: def, Given: r.fp, StoredSpec: spec, GivenSpec: r.doc}
		}
		if epoch == r.epoch {
			var rowsDone int64
			var rangesDone int
			if err := tx.QueryRow(ctx, `SELECT coalesce(sum(rows_done), 0)::int8, count(*) FILTER (WHERE done)::int FROM `+b.t.ranges+` WHERE job = $1`, r.j.Name).
				Scan(&rowsDone, &rangesDone); err != nil {
				return false, fmt.Errorf("backfill: %s: read ranges: %w", r.j.Name, err)
			}
			r.track = newTracker(r.j.Name, rowsDone, est, nranges, rangesDone, r.cfg.Progress, b.m)
			return done, tx.Commit(ctx)
		}
		b.logger.Warn("backfill: the migration went back to off since this job ran: starting over", "job", r.j.Name,
			"stored_epoch", epoch, "epoch", r.epoch)
		if _, err := tx.Exec(ctx, `DELETE FROM `+b.t.ranges+` WHERE job = $1`, r.j.Name); err != nil {
			return false, fmt.Errorf("backfill: %s: reset: %w", r.j.Name, err)
		}
	}
	ks, err := planKeyspace(ctx, r.src, r.sh, r.j.Config)
	if err != nil {
		return false, err
	}
	rs := rangesOf(ks)
	if _, err := tx.Exec(ctx, `INSERT INTO `+b.t.jobs+` (name, migration, definition, spec, epoch, upper_bound, ranges, estimated_rows)
VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8)
ON CONFLICT (name) DO UPDATE SET epoch = EXCLUDED.epoch, upper_bound = EXCLUDED.upper_bound, ranges = EXCLUDED.ranges,
	estimated_rows = EXCLUDED.estimated_rows, done = false, started_at = now(), finished_at = NULL, updated_at = now()`,
		r.j.Name, r.j.Migration, r.fp, r.doc, r.epoch, ks.upper, len(rs), ks.estimate); err != nil {
		return false, fmt.Errorf("backfill: %s: register job: %w", r.j.Name, err)
	}
	for i, kr := range rs {
		if _, err := tx.Exec(ctx, `INSERT INTO `+b.t.ranges+` (job, id, lo, hi, cursor, est_rows) VALUES ($1, $2, $3, $4, $3, $5)`,
			r.j.Name, i, kr.Lo, kr.Hi, ks.estimate/int64(len(rs))); err != nil {
			return false, fmt.Errorf("backfill: %s: register ranges: %w", r.j.Name, err)
		}
	}
	r.track = newTracker(r.j.Name, 0, ks.estimate, len(rs), 0, r.cfg.Progress, b.m)
	return false, tx.Commit(ctx)
}

// lease is a range held by one worker; token fences it against a worker
// that took it over.
type lease struct {
	id     int
	hi     []string
	cursor []string
	token  int64
}

var errPaused = errors.New("backfill: paused")

// worker is one copying goroutine's state.
type worker struct {
	id                      string
	sz                      *sizer
	rows, chunks, fallbacks int64
	// upsertLeft chunks go straight to the upsert after a plain insert met
	// a dual write; upsertRun is how many the next fallback will skip, doubled
	// by every fallback in a row, so a range that dual writes keep filling
	// does not pay for two statements per chunk.
	upsertLeft, upsertRun int
}

const (
	minUpsertRun = 4
	maxUpsertRun = 64
)

// work claims ranges until none is left anywhere.
func (r *runner) work(ctx context.Context, w *worker) error {
	for {
		wake := r.idle.ch()
		l, paused, remaining, err := r.claim(ctx, w.id)
		if err != nil {
			return err
		}
		switch {
		case l != nil:
			// A claim is something to split for a worker of this process
			// that found nothing: it may have looked before the claim
			// committed, and would otherwise wait out PollInterval.
			r.idle.signal()
		case remaining == 0:
			return nil
		case paused != "":
			r.track.hold(ctx, "paused: "+paused, r.cfg.PollInterval)
			if err := sleep(ctx, r.cfg.PollInterval); err != nil {
				return err
			}
			continue
		default:
			// Every remaining range is leased: split the one with the most
			// left, or, when none is worth splitting, wait for the others to
			// finish (or for the lease of a dead one to expire).
			if l, err = r.steal(ctx, w); err != nil {
				return err
			}
			if l != nil {
				// A new range: nobody else can hold its lock.
				if _, _, err := r.sess.tryLock(ctx, l.id); err != nil {
					r.b.logger.Warn("backfill: lease session", "job", r.j.Name, "err", err)
				}
			}
			if l == nil {
				if err := r.idle.wait(ctx, wake, r.cfg.PollInterval); err != nil {
					return err
				}
				continue
			}
		}
		err = r.copyRange(ctx, w, l)
		r.sess.unlock(ctx, l.id)
		switch {
		case errors.Is(err, ErrLeaseLost):
			r.b.logger.Warn("backfill: range taken over by another worker", "job", r.j.Name, "range", l.id, "worker", w.id)
		case errors.Is(err, errPaused):
			r.release(ctx, l)
		case err != nil:
			rctx, cancel := detached(ctx)
			r.release(rctx, l)
			cancel()
			return err
		}
	}
}

// claim leases a free range: one whose lease expired, or whose lock (see
// session) this process can take because its holder's session is gone.
func (r *runner) claim(ctx context.Context, worker string) (*lease, string, int, error) {
	b := r.b
	type cand struct {
		id      int
		expired bool
	}
	rows, err := b.pool.Query(ctx, `SELECT id, lease_until < clock_timestamp() FROM `+b.t.ranges+`
WHERE job = $1 AND NOT done AND NOT (SELECT paused FROM `+b.t.jobs+` WHERE name = $1)
ORDER BY lease_until < clock_timestamp() DESC, id`, r.j.Name)
	if err != nil {
		return nil, "", 0, fmt.Errorf("backfill: %s: claim a range: %w", r.j.Name, err)
	}
	cands, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (cand, error) {
		var c cand
		return c, row.Scan(&c.id, &c.expired)
	})
	if err != nil {
		return nil, "", 0, fmt.Errorf("backfill: %s: claim a range: %w", r.j.Name, err)
	}
	for _, c := range cands {
		locked, ours, err := r.sess.tryLock(ctx, c.id)
		if err != nil {
			// Without the session, ranges are claimed by lease expiry alone.
			b.logger.Warn("backfill: lease session", "job", r.j.Name, "err", err)
		}
		if ours || (!c.expired && !locked) {
			// Its holder lives. A range another worker of this process
			// holds may still look expired here (its claim not committed
			// yet): taking it would cost that worker its lease, and the
			// loser would let go of the lock the winner then holds.
			continue
		}
		// The claim commits without waiting for the WAL flush: a claim a
		// server crash loses leaves the range free and the token where it
		// was, so the claimant's first chunk fails the token check.
		var l lease
		err = b.pool.QueryRow(ctx, `WITH async AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))
UPDATE `+b.t.ranges+` SET owner = $3, token = token + 1,
	lease_until = clock_timestamp() + make_interval(secs => $4), updated_at = now()
WHERE (job, id) = (SELECT job, id FROM `+b.t.ranges+` WHERE job = $1 AND id = $2 AND NOT done
	AND (lease_until < clock_timestamp() OR $5) AND NOT (SELECT paused FROM `+b.t.jobs+` WHERE name = $1)
	FOR UPDATE SKIP LOCKED) AND EXISTS (SELECT FROM async)
RETURNING id, hi, cursor, token`, r.j.Name, c.id, worker, r.cfg.LeaseTTL.Seconds(), locked).Scan(&l.id, &l.hi, &l.cursor, &l.token)
		if err == nil {
			return &l, "", 1, nil
		}
		if locked {
			r.sess.unlock(ctx, c.id)
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return nil, "", 0, fmt.Errorf("backfill: %s: claim a range: %w", r.j.Name, err)
		}
	}
	var paused bool
	var reason string
	var remaining int
	if err := b.pool.QueryRow(ctx, `SELECT j.paused, j.pause_reason, (SELECT count(*) FROM `+b.t.ranges+` WHERE job = $1 AND NOT done)::int
FROM `+b.t.jobs+` j WHERE j.name = $1`, r.j.Name).Scan(&paused, &reason, &remaining); err != nil {
		return nil, "", 0, fmt.Errorf("backfill: %s: read job: %w", r.j.Name, err)
	}
	if paused && reason == "" {
		reason = "no reason given"
	}
	if !paused {
		reason = ""
	}
	return nil, reason, remaining, nil
}

func (r *runner) release(ctx context.Context, l *lease) {
	if _, err := r.b.pool.Exec(ctx, `UPDATE `+r.b.t.ranges+` SET owner = NULL, lease_until = '-infinity'
WHERE job = $1 AND id = $2 AND token = $3`, r.j.Name, l.id, l.token); err != nil {
		r.b.logger.Warn("backfill: release range", "job", r.j.Name, "range", l.id, "err", err)
	}
}

// copyRange copies chunks of one leased range until it is done.
func (r *runner) copyRange(ctx context.Context, w *worker, l *lease) (err error) {
	sz := w.sz
	for {
		held, err := r.holdForSignals(ctx, sz)
		if err != nil {
			return err
		}
		size := sz.size
		started := time.Now()
		var n int
		var done bool
		if err := r.retry(ctx, "chunk", func() (err error) {
			n, done, err = r.chunk(ctx, w, l, size)
			return err
		}, "range", l.id); err != nil {
			return err
		}
		took := time.Since(started)
		w.rows, w.chunks = w.rows+int64(n), w.chunks+1
		var rest time.Duration
		if r.duty != nil {
			// Below full duty the chunks shrink with the share too: a
			// chunk's writes reach the disk in one burst (its WAL), which the
			// service's commits queue behind; many small bursts hurt them
			// less than a few big ones.
			rest, sz.scale = r.duty.ran(took, held)
		}
		sz.observe(n, took)
		r.track.chunk(ctx, w.id, l.id, n, size, took)
		if rest > 0 {
			r.track.hold(ctx, fmt.Sprintf("duty cycle %.0f%% (signals)", sz.scale*100), rest)
			if err := sleep(ctx, rest); err != nil {
				return err
			}
		}
		if done {
			r.track.rangeDone()
			r.idle.signal()
		}
		// Every chunk is charged, a range's last one too: this worker waits
		// before whatever it copies next.
		if d := r.pace.take(n, started); d > 0 {
			r.track.hold(ctx, fmt.Sprintf("rate limit %.0f rows/s", r.cfg.RowsPerSecond), d)
			if err := sleep(ctx, d); err != nil {
				return err
			}
		}
		if done {
			return nil
		}
	}
}

// holdForSignals waits while any signal holds the job; each hold halves
// the chunk size and the duty cycle. It reports whether it held.
func (r *runner) holdForSignals(ctx context.Context, sz *sizer) (held bool, err error) {
	for _, s := range r.cfg.Signals {
		for {
			d, why, err := s.Hold(ctx)
			if err != nil {
				d, why = r.cfg.PollInterval, fmt.Sprintf("%s unreadable: %v", s.Name(), err)
			}
			if d <= 0 {
				break
			}
			held = true
			sz.backoff()
			r.duty.cut()
			r.track.hold(ctx, s.Name()+": "+why, d)
			if err := sleep(ctx, d); err != nil {
				return held, err
			}
		}
	}
	return held, ctx.Err()
}

// chunk copies up to size rows after the range's cursor and moves the
// cursor. With the sink in this database both commit in one transaction
// (no chunk repeated or skipped across a crash); otherwise the sink commits
// first and the cursor right after (a crash between redoes one chunk, which
// the idempotent, version-guarded sink absorbs).
func (r *runner) chunk(ctx context.Context, w *worker, l *lease, size int) (n int, done bool, err error) {
	b := r.b
	tx, err := b.pool.Begin(ctx)
	if err != nil {
		return 0, false, err
	}
	defer rollback(ctx, tx)
	// Renew the lease and lock the range row for the chunk: a worker taking
	// the range over waits for this chunk, and a stale token aborts it.
	// The range's end is read again: a stealer may have split it (under
	// this same row lock) since the last chunk.
	// The chunk and its cursor commit together where the sink is a table
	// of this database: a server crash loses both and a resume redoes the
	// chunk, so the commit need not wait for the WAL flush, and the
	// backfill's flushes stay out of the way of the service's commits.
	// (Never where the sink commits on its own.) Except in place: there
	// the service's commits came right behind each chunk's WAL and had to
	// flush it themselves, and its p99 during the fill was a flush of the
	// fill's WAL (in-place benchmark: 6.9-11ms asynchronous, 5.2-5.8ms
	// synchronous, at the same fill rate). Set in the same round trip.
	syncCommit := "on"
	if r.txPG != nil && !r.inPlace {
		syncCommit = "off"
	}
	var paused bool
	var setting string
	err = tx.QueryRow(ctx, `UPDATE `+b.t.ranges+` SET lease_until = clock_timestamp() + make_interval(secs => $4)
WHERE job = $1 AND id = $2 AND token = $3 RETURNING hi, (SELECT paused FROM `+b.t.jobs+` WHERE name = $1),
	set_config('synchronous_commit', $5, true)`,
		r.j.Name, l.id, l.token, r.cfg.LeaseTTL.Seconds(), syncCommit).Scan(&l.hi, &paused, &setting)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, false, ErrLeaseLost
	}
	if err != nil {
		return 0, false, err
	}
	if paused {
		return 0, false, errPaused
	}
	var last []string
	fixed := r.fast
	switch {
	case r.fast:
		n, last, done, err = r.fastChunk(ctx, tx, w, l, size)
	case r.txPG != nil:
		var src querier = tx
		if r.src != querier(b.pool) {
			src = r.src
		}
		var rows []Row
		rows, last, err = r.read(ctx, src, l.cursor, l.hi, size)
		if err == nil {
			n = len(rows)
			if rows, err = r.transform(ctx, rows); err == nil {
				err = r.txPG.writeTx(ctx, tx, rows)
			}
		}
	default:
		// The sink commits on its own: end this transaction first so the
		// range lock is not held across the sink's I/O.
		if err := tx.Commit(ctx); err != nil {
			return 0, false, err
		}
		var rows []Row
		rows, last, err = r.read(ctx, r.src, l.cursor, l.hi, size)
		if err != nil {
			return 0, false, err
		}
		n = len(rows)
		if rows, err = r.transform(ctx, rows); err != nil {
			return 0, false, err
		}
		if err := r.sink.Write(ctx, rows); err != nil {
			return 0, false, err
		}
		tx, err = b.pool.Begin(ctx)
		if err != nil {
			return 0, false, err
		}
		defer rollback(ctx, tx)
	}
	if err != nil {
		return 0, false, err
	}
	if !fixed {
		done = n < size
	}
	cursor := l.cursor
	if n > 0 {
		cursor = last
	}
	// hi = $8: where the sink commits on its own, the range lock was let go
	// during the write and a stealer may have split the range meanwhile.
	tag, err := tx.Exec(ctx, `UPDATE `+b.t.ranges+` SET cursor = $4, rows_done = rows_done + $5, chunks = chunks + 1, done = $6,
	updated_at = now(), lease_until = clock_timestamp() + make_interval(secs => $7)
WHERE job = $1 AND id = $2 AND token = $3 AND hi = $8`, r.j.Name, l.id, l.token, cursor, n, done, r.cfg.LeaseTTL.Seconds(), l.hi)
	if err != nil {
		return 0, false, err
	}
	if tag.RowsAffected() == 0 {
		var hi []string
		err := tx.QueryRow(ctx, `SELECT hi FROM `+b.t.ranges+` WHERE job = $1 AND id = $2 AND token = $3`, r.j.Name, l.id, l.token).Scan(&hi)
		if errors.Is(err, pgx.ErrNoRows) {
			return 0, false, ErrLeaseLost
		}
		if err != nil {
			return 0, false, err
		}
		// Split while the sink wrote: the rows written past the new end are
		// the stealer's too (the sink is idempotent); this chunk is redone
		// up to the new end.
		l.hi = hi
		return 0, false, nil
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, false, err
	}
	l.cursor = cursor
	return n, done, nil
}

// fastChunk finds the chunk's closing key, then copies the key range inside
// the server.
func (r *runner) fastChunk(ctx context.Context, tx pgx.Tx, w *worker, l *lease, size int) (n int, last []string, done bool, err error) {
	sql, args := r.sh.boundarySQL(l.cursor, l.hi, size)
	err = tx.QueryRow(ctx, sql, args...).Scan(&last)
	switch {
	case err == nil:
		n, done = size, slices.Equal(last, l.hi)
	case errors.Is(err, pgx.ErrNoRows):
		// The range's last chunk: fewer than size rows are left.
		last, done = l.hi, true
		sql, args := r.sh.countSQL(l.cursor, l.hi)
		var cnt int64
		if err := tx.QueryRow(ctx, sql, args...).Scan(&cnt); err != nil {
			return 0, nil, false, err
		}
		n = int(cnt)
	default:
		return 0, nil, false, err
	}
	if err := r.copyKeys(ctx, tx, w, l.cursor, last, n); err != nil {
		return 0, nil, false, err
	}
	return n, last, done, nil
}

// copyKeys copies the source rows of (lo, hi], about n of them. The
// version-guarded upsert (ON CONFLICT … DO UPDATE … WHERE version <=) costs
// about twice a plain INSERT because of its speculative insertion, so only
// the rows whose keys are already in the target go through it; the others
// are inserted plainly, inside a savepoint. A plain INSERT never
// overwrites: a dual write that lands a row in the range meanwhile makes it
// fail with unique_violation, and the chunk is redone by the upsert alone.
func (r *runner) copyKeys(ctx context.Context, tx pgx.Tx, w *worker, lo, hi []string, n int) error {
	lock := r.cfg.LockSourceRows
	upsertAll := func() error {
		sql, args := r.sh.copySQL(lo, hi, lock)
		_, err := tx.Exec(ctx, sql, args...)
		return err
	}
	if r.inPlace {
		if sql, args := r.sh.fillSQL(lo, hi); sql != "" {
			_, err := tx.Exec(ctx, sql, args...)
			return err
		}
	}
	if !r.plain {
		return upsertAll()
	}
	if w.upsertLeft > 0 {
		w.upsertLeft--
		return upsertAll()
	}
	// Up to a quarter of the chunk may be upserted by key; beyond, one
	// upsert of the whole range is cheaper than shipping the keys.
	limit := max(n/4, 16)
	// Planned for this chunk's keys every time (an unnamed statement), not
	// by a cached generic plan: a pooled connection that had run it a few
	// times built one after the target's next invalidation (a TRUNCATE,
	// its first rows), when the target looked empty, and then listed the
	// keys of every chunk by a sequential scan of the whole target, 25-80ms
	// a chunk and growing with it.
	sql, args := r.sh.presentSQL(lo, hi, limit+1)
	rows, err := tx.Query(ctx, sql, append([]any{pgx.QueryExecModeExec}, args...)...)
	if err != nil {
		return err
	}
	present, err := pgx.CollectRows(rows, pgx.RowTo[[]string])
	if err != nil {
		return err
	}
	if len(present) > limit {
		return upsertAll()
	}
	// The savepoint, the plain insert and the release go in one round trip;
	// a unique_violation aborts the rest, and the savepoint is rolled back.
	sql, args = r.sh.copyKeysSQL(lo, hi, present, keysNotIn, lock)
	batch := &pgx.Batch{}
	batch.Queue(`SAVEPOINT dimmer_plain`)
	batch.Queue(sql, args...)
	batch.Queue(`RELEASE SAVEPOINT dimmer_plain`)
	br := tx.SendBatch(ctx, batch)
	_, err = br.Exec()
	if err == nil {
		_, err = br.Exec()
		if err == nil {
			_, err = br.Exec()
		}
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23505" {
		if _, err := tx.Exec(ctx, `ROLLBACK TO SAVEPOINT dimmer_plain`); err != nil {
			return err
		}
		w.fallbacks++
		r.b.m.fallbacks.Add(ctx, 1, r.track.attrs)
		w.upsertRun = min(max(2*w.upsertRun, minUpsertRun), maxUpsertRun)
		w.upsertLeft = w.upsertRun
		return upsertAll()
	}
	if err != nil {
		return err
	}
	w.upsertRun = 0
	if len(present) == 0 {
		return nil
	}
	sql, args = r.sh.copyKeysSQL(lo, hi, present, keysIn, lock)
	_, err = tx.Exec(ctx, sql, args...)
	return err
}

// read returns up to limit target-shaped rows after lo up to hi, and the
// last key read.
func (r *runner) read(ctx context.Context, q querier, lo, hi []string, limit int) ([]Row, []string, error) {
	sql, args := r.sh.readSQL(lo, hi, limit)
	rows, err := q.Query(ctx, sql, args...)
	if err != nil {
		return nil, nil, fmt.Errorf("backfill: read %s: %w", r.j.Spec.Source, err)
	}
	defer rows.Close()
	fds := rows.FieldDescriptions()
	var out []Row
	var last []string
	for rows.Next() {
		vals, err := rows.Values()
		if err != nil {
			return nil, nil, fmt.Errorf("backfill: read %s: %w", r.j.Spec.Source, err)
		}
		row := make(Row, len(vals)-1)
		for i, v := range vals[:len(vals)-1] {
			row[fds[i].Name] = writable(v, fds[i].DataTypeOID)
		}
		last = toStrings(vals[len(vals)-1])
		out = append(out, row)
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("backfill: read %s: %w", r.j.Spec.Source, err)
	}
	return out, last, nil
}

// writable returns v as a value pgx can write back into a column of the
// type it was read from. pgx reads an infinite date or timestamp into `any`
// as a bare pgtype.InfinityModifier, which it cannot encode again.
func writable(v any, oid uint32) any {
	inf, ok := v.(pgtype.InfinityModifier)
	if !ok {
		return v
	}
	switch oid {
	case pgtype.TimestamptzOID:
		return pgtype.Timestamptz{InfinityModifier: inf, Valid: true}
	case pgtype.TimestampOID:
		return pgtype.Timestamp{InfinityModifier: inf, Valid: true}
	case pgtype.DateOID:
		return pgtype.Date{InfinityModifier: inf, Valid: true}
	}
	return v
}

func toStrings(v any) []string {
	a, _ := v.([]any)
	out := make([]string, len(a))
	for i, x := range a {
		out[i], _ = x.(string)
	}
	return out
}

func (r *runner) transform(ctx context.Context, rows []Row) ([]Row, error) {
	if r.j.Transform == nil {
		return rows, nil
	}
	out := rows[:0]
	for _, row := range rows {
		t, err := r.j.Transform(ctx, row)
		if err != nil {
			return nil, fmt.Errorf("backfill: %s: transform: %w", r.j.Name, err)
		}
		if t != nil {
			out = append(out, t)
		}
	}
	return out, nil
}

// retry runs f (op: a chunk, a repair) until it succeeds, fails with an
// error not worth retrying, or has been retried MaxRetries times, waiting
// longer after each failure. where is logged with each retry.
func (r *runner) retry(ctx context.Context, op string, f func() error, where ...any) error {
	for attempt := 0; ; attempt++ {
		err := f()
		if err == nil || !transient(ctx, err) || attempt >= r.cfg.MaxRetries {
			return err
		}
		if r.track != nil { // a verify's repair runs without one
			r.b.m.retries.Add(ctx, 1, r.track.attrs)
		}
		wait := min(100*time.Millisecond<<attempt, 5*time.Second)
		r.b.logger.Warn("backfill: "+op+" failed, retrying", append([]any{"job", r.j.Name}, append(where, "attempt", attempt+1, "wait", wait, "err", err)...)...)
		if err := sleep(ctx, wait); err != nil {
			return err
		}
	}
}

// transient reports whether a failed chunk or repair is worth retrying:
// lost connections, a terminated backend, serialisation failures,
// deadlocks.
func transient(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case pgErr.Code == "40001", pgErr.Code == "40P01", pgErr.Code == "55P03",
			strings.HasPrefix(pgErr.Code, "08"), strings.HasPrefix(pgErr.Code, "53"), strings.HasPrefix(pgErr.Code, "57P"):
			return true
		}
		return false
	}
	var ne net.Error
	if errors.As(err, &ne) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || pgconn.SafeToRetry(err) || pgconn.Timeout(err) {
		return true
	}
	msg := err.Error()
	for _, s := range []string{"conn closed", "connection reset", "broken pipe", "unexpected EOF", "connection refused"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

func localSinkDesc(t Table) string { return "postgres#" + t.String() }
