package cdc_test

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/internal/benchgoal"
)

const acctTable = `CREATE TABLE acct (id bigint PRIMARY KEY, v bigint NOT NULL, note text)`

// cutoverEnv is a migration of table acct from one logical database (old)
// to another (new), synced by CDC, its stage flag at rampdown, writers
// fenced.
type cutoverEnv struct {
	mig            string
	oldURL, newURL string
	old, neu       *pgxpool.Pool
	store          flags.Store
	fence          *cdc.Fence
	newFence       *cdc.Fence // writers of new enter it too (set before the writers start)
	fwd            *cdc.Sync
	stopFwd        func()

	mu       sync.Mutex
	streamed map[[2]int64]int // (id, v) applied by the forward sync -> times
}

func newCutoverEnv(t testing.TB, fenceWait time.Duration) *cutoverEnv {
	ctx := tctx(t, time.Minute)
	e := &cutoverEnv{mig: dimmertest.Name("mig_"), streamed: map[[2]int64]int{}}
	e.oldURL, e.old = logicalDB(t)
	e.newURL, e.neu = logicalDB(t)
	for _, p := range []*pgxpool.Pool{e.old, e.neu} {
		_, err := p.Exec(ctx, acctTable)
		require.NoError(t, err)
	}
	// The flag store has a pool of its own (the operator's): the held
	// writers may hold every connection of theirs.
	store, err := pgflags.NewStore(dimmertest.Pool(t, e.oldURL))
	require.NoError(t, err)
	require.NoError(t, store.Install(ctx))
	e.store = store
	flagstest.Set(t, store, e.mig, flags.RampDown, nil)
	e.fence, err = cdc.InstallFence(ctx, e.old, cdc.FenceConfig{Migration: e.mig, MaxWait: fenceWait})
	require.NoError(t, err)

	fwd, err := cdc.NewSync(e.oldURL, e.neu, cdc.SyncConfig{Name: e.mig + "_fwd", Source: backfill.Table{Name: "acct"},
		Target: backfill.Table{Name: "acct"}, VersionColumn: "v", Logger: quiet(t),
		OnApplied: func(batch []cdc.Change, _ time.Time) {
			e.mu.Lock()
			defer e.mu.Unlock()
			for _, c := range batch {
				if c.Op == cdc.OpInsert || c.Op == cdc.OpUpdate {
					e.streamed[[2]int64{c.Row["id"].(int64), c.Row["v"].(int64)}]++
				}
			}
		}})
	require.NoError(t, err)
	e.fwd = fwd
	e.stopFwd = runUntilStopped(t, fwd, e.old, e.mig+"_fwd")
	require.Eventually(t, fwd.Streaming, time.Minute, 5*time.Millisecond)
	return e
}

// runUntilStopped runs s until stop is called (or the test ends) and drops
// its slot at the end of the test.
func runUntilStopped(t testing.TB, s *cdc.Sync, source *pgxpool.Pool, slot string) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Errorf("sync %s: %v", slot, err)
			}
		})
	}
	t.Cleanup(func() {
		stop()
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := cdc.DropSlot(c, source, "", slot, true); err != nil {
			t.Errorf("drop slot %s: %v", slot, err)
		}
	})
	return stop
}

// writers is a fenced write load: each writer inserts rows of its own and
// bumps their versions, writing old while the fence lets it and new once
// it says cut over (and the stage agrees). acked holds every acknowledged
// row's last version and the side it went to.
type writers struct {
	e     *cutoverEnv
	stop  chan struct{}
	wg    sync.WaitGroup
	mu    sync.Mutex
	acked map[int64]int64
	toOld map[[2]int64]bool
	toNew map[[2]int64]bool
	waits []time.Duration // Fence.Enter durations
	held  atomic.Int64    // ErrWriteHeld
	errs  chan error
}

func startWriters(t testing.TB, e *cutoverEnv, n int) *writers {
	w := &writers{e: e, stop: make(chan struct{}), acked: map[int64]int64{}, toOld: map[[2]int64]bool{},
		toNew: map[[2]int64]bool{}, errs: make(chan error, n)}
	for i := range n {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			if err := w.run(int64(i)); err != nil {
				w.errs <- err
			}
		}()
	}
	return w
}

