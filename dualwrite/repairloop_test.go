package dualwrite_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/outbox"
)

const pairMigration = "accounts_v2"

// pgPair is a migration between two real Postgres tables. The new side has
// a pool of its own, named so a test can terminate its backends, and two
// CHECK constraints a test can drop: c_reject refuses the name "reject",
// c_poison refuses the id "poison".
type pgPair struct {
	old, new *pgxpool.Pool
	schema   string
	appName  string
	ob       *outbox.Outbox
}

func newPgPair(t *testing.T) *pgPair {
	t.Helper()
	pool, schema := dimmertest.Schema(t)
	_, err := pool.Exec(ctx(t), `
CREATE TABLE accounts_old (id text PRIMARY KEY, name text NOT NULL, version bigint NOT NULL);
CREATE TABLE accounts_new (id text PRIMARY KEY, name text NOT NULL, version bigint NOT NULL,
	CONSTRAINT c_reject CHECK (name <> 'reject'), CONSTRAINT c_poison CHECK (id <> 'poison'))`)
	require.NoError(t, err)
	cfg, err := pgxpool.ParseConfig(dimmertest.PostgresURL())
	require.NoError(t, err)
	p := &pgPair{old: pool, schema: schema, appName: dimmertest.Name("dw_new_")}
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	cfg.ConnConfig.RuntimeParams["application_name"] = p.appName
	cfg.MaxConns = 4
	p.new, err = pgxpool.NewWithConfig(ctx(t), cfg)
	require.NoError(t, err)
	t.Cleanup(p.new.Close)
	p.ob, err = outbox.New(outbox.Config{Schema: schema, Table: "repairs"})
	require.NoError(t, err)
	require.NoError(t, p.ob.Install(ctx(t), pool))
	return p
}

const upsert = ` (id, name, version) VALUES ($1, $2, $3)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, version = excluded.version WHERE %[1]s.version <= excluded.version`

func (p *pgPair) writeOld(ctx context.Context, a account) (int64, error) {
	q := fmt.Sprintf(`INSERT INTO accounts_old`+upsert, "accounts_old")
	if tx, ok := dualwrite.TxFrom(ctx); ok {
		tag, err := tx.Exec(ctx, q, a.ID, a.Name, a.Version)
		return tag.RowsAffected(), err
	}
	tag, err := p.old.Exec(ctx, q, a.ID, a.Name, a.Version)
	return tag.RowsAffected(), err
}

func (p *pgPair) writeNew(ctx context.Context, a account) (int64, error) {
	tag, err := p.new.Exec(ctx, fmt.Sprintf(`INSERT INTO accounts_new`+upsert, "accounts_new"), a.ID, a.Name, a.Version)
	return tag.RowsAffected(), err
}

func (p *pgPair) load(ctx context.Context, side flags.Side, key string) (account, bool, error) {
	db, table := p.old, "accounts_old"
	if side == flags.New {
		db, table = p.new, "accounts_new"
	}
	var a account
	err := db.QueryRow(ctx, `SELECT id, name, version FROM `+table+` WHERE id = $1`, key).Scan(&a.ID, &a.Name, &a.Version)
	if errors.Is(err, pgx.ErrNoRows) {
		return account{}, false, nil
	}
	return a, err == nil, err
}

func (p *pgPair) store(ctx context.Context, side flags.Side, _ string, a account) error {
	var err error
	if side == flags.Old {
		_, err = p.writeOld(ctx, a)
	} else {
		_, err = p.writeNew(ctx, a)
	}
	return err
}

