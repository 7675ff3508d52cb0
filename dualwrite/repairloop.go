package dualwrite

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
)

// RepairTopic is the outbox topic of a migration's repairs,
// "dimmer.repair.<migration>". Give it to [NewOutboxRepairLog]: the
// [RepairPublisher] delivers that topic to the migration's repairer and
// [NoPendingRepairsGuard] counts what is left on it.
func RepairTopic(migration string) string { return repairTopicPrefix + migration }

const repairTopicPrefix = "dimmer.repair."

// ErrNoRepairer: an outbox record reached a [RepairPublisher] on a topic
// that no repairer handles, and no publisher for other topics was given.
// The relay retries it and finally keeps it as a dead letter: it is not lost.
var ErrNoRepairer = errors.New("dualwrite: no repairer for this outbox topic")

// RepairHandler repairs the keys of one migration. [*Repairer] is one.
type RepairHandler interface {
	Migration() string
	Repair(ctx context.Context, r Repair) (Outcome, error)
}

var _ RepairHandler = (*Repairer[struct{}])(nil)

// RepairPublisher closes the repair loop: it is the [outbox.Publisher] of a
// relay over the repair log, and "publishing" a repair message means
// handing it to its migration's [Repairer]. The relay supplies everything a
// repair loop needs and this package does not re-implement: per-key order
// (the repairs of one key are delivered one at a time, in the order they
// were recorded), several relays sharing the work by leased buckets,
// retries with exponential backoff for a repair that failed, and, after
// RelayConfig.MaxAttempts, a dead letter that holds back only its own key
// until an operator retries or skips it ([outbox.Outbox.DeadLetters],
// [outbox.Outbox.RetryDead], [outbox.Outbox.SkipDead]).
//
// A repair counts as delivered when the repairer reports [Repaired] or
// [Skipped]; [Failed], an undecodable payload and a panic of a user
// function are publish failures (retried, then dead letters). Records of a
// batch are repaired concurrently ([WithRepairWorkers]): the relay never puts
// two records of one key in a batch.
//
// The repair log is best kept in an outbox table of its own
// (outbox.Config{Table: "repairs"}) with its own relay, so repairs never
// queue behind business events, and a broker relay never sees them. When
// one table serves both, give the broker's publisher to
// [WithOtherTopics]: this publisher then forwards every record that is not a
// repair to it.
type RepairPublisher struct {
	byTopic map[string]RepairHandler
	other   outbox.Publisher
	workers int
}

var _ outbox.Publisher = (*RepairPublisher)(nil)

// RepairPublisherOption configures a [RepairPublisher].
type RepairPublisherOption func(*RepairPublisher) error

// WithOtherTopics forwards records whose topic is not a handled repair topic
// to p (for an outbox table shared with business events). Without it such
// a record fails with [ErrNoRepairer].
func WithOtherTopics(p outbox.Publisher) RepairPublisherOption {
	return func(rp *RepairPublisher) error {
		if p == nil {
			return errors.New("WithOtherTopics: publisher is nil")
		}
		rp.other = p
		return nil
	}
}

// WithRepairWorkers repairs up to n records of a batch at once (default 8).
// Each runs its repairer's reads and writes, so n bounds the load the loop
// puts on the stores.
func WithRepairWorkers(n int) RepairPublisherOption {
	return func(rp *RepairPublisher) error {
		if n < 1 {
			return fmt.Errorf("WithRepairWorkers: n must be at least 1, got %d", n)
		}
		rp.workers = n
		return nil
	}
}

// NewRepairPublisher returns a publisher delivering [RepairTopic] of each
// repairer's migration to that repairer.
func NewRepairPublisher(repairers []RepairHandler, opts ...RepairPublisherOption) (*RepairPublisher, error) {
	if len(repairers) == 0 {
		return nil, errors.New("dualwrite.NewRepairPublisher: no repairers")
	}
	rp := &RepairPublisher{byTopic: make(map[string]RepairHandler, len(repairers)), workers: 8}
	for i, h := range repairers {
		if h == nil {
			return nil, fmt.Errorf("dualwrite.NewRepairPublisher: repairer %d is nil", i)
		}
		topic := RepairTopic(h.Migration())
		if _, dup := rp.byTopic[topic]; dup {
			return nil, fmt.Errorf("dualwrite.NewRepairPublisher: two repairers for migration %q", h.Migration())
		}
		rp.byTopic[topic] = h
	}
	for _, o := range opts {
		if err := o(rp); err != nil {
			return nil, fmt.Errorf("dualwrite.NewRepairPublisher: %w", err)
		}
	}
	return rp, nil
}