func (w *writers) run(writer int64) error {
	ctx := context.Background()
	cut := false
	versions := map[int64]int64{}
	for n := int64(0); ; n++ {
		select {
		case <-w.stop:
			return nil
		default:
		}
		id := writer*1_000_000 + n/3 // three versions per row
		v := versions[id] + 1
		if cut {
			err := pgx.BeginFunc(ctx, w.e.neu, func(tx pgx.Tx) error {
				if w.e.newFence != nil {
					if err := w.e.newFence.Enter(ctx, tx); err != nil {
						return err
					}
				}
				_, err := tx.Exec(ctx, `INSERT INTO acct VALUES ($1, $2, 'new') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, note = 'new'`, id, v)
				return err
			})
			switch {
			case err == nil:
				w.ack(id, v, false)
				versions[id] = v
			case errors.Is(err, cdc.ErrCutOver): // stepped back
				st, err := w.e.store.Load(ctx, w.e.mig)
				if err != nil {
					return err
				}
				if !st.Stage.Writes(flags.Old) {
					return fmt.Errorf("new side's fence cut while the stage %s does not write old", st)
				}
				cut = false
				n--
			case errors.Is(err, cdc.ErrWriteHeld):
				w.held.Add(1)
				n--
			default:
				return err
			}
			continue
		}
		var entered time.Duration
		err := pgx.BeginFunc(ctx, w.e.old, func(tx pgx.Tx) error {
			start := time.Now()
			err := w.e.fence.Enter(ctx, tx)
			entered = time.Since(start)
			if err != nil {
				return err
			}
			_, err = tx.Exec(ctx, `INSERT INTO acct VALUES ($1, $2, 'old') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, note = 'old'`, id, v)
			return err
		})
		w.mu.Lock()
		w.waits = append(w.waits, entered)
		w.mu.Unlock()
		switch {
		case err == nil:
			w.ack(id, v, true)
			versions[id] = v
		case errors.Is(err, cdc.ErrCutOver):
			st, err := w.e.store.Load(ctx, w.e.mig)
			if err != nil {
				return err
			}
			if st.Stage.Writes(flags.Old) {
				return fmt.Errorf("fence cut while the stage %s still writes old", st)
			}
			cut = true
			n-- // the same write, to new
		case errors.Is(err, cdc.ErrWriteHeld):
			w.held.Add(1)
			n--
		default:
			return err
		}
	}
}

func (w *writers) ack(id, v int64, old bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.acked[id] = v
	if old {
		w.toOld[[2]int64{id, v}] = true
	} else {
		w.toNew[[2]int64{id, v}] = true
	}
}

func (w *writers) finish(t testing.TB) {
	close(w.stop)
	w.wg.Wait()
	close(w.errs)
	for err := range w.errs {
		require.NoError(t, err)
	}
}

func (w *writers) count() (old, neu int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.toOld), len(w.toNew)
}

// rows reads acct as id -> v.
func rows(t testing.TB, p *pgxpool.Pool) map[int64]int64 {
	rs, err := p.Query(tctx(t, 30*time.Second), `SELECT id, v FROM acct`)
	require.NoError(t, err)
	out := map[int64]int64{}
	var id, v int64
	_, err = pgx.ForEachRow(rs, []any{&id, &v}, func() error { out[id] = v; return nil })
	require.NoError(t, err)
	return out
}

func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	require.Eventually(t, cond, time.Minute, 2*time.Millisecond)
}

// A fenced cutover under a concurrent write load on real Postgres: every
// acknowledged write is in the new side afterwards, none applied twice,
// and no writer waited longer than the fence's bound.
// The sync is given in-process (Sync) or, as `dimmer cdc cutover` does
// from another process, by its slot (Slot: the cutover waits on the
// position the sync reported to the server).
func TestFencedCutover(t *testing.T) {
	t.Parallel()
	t.Run("sync", func(t *testing.T) { t.Parallel(); testFencedCutover(t, false) })
	t.Run("slot", func(t *testing.T) { t.Parallel(); testFencedCutover(t, true) })
}

