package streams

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/dimmer-dev/dimmer/flags"
)

// StageSource evaluates a migration's stage for one targeting key.
// [*flags.Source] is the usual implementation.
type StageSource interface {
	Stage(ctx context.Context, migration, entityKey string) (flags.Stage, error)
}

var _ StageSource = (*flags.Source)(nil)

// Handler processes one record. An error stops [Consumer.Run]: the record
// and the rest of its batch are not committed and are handled again on the
// next run.
type Handler func(ctx context.Context, rec *kgo.Record) error

// ConsumerConfig describes a consumer group that follows a topic's stage.
type ConsumerConfig struct {
	// Migration is the stage flag's name. Required.
	Migration string
	// Topic is consumed on both clusters. Required.
	Topic string
	// Group is the consumer group id, the same on both clusters. Required.
	Group string
	// Old and New are the client options of each cluster (seed brokers,
	// TLS, SASL). Both required.
	Old, New []kgo.Opt
	// Source evaluates the stage; its Reads side is the cluster consumed.
	// Required.
	Source StageSource
	// StageKey is the targeting key of the stage evaluation. Default: the
	// group id, so every instance of a group follows the same answer.
	StageKey string
	// Handler processes each record once. Required.
	Handler Handler
	// UnknownOrigin decides, for a record whose origin header does not parse,
	// whether to process it (first=true), e.g. through the inbox
	// ([InboxDedup]). Nil processes it. Either way it is counted.
	UnknownOrigin func(ctx context.Context, rec *kgo.Record) (first bool, err error)
	// Overflow takes the spans of a processed set too fragmented for the
	// commit metadata (copies arriving far out of origin order); without
	// one such a set stops the consumer with [ErrStateTooLarge].
	Overflow Overflow
	// PollTimeout bounds one poll, hence how soon a stage change is seen.
	// Default 250ms.
	PollTimeout time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// MeterProvider defaults to the global one.
	MeterProvider metric.MeterProvider
}

