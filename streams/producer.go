package streams

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
)

// ProducerOption configures a [Producer].
type ProducerOption func(*producerConfig)

type producerConfig struct {
	log         RepairLog
	copyTimeout time.Duration
	healCheck   time.Duration
	logger      *slog.Logger
}

// WithRepairLog sets where copies that did not reach the other cluster go.
// Required.
func WithRepairLog(l RepairLog) ProducerOption { return func(c *producerConfig) { c.log = l } }

// WithCopyTimeout bounds how long a copy may wait for the other cluster's
// acknowledgement before it becomes a repair. Default 5s.
func WithCopyTimeout(d time.Duration) ProducerOption {
	return func(c *producerConfig) { c.copyTimeout = d }
}

// WithHealCheck sets how often a partition whose copies go to the repair
// log checks whether its repairs were replayed, to copy directly again.
// Default 1s.
func WithHealCheck(d time.Duration) ProducerOption {
	return func(c *producerConfig) { c.healCheck = d }
}

// WithProducerLogger sets the logger (default slog.Default()).
func WithProducerLogger(l *slog.Logger) ProducerOption {
	return func(c *producerConfig) { c.logger = l }
}

// ProducerStats counts what a [Producer] did.
type ProducerStats struct {
	Produced      int64 // records acknowledged by the authoritative cluster
	Copied        int64 // copies acknowledged by the other cluster
	Repairs       int64 // copies recorded in the repair log
	RecordFailed  int64 // repairs that could not be recorded (logged)
	PendingCopies int64 // copies not yet acknowledged or recorded
	// RepairingPartitions counts the partitions whose copies go to the
	// repair log until it has replayed what it holds.
	RepairingPartitions int
}

// Producer produces a topic's records to the clusters its stage writes:
// the authoritative cluster's acknowledgement is the caller's result, and
// the copy to the other cluster is produced off the caller's path, in the
// same partition, carrying the record's [Origin]. Copies of one partition
// are acknowledged or turned into repairs in origin order; once one fails,
// the partition's later copies go to the repair log behind it until the
// log has replayed them, so per-partition (hence per-key) order holds on
// both clusters.
type Producer struct {
	migration, topic string
	source           StageSource
	cfg              producerConfig
	prim, copy       [3]*kgo.Client

	mu      sync.Mutex
	lanes   map[laneKey]*lane
	stats   ProducerStats
	repairs []pendingRepair // in the order they must be recorded
	wake    chan struct{}
	closed  bool
	done    chan struct{}
	// recording is the repair recorder's context; Close cancels it when
	// its own ctx ends, and what is unrecorded then is logged whole.
	recording     context.Context
	stopRecording context.CancelFunc
}

type laneKey struct {
	target    flags.Side
	partition int32
}

type copyState uint8

const (
	inflight copyState = iota
	acked
	failed
	parked // held back while the lane waits for its repairs to drain
)

type pending struct {
	// repair is taken before the copy is handed to franz-go, which owns
	// the record from then on (a timed-out copy is still its own).
	repair Repair
	state  copyState
	sent   time.Time
	unsent *kgo.Record // the copy, while parked
}

type lane struct {
	queue     []*pending
	repairing bool
	// parking: the lane holds its new copies back (off the caller's path)
	// until the repair log is empty, then sends them and copies directly
	// again. Under steady load the log is never empty while copies keep
	// going to it, so the lane stops feeding it first.
	parking  bool
	parkedAt time.Time
}

type pendingRepair struct {
	key laneKey
	r   Repair
}