func testFencedCutover(t *testing.T, bySlot bool) {
	const fenceWait = 2 * time.Second
	e := newCutoverEnv(t, fenceWait)
	ctx := tctx(t, 2*time.Minute)
	ctl, err := flags.NewController(e.store, flags.WithControllerLogger(quiet(t)))
	require.NoError(t, err)
	follow := func(c cdc.CutoverConfig) cdc.CutoverConfig {
		if bySlot {
			c.Slot = e.mig + "_fwd"
		} else {
			c.Sync = e.fwd
		}
		return c
	}

	// Refused up front, nothing held: a stage that still writes old.
	_, err = cdc.Cutover(ctx, e.fence, follow(cdc.CutoverConfig{Controller: ctl, Stage: flags.Live, Actor: "test", Reason: "cutover"}))
	require.ErrorIs(t, err, cdc.ErrInvalidConfig)
	require.ErrorContains(t, err, "still writes the old side")
	if bySlot {
		_, err = cdc.Cutover(ctx, e.fence, cdc.CutoverConfig{Controller: ctl, Slot: "no_such_slot", Actor: "test", Reason: "cutover"})
		require.ErrorIs(t, err, cdc.ErrNoSlot)
		require.ErrorContains(t, err, "no_such_slot")
		_, err = cdc.Cutover(ctx, e.fence, cdc.CutoverConfig{Controller: ctl, Slot: e.mig + "_fwd", Sync: e.fwd, Actor: "test", Reason: "cutover"})
		require.ErrorIs(t, err, cdc.ErrInvalidConfig)
	}

	w := startWriters(t, e, 4)
	waitFor(t, func() bool { o, _ := w.count(); return o >= 100 })
	// A cutover that cannot finish within its pause gives up: the fence
	// opens again, the stage stays, writers go on writing old.
	_, err = cdc.Cutover(ctx, e.fence, follow(cdc.CutoverConfig{Controller: ctl, Actor: "test", Reason: "too short", MaxPause: time.Millisecond}))
	require.Error(t, err)
	st, err := e.store.Load(ctx, e.mig)
	require.NoError(t, err)
	require.Equal(t, flags.RampDown, st.Stage)
	cut, err := e.fence.Cut(ctx)
	require.NoError(t, err)
	require.False(t, cut)
	from, _ := w.count()
	waitFor(t, func() bool { o, _ := w.count(); return o >= from+100 })

	res, err := cdc.Cutover(ctx, e.fence, follow(cdc.CutoverConfig{Controller: ctl, Actor: "test", Reason: "cutover", MaxPause: fenceWait}))
	require.NoError(t, err)
	t.Logf("write pause %v (drain %v, catch-up %v, flip %v)", res.Pause, res.Drain, res.CatchUp, res.Flip)
	assert.Equal(t, flags.Complete, res.State.Stage)
	cut, err = e.fence.Cut(ctx)
	require.NoError(t, err)
	assert.True(t, cut)
	_, before := w.count()
	waitFor(t, func() bool { _, n := w.count(); return n >= before+100 })
	w.finish(t)

	// A second cutover finds nothing to cut.
	_, err = cdc.Cutover(ctx, e.fence, follow(cdc.CutoverConfig{Controller: ctl, Actor: "test", Reason: "again"}))
	require.Error(t, err)

	// Every acknowledged write is on the new side, at its last version.
	require.NoError(t, e.fwd.CaughtUp(ctx, e.old))
	assert.Equal(t, w.acked, rows(t, e.neu))
	// Every write made to old was streamed exactly once; none made to new
	// was (the forward sync saw old only).
	e.mu.Lock()
	for k := range w.toOld {
		assert.Equal(t, 1, e.streamed[k], "old write %v applied %d times", k, e.streamed[k])
	}
	for k, n := range e.streamed {
		assert.True(t, w.toOld[k], "applied %v (%d times) that no writer acknowledged on old", k, n)
		assert.False(t, w.toNew[k], "applied %v that went to new", k)
	}
	e.mu.Unlock()
	o, n := w.count()
	require.Positive(t, o)
	require.Positive(t, n)
	// Writers were held at most the bound, and none gave up.
	assert.Zero(t, w.held.Load())
	sort.Slice(w.waits, func(i, j int) bool { return w.waits[i] < w.waits[j] })
	longest := w.waits[len(w.waits)-1]
	t.Logf("writes old %d new %d; longest fence wait %v", o, n, longest)
	assert.LessOrEqual(t, longest, fenceWait)
	assert.LessOrEqual(t, longest, res.Pause+time.Second, "a writer waited well beyond the time the fence was held")
}