func (c *ConsumerConfig) withDefaults() {
	if c.MeterProvider == nil {
		c.MeterProvider = otel.GetMeterProvider()
	}
	if c.StageKey == "" {
		c.StageKey = c.Group
	}
	if c.PollTimeout == 0 {
		c.PollTimeout = 250 * time.Millisecond
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate names the first missing or bad field.
func (c ConsumerConfig) Validate() error {
	switch {
	case flags.ValidateName(c.Migration) != nil:
		return fmt.Errorf("streams: ConsumerConfig.Migration: %w", flags.ValidateName(c.Migration))
	case c.Topic == "":
		return errors.New("streams: ConsumerConfig.Topic is required")
	case c.Group == "":
		return errors.New("streams: ConsumerConfig.Group is required")
	case len(c.Old) == 0:
		return fmt.Errorf("%w: ConsumerConfig.Old", ErrMissingCluster)
	case len(c.New) == 0:
		return fmt.Errorf("%w: ConsumerConfig.New", ErrMissingCluster)
	case c.Source == nil:
		return errors.New("streams: ConsumerConfig.Source is required")
	case c.Handler == nil:
		return errors.New("streams: ConsumerConfig.Handler is required")
	case c.PollTimeout < 0:
		return errors.New("streams: ConsumerConfig.PollTimeout must not be negative")
	}
	return nil
}

// ConsumerStats counts what a [Consumer] did.
type ConsumerStats struct {
	Processed  int64 // records handed to the handler
	Duplicates int64 // records skipped because their origin was processed already
	Unknown    int64 // records whose origin header did not parse
	Cutovers   int64 // moves from one cluster to the other
	// Rescanned counts the records read after a move, already processed,
	// before the first one processed: what finding the position cost.
	Rescanned int64
	// Spilled counts spans moved to the Overflow; Lookups the records
	// whose origin only the Overflow could place.
	Spilled, Lookups int64
	// Fenced counts the times this instance held back from a cluster
	// because members of its group still consumed the other one.
	Fenced int64
	// Followed counts the other cluster's records checked ahead of a move
	// (their origin processed), which raised the bound a move starts at.
	Followed int64
	// Pauses are the cutover pauses: last record processed on one cluster
	// to the first processed on the other.
	Pauses []time.Duration
}

// Consumer consumes a topic from the cluster its stage reads, and moves
// between clusters at an exact position: see the package documentation.
type Consumer struct {
	cfg     ConsumerConfig
	records metric.Int64Counter // by outcome: processed, duplicate, unknown_origin
	moves   metric.Int64Counter
	adm     [3]*kadm.Client
	raw     [3]*kgo.Client

	mu        sync.Mutex
	stats     ConsumerStats
	lastOn    flags.Side
	lastAt    time.Time
	switching bool
	parts     map[int32]*partState
}

// NewConsumer validates cfg and connects admin clients to both clusters.
func NewConsumer(cfg ConsumerConfig) (*Consumer, error) {
	cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	c := &Consumer{cfg: cfg}
	meter := cfg.MeterProvider.Meter("github.com/dimmer-dev/dimmer/streams")
	var err error
	if c.records, err = meter.Int64Counter("dimmer.streams.consumer.records",
		metric.WithDescription("records a cluster-following consumer met, by outcome (processed, duplicate, unknown_origin) and cluster")); err != nil {
		return nil, err
	}
	if c.moves, err = meter.Int64Counter("dimmer.streams.consumer.moves",
		metric.WithDescription("moves of a consumer group between clusters, by destination")); err != nil {
		return nil, err
	}
	for side, opts := range map[flags.Side][]kgo.Opt{flags.Old: cfg.Old, flags.New: cfg.New} {
		cl, err := kgo.NewClient(opts...)
		if err != nil {
			c.closeAdmin()
			return nil, fmt.Errorf("streams: %s cluster client: %w", side, err)
		}
		c.raw[side], c.adm[side] = cl, kadm.NewClient(cl)
	}
	return c, nil
}

func (c *Consumer) closeAdmin() {
	for _, cl := range c.raw {
		if cl != nil {
			cl.Close()
		}
	}
}

// Stats returns a snapshot of the counters.
func (c *Consumer) Stats() ConsumerStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	s.Pauses = append([]time.Duration(nil), s.Pauses...)
	return s
}

// Close releases the admin clients. Call it after Run returned.
func (c *Consumer) Close() { c.closeAdmin() }

func (c *Consumer) side(ctx context.Context) flags.Side {
	st, err := c.cfg.Source.Stage(ctx, c.cfg.Migration, c.cfg.StageKey)
	if err != nil {
		c.cfg.Logger.Warn("streams: stage evaluation failed; using the fallback", "migration", c.cfg.Migration, "stage", st, "err", err)
	}
	return st.Reads()
}

// Run consumes until ctx ends or the handler fails. Whenever the stage's
// read side changes it commits where it stands, leaves the group on that
// cluster and joins it on the other, resuming at the next unprocessed
// record. It returns nil when ctx ends.
func (c *Consumer) Run(ctx context.Context) error {
	side := c.side(ctx)
	for ctx.Err() == nil {
		next, err := c.runOn(ctx, side)
		if err != nil {
			return err
		}
		if next != side {
			c.moves.Add(ctx, 1, metric.WithAttributes(attribute.String("topic", c.cfg.Topic), attribute.String("group", c.cfg.Group),
				attribute.String("to", next.String())))
			c.mu.Lock()
			c.stats.Cutovers++
			c.switching = true
			c.mu.Unlock()
			c.cfg.Logger.Info("streams: consumer moves", "group", c.cfg.Group, "topic", c.cfg.Topic, "from", side, "to", next)
		}
		side = next
	}
	return nil
}

// prepare makes the group's commit on side the current one: for every
// partition whose newest state (highest epoch) was committed on the other
// cluster, it commits on side a lower bound of the next unprocessed record
// with that state, one epoch up. Run calls it before joining a cluster, so
// a crash anywhere in a move is finished by the next run.
func (c *Consumer) prepare(ctx context.Context, side flags.Side) error {
	topic := c.cfg.Topic
	if _, err := samePartitions(ctx, c.adm, [3]string{flags.Old: topic, flags.New: topic}); err != nil {
		return err
	}
	return c.prepareParts(ctx, side, nil, nil)
}

// prepareParts is prepare for the partitions ps (nil: all). A member of
// the group on side commits through its client cl (an active group
// refuses commits from outside); nil commits through the admin client.
func (c *Consumer) prepareParts(ctx context.Context, side flags.Side, ps []int32, cl *kgo.Client) error {
	topic := c.cfg.Topic
	here, err := committed(ctx, c.adm[side], c.cfg.Group, topic)
	if err != nil {
		return err
	}
	there, err := committed(ctx, c.adm[side.Other()], c.cfg.Group, topic)
	if err != nil {
		return err
	}
	var starts map[int32]int64
	moves := kadm.Offsets{}
	for p, o := range there {
		if ps != nil && !slices.Contains(ps, p) {
			continue
		}
		ost, ok, err := c.stateOf(o, side.Other())
		if err != nil || !ok {
			continue
		}
		h, hasHere := here[p]
		if hasHere {
			if hst, hok, _ := c.stateOf(h, side); hok && hst.epoch >= ost.epoch {
				continue
			}
		}
		at := h.At
		if !hasHere {
			if starts == nil {
				if starts, err = startOffsets(ctx, c.adm[side], topic); err != nil {
					return err
				}
			}
			at = starts[p]
		}
		// The bound the state carries was checked record by record
		// against a set this one contains: a lower bound too, and the
		// nearer one after a long stay on the other cluster.
		at = max(at, ost.other)
		ost.epoch++
		// Every record below the position committed on the cluster left
		// was processed or dropped as processed there.
		ost.other = o.At
		md, err := ost.encode()
		if err != nil {
			return err
		}
		moves.Add(kadm.Offset{Topic: topic, Partition: p, At: at, LeaderEpoch: -1, Metadata: md})
	}
	if len(moves) == 0 {
		return nil
	}
	if cl != nil {
		err = commitOffsets(ctx, cl, moves)
	} else {
		var rs kadm.OffsetResponses
		rs, err = c.adm[side].CommitOffsets(ctx, c.cfg.Group, moves)
		if err == nil {
			err = rs.Error()
		}
	}
	if err != nil {
		return fmt.Errorf("streams: commit the move of group %q to the %s cluster: %w", c.cfg.Group, side, err)
	}
	return nil
}

// stateOf decodes a commit made on side. A commit without dimmer's
// metadata (a group that predates dimmer) means every native record below
// it was processed.
func (c *Consumer) stateOf(o kadm.Offset, side flags.Side) (partState, bool, error) {
	st, ok, err := decodeState(o.Metadata)
	if err != nil {
		c.cfg.Logger.Warn("streams: commit metadata is not dimmer's; reading it as a plain offset", "group", c.cfg.Group, "partition", o.Partition, "err", err)
	}
	if !ok {
		st = partState{}
		st.side[side].next = o.At
	}
	return st, true, nil
}

func (c *Consumer) runOn(ctx context.Context, side flags.Side) (flags.Side, error) {
	topic := c.cfg.Topic
	// A request ctx cancelled is Run stopped, not failed: it returns nil.
	if _, err := samePartitions(ctx, c.adm, [3]string{flags.Old: topic, flags.New: topic}); err != nil {
		if ctx.Err() != nil {
			return side, nil
		}
		return side, err
	}
	if next, err := c.awaitHandoff(ctx, side); err != nil || next != side {
		if ctx.Err() != nil {
			return next, nil
		}
		return next, err
	}
	opts := c.cfg.Old
	if side == flags.New {
		opts = c.cfg.New
	}
	c.mu.Lock()
	c.parts = map[int32]*partState{}
	c.mu.Unlock()
	var loadErr error
	var loadMu sync.Mutex
	// fenced: this session may not consume here; abandoned: it stopped on
	// an error with records polled but not handled, which no commit (the
	// revocation's, on close) may cover.
	var checked, fenced, abandoned bool // guarded by loadMu
	// A killed instance's membership holds the group's move to the other
	// cluster (awaitHandoff) until its session times out: 10s rather than
	// franz-go's 45s, unless the caller's options say otherwise.
	cl, err := kgo.NewClient(append(append([]kgo.Opt{kgo.SessionTimeout(10 * time.Second)}, opts...),
		kgo.ConsumerGroup(c.cfg.Group),
		kgo.ConsumeTopics(c.cfg.Topic),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.OnPartitionsAssigned(func(ctx context.Context, cl *kgo.Client, assigned map[string][]int32) {
			loadMu.Lock()
			defer loadMu.Unlock()
			if fenced || loadErr != nil {
				return
			}
			if !checked {
				// Checked again now that this instance is a member here:
				// of two instances joining opposite clusters at once, at
				// least one sees the other (see awaitHandoff).
				n, err := c.members(ctx, side.Other())
				if err != nil {
					loadErr = err
					return
				}
				if n > 0 {
					fenced = true
					return
				}
				checked = true
			}
			if err := c.prepareParts(ctx, side, assigned[c.cfg.Topic], cl); err != nil {
				loadErr = err
				return
			}
			if err := c.load(ctx, side, assigned[c.cfg.Topic]); err != nil {
				loadErr = err
			}
		}),
		kgo.OnPartitionsRevoked(func(ctx context.Context, cl *kgo.Client, revoked map[string][]int32) {
			loadMu.Lock()
			skip := fenced || abandoned
			loadMu.Unlock()
			if !skip {
				_ = c.commit(ctx, cl)
			}
			c.forget(revoked[c.cfg.Topic])
		}),
		kgo.OnPartitionsLost(func(_ context.Context, _ *kgo.Client, lost map[string][]int32) {
			c.forget(lost[c.cfg.Topic])
		}),
	)...)
	if err != nil {
		return side, fmt.Errorf("streams: %s cluster consumer: %w", side, err)
	}
	defer cl.Close()
	abandon := func() {
		loadMu.Lock()
		abandoned = true
		loadMu.Unlock()
		cl.AllowRebalance()
	}
	fctx, fstop := context.WithCancel(ctx)
	var fwg sync.WaitGroup
	fwg.Go(func() { c.follow(fctx, side) })
	defer func() { fstop(); fwg.Wait() }()
	for {
		if ctx.Err() != nil {
			return side, c.leave(cl)
		}
		if next := c.side(ctx); next != side {
			return next, c.leave(cl)
		}
		pctx, cancel := context.WithTimeout(ctx, c.cfg.PollTimeout)
		fs := cl.PollRecords(pctx, 1000)
		cancel()
		loadMu.Lock()
		lerr, f := loadErr, fenced
		loadMu.Unlock()
		if lerr != nil {
			abandon()
			return side, lerr
		}
		if f {
			// Nothing was loaded or processed here: leave without a commit
			// and wait for the group to leave the other cluster.
			c.mu.Lock()
			c.stats.Fenced++
			c.mu.Unlock()
			cl.AllowRebalance()
			lctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = cl.LeaveGroupContext(lctx)
			cancel()
			return side, nil
		}
		var ferr error
		fs.EachError(func(t string, p int32, err error) {
			if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) && ferr == nil {
				ferr = fmt.Errorf("streams: fetch %s/%d on the %s cluster: %w", t, p, side, err)
			}
		})
		if ferr != nil {
			abandon()
			return side, ferr
		}
		var herr error
		handled := map[int32]int64{}
		fs.EachRecord(func(rec *kgo.Record) {
			if herr == nil {
				if herr = c.handle(ctx, side, rec); herr == nil {
					handled[rec.Partition] = rec.Offset + 1
				}
			}
		})
		if herr != nil {
			// The records handled before the failure are committed, the
			// failed one and the rest of the batch are not.
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			if err := c.commitHandled(cctx, cl, handled); err != nil {
				c.cfg.Logger.Warn("streams: commit of the records handled before a handler error failed; they will be handled again",
					"group", c.cfg.Group, "err", err)
			}
			cancel()
			abandon()
			return side, herr
		}
		if err := c.commit(ctx, cl); err != nil && ctx.Err() == nil {
			abandon()
			return side, err
		}
		cl.AllowRebalance()
	}
}