// NewProducer returns a producer of topic for migration over two clusters'
// client options (seed brokers, TLS, SASL). Both clusters' clients use the
// idempotent producer with acks from all in-sync replicas.
func NewProducer(migration, topic string, source StageSource, old, new []kgo.Opt, opts ...ProducerOption) (*Producer, error) {
	if err := flags.ValidateName(migration); err != nil {
		return nil, fmt.Errorf("streams.NewProducer: migration: %w", err)
	}
	switch {
	case topic == "":
		return nil, errors.New("streams.NewProducer: topic is required")
	case source == nil:
		return nil, errors.New("streams.NewProducer: source is required")
	case len(old) == 0:
		return nil, fmt.Errorf("%w: streams.NewProducer: old", ErrMissingCluster)
	case len(new) == 0:
		return nil, fmt.Errorf("%w: streams.NewProducer: new", ErrMissingCluster)
	}
	cfg := producerConfig{copyTimeout: 5 * time.Second, healCheck: time.Second, logger: slog.Default()}
	for _, o := range opts {
		o(&cfg)
	}
	switch {
	case cfg.log == nil:
		return nil, errors.New("streams.NewProducer: WithRepairLog is required: a copy that fails must not be lost")
	case cfg.copyTimeout <= 0:
		return nil, errors.New("streams.NewProducer: WithCopyTimeout must be positive")
	case cfg.healCheck <= 0:
		return nil, errors.New("streams.NewProducer: WithHealCheck must be positive")
	case cfg.logger == nil:
		return nil, errors.New("streams.NewProducer: WithProducerLogger: logger is nil")
	}
	p := &Producer{migration: migration, topic: topic, source: source, cfg: cfg, lanes: map[laneKey]*lane{}, done: make(chan struct{})}
	p.wake = make(chan struct{}, 1)
	p.recording, p.stopRecording = context.WithCancel(context.Background())
	durable := []kgo.Opt{kgo.RequiredAcks(kgo.AllISRAcks()), kgo.DefaultProduceTopic(topic), kgo.ProducerLinger(0)}
	for side, o := range map[flags.Side][]kgo.Opt{flags.Old: old, flags.New: new} {
		prim, err := kgo.NewClient(append(append([]kgo.Opt(nil), o...), durable...)...)
		if err != nil {
			p.closeClients()
			return nil, fmt.Errorf("streams.NewProducer: %s cluster: %w", side, err)
		}
		p.prim[side] = prim
		cp, err := kgo.NewClient(append(append(append([]kgo.Opt(nil), o...), durable...),
			kgo.RecordPartitioner(kgo.ManualPartitioner()),
			// Copies are off the caller's path: batching them costs the
			// caller nothing and the brokers (and this process) less.
			kgo.ProducerLinger(5*time.Millisecond),
			kgo.RecordDeliveryTimeout(cfg.copyTimeout))...)
		if err != nil {
			p.closeClients()
			return nil, fmt.Errorf("streams.NewProducer: %s cluster: %w", side, err)
		}
		p.copy[side] = cp
	}
	go p.recordRepairs()
	return p, nil
}

func (p *Producer) closeClients() {
	for _, cl := range append(p.prim[:], p.copy[:]...) {
		if cl != nil {
			cl.Close()
		}
	}
}

// Stats returns the counters.
func (p *Producer) Stats() ProducerStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.stats
	for _, l := range p.lanes {
		s.PendingCopies += int64(len(l.queue))
		if l.repairing {
			s.RepairingPartitions++
		}
	}
	s.PendingCopies += int64(len(p.repairs))
	return s
}

// Produce writes rec (its Topic is set to the producer's topic) to the
// authoritative cluster of its key's stage and returns where it landed;
// the copy to the other cluster, if the stage writes both, is on its way
// when Produce returns. The stage is evaluated with the record key as the
// targeting key; an evaluation error is logged and its fallback stage used.
func (p *Producer) Produce(ctx context.Context, rec *kgo.Record) (Origin, error) {
	st, err := p.source.Stage(ctx, p.migration, string(rec.Key))
	if err != nil {
		p.cfg.logger.Warn("streams: stage evaluation failed; using the fallback", "migration", p.migration, "stage", st, "err", err)
	}
	auth, second := st.ProduceAuthoritative(), st.ProduceSecondary()
	rec.Topic = p.topic
	if rec.Timestamp.IsZero() {
		rec.Timestamp = time.Now()
	}
	type result struct {
		o   Origin
		err error
	}
	ch := make(chan result, 1)
	p.prim[auth].Produce(ctx, rec, func(r *kgo.Record, err error) {
		if err != nil {
			ch <- result{err: fmt.Errorf("streams: produce to the %s cluster: %w", auth, err)}
			return
		}
		o := Origin{Side: auth, Partition: r.Partition, Offset: r.Offset}
		ch <- result{o: o} // the caller goes on; the copy is not its business
		p.mu.Lock()
		p.stats.Produced++
		p.mu.Unlock()
		if second != flags.NoSide {
			// Still in the promise: franz-go calls a partition's promises
			// in offset order, so copies queue in origin order.
			p.enqueueCopy(second, copyOf(p.topic, r, o), o)
		}
	})
	// As franz-go's ProduceSync, the answer is the broker's: ctx bounds
	// the wait for buffer room, and a record sent is waited for, so that
	// an acknowledged record is never reported as failed.
	res := <-ch
	return res.o, res.err
}