// differing lists the ids whose rows differ between the sides.
func (p *pgPair) differing(t *testing.T) []string {
	t.Helper()
	rows, err := p.old.Query(ctx(t), `SELECT coalesce(o.id, n.id) FROM accounts_old o FULL JOIN accounts_new n ON o.id = n.id
WHERE o.id IS NULL OR n.id IS NULL OR (o.name, o.version) IS DISTINCT FROM (n.name, n.version) ORDER BY 1`)
	require.NoError(t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return ids
}

// kill terminates every backend of the new side's pool: a real fault.
func (p *pgPair) kill(t *testing.T) int {
	t.Helper()
	var n int
	require.NoError(t, p.old.QueryRow(ctx(t), `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1`,
		p.appName).Scan(&n))
	return n
}

// repairReasons reads the repair log's pending messages (test-only peek at
// the outbox table).
func (p *pgPair) repairReasons(t *testing.T) map[string][]dualwrite.Repair {
	t.Helper()
	rows, err := p.old.Query(ctx(t), `SELECT payload FROM repairs ORDER BY seq`)
	require.NoError(t, err)
	payloads, err := pgx.CollectRows(rows, pgx.RowTo[[]byte])
	require.NoError(t, err)
	out := map[string][]dualwrite.Repair{}
	for _, b := range payloads {
		r, err := dualwrite.DecodeRepair(b)
		require.NoError(t, err)
		out[r.Key] = append(out[r.Key], r)
	}
	return out
}

// countingHandler wraps a repairer and counts its failures per key.
type countingHandler struct {
	dualwrite.RepairHandler
	mu     sync.Mutex
	failed map[string]int
	done   map[string]int
}

func (c *countingHandler) Repair(ctx context.Context, r dualwrite.Repair) (dualwrite.Outcome, error) {
	out, err := c.RepairHandler.Repair(ctx, r)
	c.mu.Lock()
	defer c.mu.Unlock()
	if out == dualwrite.Failed {
		c.failed[r.Key]++
	} else {
		c.done[r.Key]++
	}
	return out, err
}

func (c *countingHandler) failures(key string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.failed[key]
}

// TestRepairRelayConverges is the repair loop end to end on real Postgres:
// secondary writes that fail for real (a CHECK constraint on new, its
// backends terminated mid-load) and transactional intents become repair
// messages; the outbox relay hands them to the repairer, retries the ones
// that keep failing with backoff until the new side accepts them, and turns
// the one that can never succeed into a dead letter that holds back only
// its own key; after the operator fixes the cause and retries it, old and
// new are equal.
func TestRepairRelayConverges(t *testing.T) {
	t.Parallel()
	p := newPgPair(t)
	log, err := dualwrite.NewOutboxRepairLog(p.ob, p.old, dualwrite.RepairTopic(pairMigration))
	require.NoError(t, err)
	src := stageOf(flags.DualWrite)
	w, err := dualwrite.New(pairMigration, src, p.writeOld, p.writeNew, accountKey,
		dualwrite.WithRepairLog(log), dualwrite.WithAsync(4, 4096))
	require.NoError(t, err)

	// Load, with the new side's connections terminated half way.
	write := func(a account) {
		_, err := w.Write(ctx(t), a)
		require.NoError(t, err, "a secondary failure never reaches the caller")
	}
	for i := range 40 {
		write(account{ID: fmt.Sprintf("k%02d", i), Name: "a", Version: 1})
	}
	// Let the async writes settle so the pool holds warm connections.
	require.Eventually(t, func() bool { return len(p.differing(t)) == 0 }, 10*time.Second, 10*time.Millisecond)
	require.Positive(t, p.kill(t))
	for i := range 40 {
		write(account{ID: fmt.Sprintf("k%02d", i), Name: "b", Version: 2})
	}
	for i := range 5 {
		write(account{ID: fmt.Sprintf("r%d", i), Name: "reject", Version: 1})
	}
	write(account{ID: "poison", Name: "p", Version: 1})
	for i := range 3 {
		require.NoError(t, pgx.BeginFunc(ctx(t), p.old, func(tx pgx.Tx) error {
			_, err := w.WriteTx(ctx(t), tx, account{ID: fmt.Sprintf("t%d", i), Name: "tx", Version: 1})
			return err
		}))
	}
	require.NoError(t, w.Shutdown(ctx(t)))

	pending := p.repairReasons(t)
	var killed int
	for id, reps := range pending {
		if strings.HasPrefix(id, "k") {
			killed += len(reps)
		}
	}
	assert.Positive(t, killed, "terminated connections made secondary writes fail")
	t.Logf("%d repairs from terminated connections", killed)
	for _, id := range []string{"r0", "r4", "poison", "t0", "t2"} {
		require.NotEmpty(t, pending[id], "a repair is recorded for %s", id)
	}
	assert.Equal(t, dualwrite.ReasonTx, pending["t0"][0].Reason)
	assert.Contains(t, p.differing(t), "r0", "the sides differ before the loop runs")

	// The loop.
	quiet := slog.New(slog.DiscardHandler)
	rep, err := dualwrite.NewRepairer(pairMigration, src, p.load, p.store, dualwrite.WithRepairerLogger(quiet))
	require.NoError(t, err)
	h := &countingHandler{RepairHandler: rep, failed: map[string]int{}, done: map[string]int{}}
	pub, err := dualwrite.NewRepairPublisher([]dualwrite.RepairHandler{h})
	require.NoError(t, err)
	relay, err := p.ob.NewRelay(p.old, pub, outbox.RelayConfig{PollInterval: 20 * time.Millisecond,
		MaxAttempts: 6, BackoffMin: 50 * time.Millisecond, BackoffMax: 200 * time.Millisecond, Logger: quiet})
	require.NoError(t, err)
	runRelay(t, relay)

	// The rejected keys fail and are retried until the new side's
	// constraint is fixed; then they converge.
	require.Eventually(t, func() bool { return h.failures("r0") > 0 && h.failures("r4") > 0 }, 10*time.Second, 5*time.Millisecond)
	_, err = p.old.Exec(ctx(t), `ALTER TABLE accounts_new DROP CONSTRAINT c_reject`)
	require.NoError(t, err)

	// Everything but the poisoned key converges; it becomes a dead letter.
	topic := dualwrite.RepairTopic(pairMigration)
	var dead []outbox.DeadLetter
	require.Eventually(t, func() bool {
		dead, err = p.ob.DeadLetters(ctx(t), p.old, topic, 10)
		require.NoError(t, err)
		return len(dead) == 1 && slices.Equal(p.differing(t), []string{"poison"})
	}, 20*time.Second, 20*time.Millisecond, "differing: %v, dead: %v", p.differing(t), dead)
	assert.Equal(t, pairMigration+"/poison", dead[0].Key)
	assert.Contains(t, dead[0].LastError, "c_poison", "the dead letter says why")
	assert.Equal(t, 6, h.failures("poison"), "tried MaxAttempts times")
	assert.Greater(t, h.failures("r0"), 0)

	// The dead letter holds back its own key only: a new repair of poison
	// waits behind it, a new repair of another key goes through.
	w2, err := dualwrite.New(pairMigration, src, p.writeOld, p.writeNew, accountKey,
		dualwrite.WithRepairLog(log), dualwrite.WithSync())
	require.NoError(t, err)
	_, err = w2.Write(ctx(t), account{ID: "poison", Name: "p", Version: 2})
	require.NoError(t, err)
	require.NoError(t, pgx.BeginFunc(ctx(t), p.old, func(tx pgx.Tx) error {
		_, err := w2.WriteTx(ctx(t), tx, account{ID: "late", Name: "tx", Version: 1})
		return err
	}))
	require.Eventually(t, func() bool { return slices.Equal(p.differing(t), []string{"poison"}) }, 10*time.Second, 10*time.Millisecond,
		"the repair of another key is not held back")
	dead, err = p.ob.DeadLetters(ctx(t), p.old, topic, 10)
	require.NoError(t, err)
	require.Len(t, dead, 1)
	assert.Equal(t, 1, dead[0].Waiting, "the second repair of poison waits behind its dead letter")
	var st outbox.Stats
	require.Eventually(t, func() bool { // once the relay has acknowledged late's repair
		st, err = p.ob.TopicStats(ctx(t), p.old, topic)
		require.NoError(t, err)
		return st.Pending == 2 && st.Dead == 1
	}, 10*time.Second, 10*time.Millisecond, "only the dead letter and the repair behind it are left: %+v", st)

	// The operator fixes the cause and retries: both sides are equal.
	_, err = p.old.Exec(ctx(t), `ALTER TABLE accounts_new DROP CONSTRAINT c_poison`)
	require.NoError(t, err)
	require.NoError(t, p.ob.RetryDead(ctx(t), p.old, dead[0].ID))
	require.Eventually(t, func() bool {
		st, err = p.ob.TopicStats(ctx(t), p.old, topic)
		require.NoError(t, err)
		return st.Pending == 0 && len(p.differing(t)) == 0
	}, 10*time.Second, 10*time.Millisecond, "differing: %v, stats %+v", p.differing(t), st)
	got, ok, err := p.load(ctx(t), flags.New, "poison")
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, int64(2), got.Version, "the current state, not the stale first write")
}