// leave commits where the group stands and leaves the cluster's group.
func (c *Consumer) leave(cl *kgo.Client) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := c.commit(ctx, cl)
	_ = cl.LeaveGroupContext(ctx)
	return err
}

func (c *Consumer) load(ctx context.Context, side flags.Side, ps []int32) error {
	if len(ps) == 0 {
		return nil
	}
	cs, err := committed(ctx, c.adm[side], c.cfg.Group, c.cfg.Topic)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range ps {
		st := &partState{}
		if o, ok := cs[p]; ok {
			s, _, _ := c.stateOf(o, side)
			st = &s
		}
		c.parts[p] = st
	}
	return nil
}

func (c *Consumer) forget(ps []int32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range ps {
		delete(c.parts, p)
	}
}

func (c *Consumer) count(ctx context.Context, side flags.Side, outcome string) {
	c.records.Add(ctx, 1, metric.WithAttributes(attribute.String("topic", c.cfg.Topic), attribute.String("group", c.cfg.Group),
		attribute.String("cluster", side.String()), attribute.String("outcome", outcome)))
}

func (c *Consumer) handle(ctx context.Context, side flags.Side, rec *kgo.Record) error {
	c.mu.Lock()
	st := c.parts[rec.Partition]
	c.mu.Unlock()
	if st == nil {
		return fmt.Errorf("streams: record of unassigned partition %d", rec.Partition)
	}
	o, err := OriginOf(rec, side)
	process := true
	switch {
	case err != nil:
		c.mu.Lock()
		c.stats.Unknown++
		c.mu.Unlock()
		c.count(ctx, side, "unknown_origin")
		if c.cfg.UnknownOrigin != nil {
			first, err := c.cfg.UnknownOrigin(ctx, rec)
			if err != nil {
				return fmt.Errorf("streams: unknown-origin record %s/%d@%d: %w", rec.Topic, rec.Partition, rec.Offset, err)
			}
			process = first
		}
	case o.Partition != rec.Partition:
		return fmt.Errorf("%w: record %d@%d on the %s cluster came from partition %d", ErrPartitionMismatch, rec.Partition, rec.Offset, side, o.Partition)
	case st.side[o.Side].unsure(o.Offset):
		if c.cfg.Overflow == nil {
			return fmt.Errorf("streams: record %d@%d on the %s cluster: its origin %s is in a spilled region and ConsumerConfig.Overflow is not set", rec.Partition, rec.Offset, side, o)
		}
		had, err := c.cfg.Overflow.Has(ctx, OverflowKey{Group: c.cfg.Group, Topic: c.cfg.Topic, Side: o.Side, Partition: o.Partition}, o.Offset)
		if err != nil {
			return err
		}
		c.mu.Lock()
		c.stats.Lookups++
		c.mu.Unlock()
		if had {
			process = false
			c.duplicate(ctx, side)
		}
	case st.processed(o):
		process = false
		c.duplicate(ctx, side)
	}
	if process {
		if err := c.cfg.Handler(ctx, rec); err != nil {
			return err
		}
		c.count(ctx, side, "processed")
		now := time.Now()
		c.mu.Lock()
		c.stats.Processed++
		if c.switching && c.lastOn != side && !c.lastAt.IsZero() {
			c.stats.Pauses = append(c.stats.Pauses, now.Sub(c.lastAt))
		}
		c.switching = false
		c.lastOn, c.lastAt = side, now
		c.mu.Unlock()
	}
	// The follower reads the set concurrently: changes under the lock.
	c.mu.Lock()
	if err == nil && o.Side != side {
		st.side[o.Side].add(o.Offset)
	}
	st.side[side].reachTo(rec.Offset + 1)
	c.mu.Unlock()
	return nil
}