func (p *Producer) enqueueCopy(target flags.Side, cp *kgo.Record, o Origin) {
	key := laneKey{target, o.Partition}
	p.mu.Lock()
	l := p.lanes[key]
	if l == nil {
		l = &lane{}
		p.lanes[key] = l
	}
	pe := &pending{repair: repairOf(p.migration, target, cp, o), sent: time.Now()}
	l.queue = append(l.queue, pe)
	switch {
	case l.repairing && l.parking && !p.closed:
		pe.state, pe.unsent = parked, cp
		p.mu.Unlock()
		return
	case l.repairing || p.closed:
		pe.state = failed
		p.drainLocked(key, l)
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	p.send(key, l, pe, cp)
}

// send hands a copy to franz-go; its promise settles the lane.
func (p *Producer) send(key laneKey, l *lane, pe *pending, cp *kgo.Record) {
	target, o := key.target, pe.repair.Origin
	p.copy[target].TryProduce(context.Background(), cp, func(_ *kgo.Record, err error) {
		p.mu.Lock()
		defer p.mu.Unlock()
		if pe.state != inflight {
			return // timed out already: a repair; this late copy is a duplicate consumers drop
		}
		if err != nil {
			pe.state = failed
			p.cfg.logger.Debug("streams: copy failed; it becomes a repair", "target", target, "origin", o, "err", err)
		} else {
			pe.state = acked
		}
		p.drainLocked(key, l)
	})
}

// drainLocked settles the lane's head in origin order: acknowledged copies
// leave, failed ones become repairs and put the lane in repair mode.
func (p *Producer) drainLocked(key laneKey, l *lane) {
	for len(l.queue) > 0 && l.queue[0].state != inflight && l.queue[0].state != parked {
		pe := l.queue[0]
		l.queue = l.queue[1:]
		if pe.state == acked {
			p.stats.Copied++
			continue
		}
		l.repairing = true
		p.repairs = append(p.repairs, pendingRepair{key: key, r: pe.repair})
		p.signal()
	}
	if len(l.queue) == 0 && !l.repairing {
		delete(p.lanes, key)
	}
}

func (p *Producer) signal() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// expireLocked fails copies the other cluster has not acknowledged within
// the copy timeout. The idempotent producer never fails a record it sent
// without an answer (it cannot know whether it was written), so behind an
// unreachable cluster it would wait for as long as the outage lasts; the
// copy becomes a repair instead, and should the original land later it is
// a duplicate consumers drop by its origin.
func (p *Producer) expireLocked(now time.Time) {
	for key, l := range p.lanes {
		expired := false
		for _, pe := range l.queue {
			if pe.state == inflight && now.Sub(pe.sent) >= p.cfg.copyTimeout {
				pe.state, expired = failed, true
			}
		}
		if expired {
			p.drainLocked(key, l)
		}
	}
}

// recordRepairs writes repairs to the log in order, retrying while the log
// is unavailable, and takes lanes out of repair mode once the log is empty.
func (p *Producer) recordRepairs() {
	defer close(p.done)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	lastCheck := time.Now()
	for {
		p.mu.Lock()
		p.expireLocked(time.Now())
		if len(p.repairs) == 0 && p.closed {
			p.mu.Unlock()
			return
		}
		var next *pendingRepair
		if len(p.repairs) > 0 {
			next = &p.repairs[0]
		}
		repairing := p.anyRepairingLocked()
		p.mu.Unlock()

		if next != nil {
			// Each attempt is bounded: a log that does not answer is
			// retried like one that fails.
			rctx, cancel := context.WithTimeout(p.recording, recordTimeout)
			err := p.cfg.log.Record(rctx, next.r)
			cancel()
			p.mu.Lock()
			switch {
			case err == nil:
				p.stats.Repairs++
				p.repairs = p.repairs[1:]
			case p.closed:
				p.stats.RecordFailed++
				p.cfg.logger.Error("streams: repair could not be recorded", "migration", p.migration, "topic", next.r.Topic,
					"target", next.r.Target, "origin", next.r.Origin, "key", string(next.r.Key), "value", next.r.Value, "err", err)
				p.repairs = p.repairs[1:]
			}
			p.mu.Unlock()
			if err != nil && !p.isClosed() {
				time.Sleep(100 * time.Millisecond)
			}
			continue
		}
		if repairing && time.Since(lastCheck) >= p.cfg.healCheck {
			lastCheck = time.Now()
			hctx, cancel := context.WithTimeout(p.recording, recordTimeout)
			p.heal(hctx)
			cancel()
		}
		select {
		case <-p.wake:
		case <-tick.C:
		}
	}
}

// heal takes lanes out of repair mode: a lane in repair mode with nothing
// in flight parks its new copies; once the repair log is empty the parked
// copies are sent, in order, and the lane copies directly again. A lane
// parked for longer than it should take the log to drain records its
// parked copies as repairs and tries again later.
func (p *Producer) heal(ctx context.Context) {
	p.mu.Lock()
	now := time.Now()
	for key, l := range p.lanes {
		switch {
		case l.repairing && !l.parking && len(l.queue) == 0:
			l.parking, l.parkedAt = true, now
		case l.parking && now.Sub(l.parkedAt) > 2*p.cfg.healCheck+time.Second:
			l.parking = false
			for _, pe := range l.queue {
				if pe.state == parked {
					pe.state, pe.unsent = failed, nil
				}
			}
			p.drainLocked(key, l)
		}
	}
	p.mu.Unlock()
	n, err := p.cfg.log.Pending(ctx)
	if err != nil || n > 0 {
		return
	}
	type toSend struct {
		key laneKey
		l   *lane
		pe  *pending
		cp  *kgo.Record
	}
	var sends []toSend
	p.mu.Lock()
	if len(p.repairs) > 0 || p.closed {
		p.mu.Unlock()
		return
	}
	for key, l := range p.lanes {
		if !l.parking {
			continue
		}
		l.parking, l.repairing = false, false
		for _, pe := range l.queue {
			if pe.state == parked {
				sends = append(sends, toSend{key, l, pe, pe.unsent})
				pe.state, pe.unsent, pe.sent = inflight, nil, time.Now()
			}
		}
		if len(l.queue) == 0 {
			delete(p.lanes, key)
		}
	}
	p.mu.Unlock()
	for _, s := range sends { // in queue order per lane: franz-go keeps it per partition
		p.send(s.key, s.l, s.pe, s.cp)
	}
}

func (p *Producer) anyRepairingLocked() bool {
	for _, l := range p.lanes {
		if l.repairing {
			return true
		}
	}
	return false
}

func (p *Producer) isClosed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closed
}