// runRelay runs relay until the test ends.
func runRelay(t *testing.T, relay *outbox.Relay) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- relay.Run(context.Background()) }()
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		assert.NoError(t, relay.Shutdown(c))
		assert.NoError(t, <-done)
	})
}

// TestNoPendingRepairsGuard: with the Postgres flag store and the real
// controller, entering complete is refused while the repair log holds
// undelivered or dead repairs of the migration, naming the counts; earlier
// steps and other migrations are not held back; once the loop has drained
// the log the step goes ahead.
func TestNoPendingRepairsGuard(t *testing.T) {
	t.Parallel()
	p := newPgPair(t)
	store, err := pgflags.NewStore(p.old, pgflags.WithSchema(p.schema))
	require.NoError(t, err)
	require.NoError(t, store.Install(ctx(t)))
	ctrl, err := flags.NewController(store, flags.WithGuards(dualwrite.NoPendingRepairsGuard(p.ob, p.old)))
	require.NoError(t, err)

	log, err := dualwrite.NewOutboxRepairLog(p.ob, p.old, dualwrite.RepairTopic(pairMigration))
	require.NoError(t, err)
	src := stageOf(flags.DualWrite)
	w, err := dualwrite.New(pairMigration, src, p.writeOld, p.writeNew, accountKey,
		dualwrite.WithRepairLog(log), dualwrite.WithSync())
	require.NoError(t, err)
	// Two repairs of poison: the first becomes a dead letter, the second
	// waits behind it.
	for v := int64(1); v <= 2; v++ {
		_, err = w.Write(ctx(t), account{ID: "poison", Name: "p", Version: v})
		require.NoError(t, err)
	}
	// Another migration's repair does not count against this one.
	otherLog, err := dualwrite.NewOutboxRepairLog(p.ob, p.old, dualwrite.RepairTopic("billing"))
	require.NoError(t, err)
	require.NoError(t, otherLog.Record(ctx(t), dualwrite.Repair{Migration: "billing", Key: "b1", Stage: flags.DualWrite, Side: flags.New, Reason: dualwrite.ReasonError}))
	// Nor does one of a migration whose name extends this one's (its topic
	// starts with this one's).
	longer := pairMigration + ".next"
	longerLog, err := dualwrite.NewOutboxRepairLog(p.ob, p.old, dualwrite.RepairTopic(longer))
	require.NoError(t, err)
	require.NoError(t, longerLog.Record(ctx(t), dualwrite.Repair{Migration: longer, Key: "n1", Stage: flags.DualWrite, Side: flags.New, Reason: dualwrite.ReasonError}))

	// Pending repairs do not hold back the steps before complete.
	for range 4 {
		_, err := ctrl.Advance(ctx(t), pairMigration, "alice", "next step")
		require.NoError(t, err)
	}

	rep, err := dualwrite.NewRepairer(pairMigration, src, p.load, p.store, dualwrite.WithRepairerLogger(slog.New(slog.DiscardHandler)))
	require.NoError(t, err)
	relay, err := dualwrite.NewRepairRelay(p.ob, p.old, outbox.RelayConfig{PollInterval: 20 * time.Millisecond,
		MaxAttempts: 1, Logger: slog.New(slog.DiscardHandler)}, rep)
	require.NoError(t, err)
	runRelay(t, relay)
	topic := dualwrite.RepairTopic(pairMigration)
	var dead []outbox.DeadLetter
	require.Eventually(t, func() bool {
		dead, err = p.ob.DeadLetters(ctx(t), p.old, topic, 10)
		require.NoError(t, err)
		return len(dead) == 1
	}, 10*time.Second, 10*time.Millisecond)

	_, err = ctrl.Advance(ctx(t), pairMigration, "alice", "finish")
	var refused *flags.RefusedError
	require.ErrorAs(t, err, &refused)
	require.Len(t, refused.Failed, 1)
	assert.Equal(t, "no-pending-repairs", refused.Failed[0].Name)
	assert.Contains(t, refused.Failed[0].Detail, "2 repairs pending on "+topic+" (1 of them dead letters)")
	// A canary into complete is refused as well.
	_, err = ctrl.Rollout(ctx(t), pairMigration, flags.Complete, 5, "alice", "canary")
	require.ErrorIs(t, err, flags.ErrRefused)
	cur, err := store.Load(ctx(t), pairMigration)
	require.NoError(t, err)
	assert.Equal(t, flags.RampDown, cur.Stage)
	audit, err := store.Audit(ctx(t), pairMigration, 1)
	require.NoError(t, err)
	require.Len(t, audit, 1)
	assert.Equal(t, flags.Refused, audit[0].Outcome, "the refusal is audited")

	// The cause fixed and the dead letter retried, the loop drains the log
	// and the step goes ahead.
	_, err = p.old.Exec(ctx(t), `ALTER TABLE accounts_new DROP CONSTRAINT c_poison`)
	require.NoError(t, err)
	require.NoError(t, p.ob.RetryDead(ctx(t), p.old, dead[0].ID))
	require.Eventually(t, func() bool {
		st, err := p.ob.TopicStats(ctx(t), p.old, topic)
		require.NoError(t, err)
		return st.Pending == 0
	}, 10*time.Second, 10*time.Millisecond)
	st, err := ctrl.Advance(ctx(t), pairMigration, "alice", "finish")
	require.NoError(t, err)
	assert.Equal(t, flags.Complete, st.Stage)
	assert.Empty(t, p.differing(t))
}