// commit commits every assigned partition's position with its state as
// metadata.
func (c *Consumer) commit(ctx context.Context, cl *kgo.Client) error {
	if err := c.spill(ctx); err != nil {
		return err
	}
	c.mu.Lock()
	md := map[int32]string{}
	for p, st := range c.parts {
		s, err := st.encode()
		if err != nil {
			c.mu.Unlock()
			return fmt.Errorf("streams: group %q partition %d: %w", c.cfg.Group, p, err)
		}
		md[p] = s
	}
	c.mu.Unlock()
	if err := commitWithMetadata(ctx, cl, md); err != nil {
		return fmt.Errorf("streams: commit group %q: %w", c.cfg.Group, err)
	}
	return nil
}

// spill moves the smallest spans of every set past spillAt to the
// Overflow, durably, before the commit that no longer carries them.
func (c *Consumer) spill(ctx context.Context) error {
	if c.cfg.Overflow == nil {
		return nil
	}
	type job struct {
		st   *partState
		key  OverflowKey
		out  []span
		left seen
	}
	var jobs []job
	c.mu.Lock()
	for p, st := range c.parts {
		for _, side := range []flags.Side{flags.Old, flags.New} {
			if len(st.side[side].done) <= spillAt {
				continue
			}
			left := st.side[side]
			left.done = slices.Clone(left.done)
			out := left.spill(keepSpans)
			jobs = append(jobs, job{st: st, out: out, left: left,
				key: OverflowKey{Group: c.cfg.Group, Topic: c.cfg.Topic, Side: side, Partition: p}})
		}
	}
	c.mu.Unlock()
	for _, j := range jobs {
		lo, hi := make([]int64, len(j.out)), make([]int64, len(j.out))
		for i, sp := range j.out {
			lo[i], hi[i] = sp.lo, sp.hi
		}
		if err := c.cfg.Overflow.Put(ctx, j.key, lo, hi); err != nil {
			return err
		}
		c.mu.Lock()
		s := &j.st.side[j.key.Side]
		gone := map[span]bool{}
		for _, sp := range j.out {
			gone[sp] = true
		}
		// Only the spans put are dropped: one that grew meanwhile stays,
		// known both here and there.
		s.done = slices.DeleteFunc(s.done, func(sp span) bool { return gone[sp] })
		s.spilled = max(s.spilled, j.left.spilled)
		s.settle()
		c.stats.Spilled += int64(len(j.out))
		c.mu.Unlock()
	}
	return nil
}