// Publish repairs the batch's repair records and forwards the others. See
// [RepairPublisher] for what counts as delivered.
func (rp *RepairPublisher) Publish(ctx context.Context, batch []outbox.Record) []error {
	results := make([]error, len(batch))
	var others []int
	var wg sync.WaitGroup
	sem := make(chan struct{}, rp.workers)
	for i := range batch {
		h, ok := rp.byTopic[batch[i].Topic]
		if !ok {
			others = append(others, i)
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			results[i] = rp.deliver(ctx, h, &batch[i])
		}()
	}
	// Forwarded while the repairs run.
	rp.forward(ctx, batch, others, results)
	wg.Wait()
	return results
}

func (rp *RepairPublisher) deliver(ctx context.Context, h RepairHandler, rec *outbox.Record) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("dualwrite: repair of outbox message %s panicked: %v\n%s", rec.ID, p, debug.Stack())
		}
	}()
	rep, err := DecodeRepair(rec.Payload)
	if err != nil {
		return fmt.Errorf("outbox message %s on %s: %w", rec.ID, rec.Topic, err)
	}
	out, err := h.Repair(ctx, rep)
	if out == Repaired || out == Skipped {
		return nil
	}
	if err == nil {
		err = fmt.Errorf("dualwrite: repair %s: outcome %q", rep, out)
	}
	return err
}

func (rp *RepairPublisher) forward(ctx context.Context, batch []outbox.Record, idx []int, results []error) {
	if len(idx) == 0 {
		return
	}
	if rp.other == nil {
		for _, i := range idx {
			results[i] = fmt.Errorf("%w: %q", ErrNoRepairer, batch[i].Topic)
		}
		return
	}
	sub := make([]outbox.Record, len(idx))
	for j, i := range idx {
		sub[j] = batch[i]
	}
	res := rp.other.Publish(ctx, sub)
	for j, i := range idx {
		if len(res) != len(sub) {
			results[i] = fmt.Errorf("dualwrite: other-topics publisher returned %d results for %d records", len(res), len(sub))
			continue
		}
		results[i] = res[j]
	}
}

// NewRepairRelay is the repair loop in one call: a relay over ob (the
// outbox the repair log writes to) whose publisher hands each migration's
// repairs to its repairer. Run it like any relay (Run, Shutdown); several
// instances may run one each. cfg tunes retries (MaxAttempts, BackoffMin,
// BackoffMax) and the batch size as for any relay.
func NewRepairRelay(ob *outbox.Outbox, pool *pgxpool.Pool, cfg outbox.RelayConfig, repairers ...RepairHandler) (*outbox.Relay, error) {
	if ob == nil {
		return nil, errors.New("dualwrite.NewRepairRelay: outbox is nil")
	}
	pub, err := NewRepairPublisher(repairers)
	if err != nil {
		return nil, err
	}
	r, err := ob.NewRelay(pool, pub, cfg)
	if err != nil {
		return nil, fmt.Errorf("dualwrite.NewRepairRelay: %w", err)
	}
	return r, nil
}

// RepairStats is the part of [*outbox.Outbox] [NoPendingRepairsGuard] reads.
type RepairStats interface {
	TopicStats(ctx context.Context, db outbox.Querier, topic string) (outbox.Stats, error)
}

var _ RepairStats = (*outbox.Outbox)(nil)

// NoPendingRepairsGuard is the go/no-go check "no pending repairs before
// complete" (a guard of [flags.Controller]): complete stops writing old, so a key whose sides
// still differ would keep its difference for good. It applies to every
// transition that moves keys into complete and fails while ob holds any
// undelivered repair message of the migration ([RepairTopic]), naming how
// many are pending, how many of them are dead letters, and the oldest's age.
// db is where the outbox lives (a pool). The count is by exact topic
// ([outbox.Outbox.TopicStats]): the repairs of "accounts.v2" do not hold
// back "accounts".
func NoPendingRepairsGuard(ob RepairStats, db outbox.Querier) flags.Guard {
	return flags.NewGuard("no-pending-repairs", flags.Entering(flags.Complete), func(ctx context.Context, t flags.Transition) error {
		if ob == nil || db == nil {
			return errors.New("no repair log configured: pending repairs cannot be ruled out")
		}
		topic := RepairTopic(t.Migration)
		st, err := ob.TopicStats(ctx, db, topic)
		if err != nil {
			return fmt.Errorf("repair log unreachable: %v", err)
		}
		if st.Pending == 0 {
			return nil
		}
		return fmt.Errorf("%d repairs pending on %s (%d of them dead letters), the oldest %s old: run the repair relay and retry or skip the dead letters",
			st.Pending, topic, st.Dead, st.Oldest.Round(time.Millisecond))
	})
}