// TestRepairPublisher: routing by topic, forwarding of other topics, and
// the failures the relay must retry (never acknowledge): no repairer,
// undecodable payload, failed repair, panicking user function.
func TestRepairPublisher(t *testing.T) {
	t.Parallel()
	p := newPgPair(t)
	src := stageOf(flags.DualWrite)
	quiet := dualwrite.WithRepairerLogger(slog.New(slog.DiscardHandler))
	rep, err := dualwrite.NewRepairer(pairMigration, src, p.load, p.store, quiet)
	require.NoError(t, err)
	panicky, err := dualwrite.NewRepairer("panicky", src, func(context.Context, flags.Side, string) (account, bool, error) {
		panic("load exploded")
	}, p.store, quiet)
	require.NoError(t, err)

	_, err = dualwrite.NewRepairPublisher(nil)
	require.ErrorContains(t, err, "no repairers")
	_, err = dualwrite.NewRepairPublisher([]dualwrite.RepairHandler{rep, rep})
	require.ErrorContains(t, err, `two repairers for migration "accounts_v2"`)
	_, err = dualwrite.NewRepairPublisher([]dualwrite.RepairHandler{rep}, dualwrite.WithRepairWorkers(0))
	require.ErrorContains(t, err, "WithRepairWorkers")

	_, err = p.writeOld(ctx(t), account{ID: "a", Name: "x", Version: 1})
	require.NoError(t, err)
	_, err = p.writeOld(ctx(t), account{ID: "poison", Name: "x", Version: 1})
	require.NoError(t, err)
	payload := func(mig, key string) []byte {
		b, err := json.Marshal(dualwrite.Repair{Migration: mig, Key: key, Stage: flags.DualWrite, Side: flags.New, Reason: dualwrite.ReasonError})
		require.NoError(t, err)
		return b
	}
	topic := dualwrite.RepairTopic(pairMigration)
	batch := []outbox.Record{
		{Message: outbox.Message{Topic: topic, Key: "k/a", Payload: payload(pairMigration, "a")}},
		{Message: outbox.Message{Topic: "orders", Key: "o1", Payload: []byte("{}")}},
		{Message: outbox.Message{Topic: topic, Key: "k/poison", Payload: payload(pairMigration, "poison")}},
		{Message: outbox.Message{Topic: topic, Key: "k/bad", Payload: []byte(`{"migration":"accounts_v2"`)}},
		{Message: outbox.Message{Topic: dualwrite.RepairTopic("panicky"), Key: "k/p", Payload: payload("panicky", "p")}},
	}

	pub, err := dualwrite.NewRepairPublisher([]dualwrite.RepairHandler{rep, panicky})
	require.NoError(t, err)
	res := pub.Publish(ctx(t), batch)
	require.Len(t, res, len(batch))
	assert.NoError(t, res[0])
	assert.ErrorIs(t, res[1], dualwrite.ErrNoRepairer)
	assert.ErrorContains(t, res[1], `"orders"`)
	var re *dualwrite.RepairError
	assert.ErrorAs(t, res[2], &re)
	assert.ErrorContains(t, res[2], "c_poison")
	assert.ErrorContains(t, res[3], "decode repair")
	assert.ErrorContains(t, res[4], "load exploded")
	got, ok, err := p.load(ctx(t), flags.New, "a")
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, account{ID: "a", Name: "x", Version: 1}, got)

	var forwarded []string
	other := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error {
		for _, r := range b {
			forwarded = append(forwarded, r.Topic+" "+r.Key)
		}
		return make([]error, len(b))
	})
	pub, err = dualwrite.NewRepairPublisher([]dualwrite.RepairHandler{rep}, dualwrite.WithOtherTopics(other), dualwrite.WithRepairWorkers(2))
	require.NoError(t, err)
	res = pub.Publish(ctx(t), batch[:2])
	assert.Equal(t, []error{nil, nil}, res)
	assert.Equal(t, []string{"orders o1"}, forwarded)
}