// members returns how many members the group has on side.
func (c *Consumer) members(ctx context.Context, side flags.Side) (int, error) {
	ds, err := c.adm[side].DescribeGroups(ctx, c.cfg.Group)
	if err != nil {
		return 0, &ClusterError{side, fmt.Errorf("streams: describe group %q on the %s cluster: %w", c.cfg.Group, side, err)}
	}
	d, ok := ds[c.cfg.Group]
	if !ok || d.Err != nil && errors.Is(d.Err, kerr.GroupIDNotFound) {
		return 0, nil
	}
	if d.Err != nil {
		return 0, &ClusterError{side, fmt.Errorf("streams: describe group %q on the %s cluster: %w", c.cfg.Group, side, d.Err)}
	}
	return len(d.Members), nil
}

// awaitHandoff waits until no member of the group consumes the other
// cluster, so that the group moves as a whole: an instance that sees the
// stage change first leaves, and joins the new side only after the last
// instance still following the former stage left it too; meanwhile those
// consume every partition where they are. It returns early, with the side
// to consume, when this instance's stage goes back.
func (c *Consumer) awaitHandoff(ctx context.Context, side flags.Side) (flags.Side, error) {
	logged := false
	for {
		n, err := c.members(ctx, side.Other())
		if err != nil || n == 0 {
			return side, err
		}
		if !logged {
			logged = true
			c.mu.Lock()
			c.stats.Fenced++
			c.mu.Unlock()
			c.cfg.Logger.Info("streams: waiting for the group to leave the other cluster", "group", c.cfg.Group, "topic", c.cfg.Topic,
				"to", side, "members there", n)
		}
		select {
		case <-ctx.Done():
			return side, nil
		case <-time.After(c.cfg.PollTimeout):
		}
		if next := c.side(ctx); next != side {
			return next, nil
		}
	}
}