// BenchmarkFencedCutover measures how long a fenced cutover holds writes
// (from the fence closing to its release: no writer waits longer) under a
// steady write load, over repeated cutovers of one migration (each stepped
// back and reopened).
func BenchmarkFencedCutover(b *testing.B) {
	e := newCutoverEnv(b, 2*time.Second)
	ctx := tctx(b, 5*time.Minute)
	ctl, err := flags.NewController(e.store, flags.WithControllerLogger(quiet(b)))
	require.NoError(b, err)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var longest time.Duration
	var written atomic.Int64
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(4 * time.Millisecond) // 250/s per writer
			defer tick.Stop()
			for i := int64(0); ; i++ {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				err := pgx.BeginFunc(ctx, e.old, func(tx pgx.Tx) error {
					start := time.Now()
					err := e.fence.Enter(ctx, tx)
					mu.Lock()
					longest = max(longest, time.Since(start))
					mu.Unlock()
					if err != nil {
						return err
					}
					_, err = tx.Exec(ctx, `INSERT INTO acct VALUES ($1, 1, 'old') ON CONFLICT (id) DO UPDATE SET v = acct.v + 1`, int64(w)*1_000_000+i%500)
					return err
				})
				if err != nil && !errors.Is(err, cdc.ErrCutOver) {
					b.Error(err)
					return
				}
				written.Add(1)
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()
	var pauses []time.Duration
	for range 10 {
		from := written.Load()
		waitFor(b, func() bool { return written.Load() >= from+200 })
		res, err := cdc.Cutover(ctx, e.fence, cdc.CutoverConfig{Controller: ctl, Sync: e.fwd, Actor: "bench", Reason: "cutover", MaxPause: 2 * time.Second})
		require.NoError(b, err)
		pauses = append(pauses, res.Pause)
		flagstest.Set(b, e.store, e.mig, flags.RampDown, nil)
		require.NoError(b, e.fence.Reopen(ctx))
	}
	sort.Slice(pauses, func(i, j int) bool { return pauses[i] < pauses[j] })
	p50, p99 := pauses[len(pauses)/2], pauses[(len(pauses)*99+99)/100-1]
	mu.Lock()
	b.Logf("fenced cutover write pause over %d cutovers at 1,000 writes/s: p50 %v, p99 %v; longest wait at the fence %v", len(pauses), p50, p99, longest)
	mu.Unlock()
	benchgoal.Report(b, "cdc_fenced_cutover_write_pause_p99", float64(p99)/float64(time.Millisecond), "ms", benchgoal.AtMost, 200)
}

// After a cutover, a reverse sync (prepared before it) carries the new
// side's writes back to old, so stepping back from complete keeps every
// write made meanwhile; the controller refuses the step back while the
// reverse sync is not caught up, naming it.
func TestReverseSyncRollback(t *testing.T) {
	t.Parallel()
	e := newCutoverEnv(t, 2*time.Second)
	ctx := tctx(t, 2*time.Minute)
	revName := e.mig + "_rev"
	rev, err := cdc.NewSync(e.newURL, e.old, cdc.SyncConfig{Name: revName, Source: backfill.Table{Name: "acct"},
		Target: backfill.Table{Name: "acct"}, VersionColumn: "v", SkipCopy: true, Logger: quiet(t)})
	require.NoError(t, err)
	// The reverse slot exists before the cutover: no write to new after it
	// is missed.
	require.NoError(t, rev.Prepare(ctx))
	guard := cdc.ReverseGuard{Sync: rev, NewSide: e.neu}
	ctl, err := flags.NewController(e.store, flags.WithControllerLogger(quiet(t)), flags.WithReconciliation(guard))
	require.NoError(t, err)

	w := startWriters(t, e, 3)
	waitFor(t, func() bool { o, _ := w.count(); return o >= 100 })
	_, err = cdc.Cutover(ctx, e.fence, cdc.CutoverConfig{Controller: ctl, Sync: e.fwd, Actor: "test", Reason: "cutover"})
	require.NoError(t, err)
	waitFor(t, func() bool { _, n := w.count(); return n >= 50 })

	// Nothing carries new's writes back yet: the step back is refused.
	_, err = ctl.StepBack(ctx, e.mig, flags.Complete, "test", "rollback")
	var refused *flags.RefusedError
	require.ErrorAs(t, err, &refused)
	require.ErrorContains(t, err, "reverse sync "+revName+" is not streaming")
	st, err := e.store.Load(ctx, e.mig)
	require.NoError(t, err)
	require.Equal(t, flags.Complete, st.Stage)

	// The forward sync stops (old is no longer written; the two must not
	// run at once), the reverse one streams what new got since the cutover.
	e.stopFwd()
	stopRev := runUntilStopped(t, rev, e.neu, revName)
	waitFor(t, rev.Streaming)
	_, before := w.count()
	waitFor(t, func() bool { _, n := w.count(); return n >= before+50 })
	w.finish(t)

	// A reverse sync behind the new side is refused too, naming it.
	_, err = e.neu.Exec(ctx, `INSERT INTO acct SELECT 900000000 + i, 1, 'bulk' FROM generate_series(1, 20000) i`)
	require.NoError(t, err)
	err = cdc.ReverseGuard{Sync: rev, NewSide: e.neu, Timeout: time.Millisecond}.Check(ctx, flags.Transition{})
	require.ErrorContains(t, err, "reverse sync "+revName+" has not caught up")
	for i := int64(1); i <= 20000; i++ {
		w.acked[900000000+i] = 1
	}

	// Once it has caught up, the step back goes ahead.
	require.NoError(t, rev.CaughtUp(ctx, e.neu))
	st, err = ctl.StepBack(ctx, e.mig, flags.Complete, "test", "rollback")
	require.NoError(t, err)
	require.Equal(t, flags.RampDown, st.Stage)
	require.NoError(t, e.fence.Reopen(ctx))
	stopRev()
	// Old holds every acknowledged write, those made on new included.
	assert.Equal(t, w.acked, rows(t, e.old))
	_, n := w.count()
	require.Positive(t, n)

	// The guard judges only steps back onto a stage that writes old.
	assert.False(t, guard.Applies(flags.Transition{From: flags.State{Stage: flags.RampDown}, To: flags.State{Stage: flags.Complete}}))
	assert.True(t, guard.Applies(flags.Transition{From: flags.State{Stage: flags.Complete}, To: flags.State{Stage: flags.RampDown}}))
}

// The rollback after a cutover goes through the fence too, the other way
// round: the new side's writers are held while the reverse sync catches
// up and the stage flips back, so the reverse sync can stop the moment the
// step back returns and still no write made on the new side is lost (a
// write to new landing after the reverse sync caught up would be).
func TestFencedStepBack(t *testing.T) {
	t.Parallel()
	e := newCutoverEnv(t, 2*time.Second)
	ctx := tctx(t, 2*time.Minute)
	newFence, err := cdc.InstallFence(ctx, e.neu, cdc.FenceConfig{Migration: e.mig, MaxWait: 2 * time.Second})
	require.NoError(t, err)
	e.newFence = newFence
	revName := e.mig + "_rev"
	var mu sync.Mutex
	back := map[[2]int64]int{} // (id, v) applied to old by the reverse sync -> times
	rev, err := cdc.NewSync(e.newURL, e.old, cdc.SyncConfig{Name: revName, Source: backfill.Table{Name: "acct"},
		Target: backfill.Table{Name: "acct"}, VersionColumn: "v", SkipCopy: true, Logger: quiet(t),
		OnApplied: func(batch []cdc.Change, _ time.Time) {
			mu.Lock()
			defer mu.Unlock()
			for _, c := range batch {
				if c.Op == cdc.OpInsert || c.Op == cdc.OpUpdate {
					back[[2]int64{c.Row["id"].(int64), c.Row["v"].(int64)}]++
				}
			}
		}})
	require.NoError(t, err)
	require.NoError(t, rev.Prepare(ctx))
	// The guard has a pool of its own: the held writers may hold every
	// connection of theirs.
	ctl, err := flags.NewController(e.store, flags.WithControllerLogger(quiet(t)),
		flags.WithReconciliation(cdc.ReverseGuard{Sync: rev, NewSide: dimmertest.Pool(t, e.newURL)}))
	require.NoError(t, err)

	w := startWriters(t, e, 3)
	waitFor(t, func() bool { o, _ := w.count(); return o >= 100 })
	// The old side's fence given as the new side's, through a pool of its
	// own, is refused before anything is held: the cutover would wait on
	// its own lock.
	oldAgain, err := cdc.OpenFence(ctx, dimmertest.Pool(t, e.oldURL), cdc.FenceConfig{Migration: e.mig})
	require.NoError(t, err)
	_, err = cdc.Cutover(ctx, e.fence, cdc.CutoverConfig{Controller: ctl, Sync: e.fwd, New: oldAgain, Actor: "test", Reason: "cutover"})
	require.ErrorIs(t, err, cdc.ErrInvalidConfig)
	require.ErrorContains(t, err, "New is the fence being closed ("+e.mig+" in")
	cut, err := e.fence.Cut(ctx)
	require.NoError(t, err)
	require.False(t, cut)
	_, err = cdc.Cutover(ctx, e.fence, cdc.CutoverConfig{Controller: ctl, Sync: e.fwd, New: newFence, Actor: "test", Reason: "cutover"})
	require.NoError(t, err)
	waitFor(t, func() bool { _, n := w.count(); return n >= 50 })
	e.stopFwd()
	stopRev := runUntilStopped(t, rev, e.neu, revName)
	waitFor(t, rev.Streaming)
	_, before := w.count()
	waitFor(t, func() bool { _, n := w.count(); return n >= before+100 })

	// Bad config, refused before anything is held.
	_, err = cdc.StepBack(ctx, newFence, cdc.StepBackConfig{Controller: ctl, Stage: flags.Complete, Reverse: rev, Old: e.fence, Actor: "test", Reason: "rollback"})
	require.ErrorIs(t, err, cdc.ErrInvalidConfig)
	require.ErrorContains(t, err, "not a step back")
	_, err = cdc.StepBack(ctx, newFence, cdc.StepBackConfig{Controller: ctl, Reverse: rev, Actor: "test", Reason: "rollback"})
	require.ErrorContains(t, err, "Old is nil")
	_, err = cdc.StepBack(ctx, newFence, cdc.StepBackConfig{Controller: ctl, Reverse: rev, Old: newFence, Actor: "test", Reason: "rollback"})
	require.ErrorIs(t, err, cdc.ErrInvalidConfig)
	require.ErrorContains(t, err, "Old is the fence being closed")
	// A step back that cannot finish within its pause gives up: the stage
	// stays, the old side stays fenced, writers go on writing new.
	_, err = cdc.StepBack(ctx, newFence, cdc.StepBackConfig{Controller: ctl, Reverse: rev, Old: e.fence, Actor: "test", Reason: "too short", MaxPause: time.Millisecond})
	require.Error(t, err)
	st, err := e.store.Load(ctx, e.mig)
	require.NoError(t, err)
	require.Equal(t, flags.Complete, st.Stage)
	cut, err = e.fence.Cut(ctx)
	require.NoError(t, err)
	require.True(t, cut, "the old side stays fenced after a step back that gave up")
	cut, err = newFence.Cut(ctx)
	require.NoError(t, err)
	require.False(t, cut)
	_, before = w.count()
	waitFor(t, func() bool { _, n := w.count(); return n >= before+50 })

	// Under the writes to new.
	res, err := cdc.StepBack(ctx, newFence, cdc.StepBackConfig{Controller: ctl, Reverse: rev, Old: e.fence, Actor: "test", Reason: "rollback", MaxPause: 2 * time.Second})
	require.NoError(t, err)
	t.Logf("step back write pause %v (drain %v, catch-up %v, flip %v)", res.Pause, res.Drain, res.CatchUp, res.Flip)
	assert.Equal(t, flags.RampDown, res.State.Stage)
	// The reverse sync stops at once: the fence guarantees it has carried
	// every write the new side acknowledged, and that there are no more.
	stopRev()
	_, newWrites := w.count()
	oldBefore, _ := w.count()
	waitFor(t, func() bool { o, _ := w.count(); return o >= oldBefore+100 })
	w.finish(t)
	_, n := w.count()
	assert.Equal(t, newWrites, n, "a write went to new after the step back returned")
	cut, err = newFence.Cut(ctx)
	require.NoError(t, err)
	assert.True(t, cut)
	cut, err = e.fence.Cut(ctx)
	require.NoError(t, err)
	assert.False(t, cut)

	// Old holds every acknowledged write: those made on new came back, once.
	assert.Equal(t, w.acked, rows(t, e.old))
	mu.Lock()
	for k := range w.toNew {
		assert.Equal(t, 1, back[k], "new write %v applied to old %d times", k, back[k])
	}
	for k := range back {
		assert.True(t, w.toNew[k] || w.toOld[k], "applied %v that no writer acknowledged", k)
	}
	mu.Unlock()
	assert.Zero(t, w.held.Load())
	require.Positive(t, n)

	// The reverse sync has stopped: nothing is stepped back without it.
	_, err = cdc.StepBack(ctx, newFence, cdc.StepBackConfig{Controller: ctl, Reverse: rev, Old: e.fence, Actor: "test", Reason: "again"})
	require.ErrorContains(t, err, "sync "+revName+" is not streaming")
}

// Enter leaves the writer's own lock_timeout as it was, refuses a
// migration without a fence row, and InstallFence names a bad field.
func TestFenceEnter(t *testing.T) {
	t.Parallel()
	pool := dimmertest.Pool(t, dimmertest.Database(t))
	ctx := tctx(t, 30*time.Second)
	_, err := cdc.InstallFence(ctx, pool, cdc.FenceConfig{Migration: "Bad Name"})
	require.ErrorIs(t, err, cdc.ErrInvalidConfig)
	require.ErrorContains(t, err, "Migration")
	_, err = cdc.InstallFence(ctx, pool, cdc.FenceConfig{Migration: "orders_v2", MaxWait: time.Microsecond})
	require.ErrorContains(t, err, "MaxWait")

	f, err := cdc.InstallFence(ctx, pool, cdc.FenceConfig{Migration: "orders_v2", MaxWait: 300 * time.Millisecond})
	require.NoError(t, err)
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SET LOCAL lock_timeout = '7s'`); err != nil {
			return err
		}
		if err := f.Enter(ctx, tx); err != nil {
			return err
		}
		var lt string
		require.NoError(t, tx.QueryRow(ctx, `SHOW lock_timeout`).Scan(&lt))
		assert.Equal(t, "7s", lt)
		return nil
	})
	require.NoError(t, err)

	// A fence held longer than MaxWait: the writer gives up, bounded.
	holder, err := pool.Begin(ctx)
	require.NoError(t, err)
	_, err = holder.Exec(ctx, `UPDATE dimmer.cdc_fences SET state = 'cut' WHERE migration = 'orders_v2'`)
	require.NoError(t, err)
	start := time.Now()
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return f.Enter(ctx, tx) })
	require.ErrorIs(t, err, cdc.ErrWriteHeld)
	assert.Less(t, time.Since(start), 2*time.Second)
	require.NoError(t, holder.Rollback(ctx))

	other, err := cdc.InstallFence(ctx, pool, cdc.FenceConfig{Migration: "orders_v3"})
	require.NoError(t, err)
	_, err = pool.Exec(ctx, `DELETE FROM dimmer.cdc_fences WHERE migration = 'orders_v3'`)
	require.NoError(t, err)
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return other.Enter(ctx, tx) })
	require.ErrorIs(t, err, cdc.ErrNoFence)
	require.ErrorContains(t, err, "orders_v3")
}