// Flush waits until every copy made so far was acknowledged or recorded as
// a repair, or ctx ends.
func (p *Producer) Flush(ctx context.Context) error {
	for {
		p.mu.Lock()
		waiting := len(p.repairs)
		p.mu.Unlock()
		waiting += p.unsettledCopies()
		if waiting == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("streams: flush: %d copies unsettled: %w", waiting, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// recordTimeout bounds one attempt to record a repair.
const recordTimeout = 5 * time.Second

// Close flushes (bounded by ctx), then stops: copies still unsettled become
// repairs, and repairs that cannot be recorded (within a second of ctx's
// end, on a log that does not answer) are logged with the record.
func (p *Producer) Close(ctx context.Context) error {
	ferr := p.Flush(ctx)
	p.mu.Lock()
	for key, l := range p.lanes { // parked copies become repairs
		l.parking = false
		for _, pe := range l.queue {
			if pe.state == parked {
				pe.state, pe.unsent = failed, nil
			}
		}
		p.drainLocked(key, l)
	}
	p.mu.Unlock()
	for _, cl := range p.copy {
		if cl != nil {
			cl.PurgeTopicsFromProducing(p.topic) // fails the unsettled copies: they become repairs
		}
	}
	for p.unsettledCopies() > 0 {
		time.Sleep(5 * time.Millisecond)
	}
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.signal()
	// The repairs still to record get a second past ctx: enough for a
	// log that answers, and Close stays bounded on one that does not.
	stop := context.AfterFunc(ctx, func() { time.AfterFunc(time.Second, p.stopRecording) })
	<-p.done
	stop()
	p.stopRecording()
	p.closeClients()
	return ferr
}

func (p *Producer) unsettledCopies() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, l := range p.lanes {
		n += len(l.queue)
	}
	return n
}