// commitHandled commits, for the partitions in at, the position at (the
// record after the last one handled) with the state.
func (c *Consumer) commitHandled(ctx context.Context, cl *kgo.Client, at map[int32]int64) error {
	if len(at) == 0 {
		return nil
	}
	if err := c.spill(ctx); err != nil {
		return err
	}
	offs := map[string]map[int32]kgo.EpochOffset{c.cfg.Topic: {}}
	md := map[int32]string{}
	c.mu.Lock()
	for p, o := range at {
		st := c.parts[p]
		if st == nil {
			continue
		}
		s, err := st.encode()
		if err != nil {
			c.mu.Unlock()
			return fmt.Errorf("streams: group %q partition %d: %w", c.cfg.Group, p, err)
		}
		md[p] = s
		offs[c.cfg.Topic][p] = kgo.EpochOffset{Epoch: -1, Offset: o}
	}
	c.mu.Unlock()
	return commitAt(ctx, cl, offs, md)
}

// duplicate counts a record skipped because its origin was processed
// already (read again while finding the position after a move: rescanned).
func (c *Consumer) duplicate(ctx context.Context, side flags.Side) {
	c.mu.Lock()
	c.stats.Duplicates++
	if c.switching {
		c.stats.Rescanned++
	}
	c.mu.Unlock()
	c.count(ctx, side, "duplicate")
}