// TestWatchdogStepsBackOnSecondaryWriteErrors: in shadow, writes to new
// fail for real (its CHECK constraint) for 10% of keys, over the watchdog's
// 5% limit: the watchdog steps the flag back to dualwrite through the
// Postgres flag store, audits why, the writer's stage source sees the flip,
// and every failed write left a repair.
func TestWatchdogStepsBackOnSecondaryWriteErrors(t *testing.T) {
	t.Parallel()
	p := newPgPair(t)
	store, err := pgflags.NewStore(p.old, pgflags.WithSchema(p.schema))
	require.NoError(t, err)
	require.NoError(t, store.Install(ctx(t)))
	ctrl, err := flags.NewController(store)
	require.NoError(t, err)
	for range 2 {
		_, err := ctrl.Advance(ctx(t), pairMigration, "alice", "up")
		require.NoError(t, err)
	}
	provider, err := pgflags.NewProvider(p.old, pgflags.WithSchema(p.schema))
	require.NoError(t, err)
	_, client := flagstest.Client(t, provider)
	source, err := flags.NewSource(client, flags.Off)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		st, _ := source.Stage(ctx(t), pairMigration, "k")
		return st == flags.Shadow
	}, 5*time.Second, 10*time.Millisecond)
	// A window that holds every write even on a slow machine: with a short
	// one, the first writes could leave it before the last is made.
	wd, err := flags.NewWatchdog(ctrl, flags.WatchdogConfig{Window: time.Minute, MinSamples: 200, MaxErrorRate: 0.05},
		flags.WithWatchdogLogger(slog.New(slog.DiscardHandler)))
	require.NoError(t, err)
	// The watchdog does not judge observations from the slot (Window/60) in
	// which the migration last changed: they may belong to the stage before.
	// Write only once a slot that starts after the last change has begun.
	last, err := store.Load(ctx(t), pairMigration)
	require.NoError(t, err)
	const slot = time.Minute / 60
	require.Eventually(t, func() bool { return time.Now().Truncate(slot).After(last.UpdatedAt) },
		5*time.Second, 5*time.Millisecond, "a slot after the last change (%v) begins", last.UpdatedAt)

	log, err := dualwrite.NewOutboxRepairLog(p.ob, p.old, dualwrite.RepairTopic(pairMigration))
	require.NoError(t, err)
	w, err := dualwrite.New(pairMigration, source, p.writeOld, p.writeNew, accountKey,
		dualwrite.WithRepairLog(log), dualwrite.WithSync(), dualwrite.WithObserver(wd), dualwrite.WithBreakerTrip(1000, time.Second))
	require.NoError(t, err)
	const n = 200
	for i := range n {
		name := "ok"
		if i%10 == 0 {
			name = "reject"
		}
		_, err := w.Write(ctx(t), account{ID: fmt.Sprintf("w%d", i), Name: name, Version: 1})
		require.NoError(t, err, "the secondary's failure is not the caller's")
	}
	h := wd.Health(pairMigration, flags.Shadow)
	assert.EqualValues(t, n, h.Ops)
	assert.EqualValues(t, n/10, h.Errors)

	trips := wd.Judge(ctx(t))
	require.Len(t, trips, 1)
	require.NoError(t, trips[0].Err)
	assert.Equal(t, flags.DualWrite, trips[0].State.Stage)
	audit, err := store.Audit(ctx(t), pairMigration, 1)
	require.NoError(t, err)
	assert.Equal(t, "watchdog", audit[0].Actor)
	assert.Equal(t, "dualwrite", audit[0].To)
	assert.Contains(t, audit[0].Reason, "error rate")
	require.Eventually(t, func() bool {
		st, _ := source.Stage(ctx(t), pairMigration, "w0")
		return st == flags.DualWrite
	}, 5*time.Second, 10*time.Millisecond, "the flip reaches the writer's stage source")

	st, err := p.ob.Stats(ctx(t), p.old, dualwrite.RepairTopic(pairMigration))
	require.NoError(t, err)
	assert.EqualValues(t, n/10, st.Pending, "every failed secondary write left a repair")
}
