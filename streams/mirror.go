package streams

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/dimmer-dev/dimmer/flags"
)

// MirrorConfig describes a copy of one topic from the old cluster to the
// new one, for producers that cannot be changed to produce to both.
type MirrorConfig struct {
	// Topic is read on the old cluster. Required.
	Topic string
	// TargetTopic is written on the other cluster. Default: Topic.
	TargetTopic string
	// From is the cluster copied from: Old (the default) fills new before
	// consumers move; New fills old back after producers that cannot be
	// changed moved to new (complete), so that consumers can roll back.
	From flags.Side
	// Old and New are the client options of each cluster. Both required.
	Old, New []kgo.Opt
	// Group holds the mirror's durable position on the old cluster.
	// Default "dimmer-mirror.<Topic>".
	Group string
	// MaxBatch bounds the records copied per round. Default 10000.
	MaxBatch int
	// StopTimeout bounds a stop: once Run's context ends, the round in
	// flight has this long to be produced and committed (then a restart
	// sends it again), and leaving the group as long again (then the
	// group's session times out instead). Default 10s, so a stop fits in
	// a 30s termination grace period even when a cluster stopped
	// answering.
	StopTimeout time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

func (c *MirrorConfig) withDefaults() {
	if c.TargetTopic == "" {
		c.TargetTopic = c.Topic
	}
	if c.Group == "" {
		c.Group = "dimmer-mirror." + c.Topic
	}
	if c.From == flags.NoSide {
		c.From = flags.Old
	}
	if c.MaxBatch == 0 {
		c.MaxBatch = 10000
	}
	if c.StopTimeout == 0 {
		c.StopTimeout = 10 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate names the first missing or bad field.
func (c MirrorConfig) Validate() error {
	switch {
	case c.Topic == "":
		return errors.New("streams: MirrorConfig.Topic is required")
	case len(c.Old) == 0:
		return fmt.Errorf("%w: MirrorConfig.Old", ErrMissingCluster)
	case len(c.New) == 0:
		return fmt.Errorf("%w: MirrorConfig.New", ErrMissingCluster)
	case c.From != flags.NoSide && c.From != flags.Old && c.From != flags.New:
		return fmt.Errorf("streams: MirrorConfig.From must be old or new, got %d", c.From)
	case c.MaxBatch < 1:
		return fmt.Errorf("streams: MirrorConfig.MaxBatch must be positive, got %d", c.MaxBatch)
	case c.StopTimeout < 0:
		return fmt.Errorf("streams: MirrorConfig.StopTimeout must not be negative, got %v", c.StopTimeout)
	}
	return nil
}

// MirrorStats counts what a [Mirror] did.
type MirrorStats struct {
	Copied  int64 // records produced to the new cluster (a re-sent tail counts again)
	Skipped int64 // copies made by a dual-producing [Producer], not copied back
	Rounds  int64 // batches committed
}

// Mirror copies a topic from the old cluster to the new one: same
// partition, key, value, headers and timestamp, per-partition order kept,
// and a [HeaderOrigin] on every copy so that consumers can move between
// the clusters exactly. Its position is a consumer-group commit on the old
// cluster, made only after the new cluster acknowledged every copy before
// it: a mirror killed at any point resumes there, loses nothing and may
// copy a tail again (consumers recognise the repeat by its origin).
type Mirror struct {
	cfg                     MirrorConfig
	copied, skipped, rounds atomic.Int64
}

// NewMirror validates cfg. Nothing is contacted before [Mirror.Run].
func NewMirror(cfg MirrorConfig) (*Mirror, error) {
	cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Mirror{cfg: cfg}, nil
}

// Stats returns the counters.
func (m *Mirror) Stats() MirrorStats {
	return MirrorStats{Copied: m.copied.Load(), Skipped: m.skipped.Load(), Rounds: m.rounds.Load()}
}

// mirrorMetaPrefix starts what the mirror's commit metadata records per
// partition: the offset, on the cluster it copies to, after the last copy
// it committed. Mirrors before MirrorConfig.From wrote legacyMirrorMetaPrefix
// (they only copied to new); it is still read.
const (
	mirrorMetaPrefix       = "dimmer-mirror1 to="
	legacyMirrorMetaPrefix = "dimmer-mirror1 new="
)

// Run copies until ctx ends (then it returns nil) or a cluster fails. It
// first checks that the topic exists on both clusters with the same
// partition count ([ErrUnknownTopic], [ErrPartitionMismatch]), before
// anything is produced or committed.
func (m *Mirror) Run(ctx context.Context) error {
	var adm [3]*kadm.Client
	for _, side := range []flags.Side{flags.Old, flags.New} {
		opts := m.cfg.Old
		if side == flags.New {
			opts = m.cfg.New
		}
		cl, err := kgo.NewClient(opts...)
		if err != nil {
			return fmt.Errorf("streams: mirror %s cluster client: %w", side, err)
		}
		defer cl.Close()
		adm[side] = kadm.NewClient(cl)
	}
	from, to := m.cfg.From, m.cfg.From.Other()
	var topics [3]string
	topics[from], topics[to] = m.cfg.Topic, m.cfg.TargetTopic
	if _, err := samePartitions(ctx, adm, topics); err != nil {
		if ctx.Err() != nil {
			return nil // stopped while asking, not failed
		}
		return err
	}
	srcOpts, dstOpts := m.cfg.Old, m.cfg.New
	if from == flags.New {
		srcOpts, dstOpts = m.cfg.New, m.cfg.Old
	}
	// A killed mirror's group membership blocks its successor until the
	// session times out: 10s rather than franz-go's 45s, unless the
	// caller's options say otherwise.
	src, err := kgo.NewClient(append(append([]kgo.Opt{kgo.SessionTimeout(10 * time.Second)}, srcOpts...),
		kgo.ConsumerGroup(m.cfg.Group),
		kgo.ConsumeTopics(m.cfg.Topic),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
	)...)
	if err != nil {
		return fmt.Errorf("streams: mirror source client: %w", err)
	}
	defer func() {
		// Leaving the group within StopTimeout: a coordinator that does
		// not answer would otherwise hold Close for its retries.
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.cfg.StopTimeout)
		defer cancel()
		src.AllowRebalance()
		_ = src.LeaveGroupContext(lctx)
		src.Close()
	}()
	dst, err := kgo.NewClient(append(append([]kgo.Opt(nil), dstOpts...),
		kgo.RecordPartitioner(kgo.ManualPartitioner()),
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.ProducerLinger(0),
	)...)
	if err != nil {
		return fmt.Errorf("streams: mirror target client: %w", err)
	}
	// A produce abandoned at a stop ends when dst closes (first, as defers
	// run), and is waited for after.
	var inFlight sync.WaitGroup
	defer inFlight.Wait()
	defer dst.Close()

	for {
		fs := src.PollRecords(ctx, m.cfg.MaxBatch)
		if ctx.Err() != nil {
			src.AllowRebalance()
			return nil
		}
		var ferr error
		fs.EachError(func(t string, p int32, err error) {
			if ferr == nil && !errors.Is(err, context.Canceled) {
				ferr = fmt.Errorf("streams: mirror fetch %s/%d: %w", t, p, err)
			}
		})
		if ferr != nil {
			src.AllowRebalance()
			return ferr
		}
		copies := make([]*kgo.Record, 0, fs.NumRecords())
		fs.EachRecord(func(rec *kgo.Record) {
			if hasOrigin(rec) {
				m.skipped.Add(1)
				return
			}
			copies = append(copies, copyOf(m.cfg.TargetTopic, rec, Origin{Side: from, Partition: rec.Partition, Offset: rec.Offset}))
		})
		// A stop (ctx) lets the round in flight finish: produced and
		// committed, so a graceful stop re-sends nothing.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		// ... but not past StopTimeout after the stop.
		stopRound := context.AfterFunc(ctx, func() { time.AfterFunc(m.cfg.StopTimeout, cancel) })
		err := m.produceWithin(rctx, &inFlight, dst, copies)
		if err != nil {
			stopRound()
			cancel()
			src.AllowRebalance()
			if ctx.Err() != nil {
				m.cfg.Logger.Warn("streams: mirror stopped with a round unfinished; a restart copies it again", "topic", m.cfg.Topic, "err", err)
				return nil
			}
			return err
		}
		md := map[int32]string{}
		for _, c := range copies {
			md[c.Partition] = mirrorMetaPrefix + strconv.FormatInt(c.Offset+1, 10)
		}
		err = commitWithMetadata(rctx, src, md)
		stopRound()
		cancel()
		if err != nil {
			src.AllowRebalance()
			if ctx.Err() != nil {
				m.cfg.Logger.Warn("streams: mirror stopped with a round uncommitted; a restart copies it again", "topic", m.cfg.Topic, "err", err)
				return nil
			}
			return fmt.Errorf("streams: mirror commit: %w", err)
		}
		m.copied.Add(int64(len(copies)))
		m.rounds.Add(1)
		src.AllowRebalance()
	}
}

// produceWithin produces copies, giving up waiting when ctx ends: a
// request in flight to a broker that stopped answering is not cut by its
// context, only by the client's close.
func (m *Mirror) produceWithin(ctx context.Context, inFlight *sync.WaitGroup, dst *kgo.Client, copies []*kgo.Record) error {
	done := make(chan error, 1)
	inFlight.Go(func() { done <- m.produce(ctx, dst, copies) })
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("streams: mirror produce to the target cluster: %w", ctx.Err())
	}
}

func (m *Mirror) produce(ctx context.Context, dst *kgo.Client, copies []*kgo.Record) error {
	if len(copies) == 0 {
		return nil
	}
	if err := dst.ProduceSync(ctx, copies...).FirstErr(); err != nil {
		return fmt.Errorf("streams: mirror produce to the target cluster: %w", err)
	}
	return nil
}

// commitWithMetadata commits the client's consumed positions, with md's
// string as the metadata of its partitions.
func commitWithMetadata(ctx context.Context, cl *kgo.Client, md map[int32]string) error {
	return commitAt(ctx, cl, cl.UncommittedOffsets(), md)
}

func commitAt(ctx context.Context, cl *kgo.Client, uncommitted map[string]map[int32]kgo.EpochOffset, md map[int32]string) error {
	if len(uncommitted) == 0 {
		return nil
	}
	var cerr error
	cctx := kgo.PreCommitFnContext(ctx, func(req *kmsg.OffsetCommitRequest) error {
		for i := range req.Topics {
			for j := range req.Topics[i].Partitions {
				p := &req.Topics[i].Partitions[j]
				if m, ok := md[p.Partition]; ok {
					p.Metadata = &m
				}
			}
		}
		return nil
	})
	cl.CommitOffsetsSync(cctx, uncommitted, func(_ *kgo.Client, _ *kmsg.OffsetCommitRequest, resp *kmsg.OffsetCommitResponse, err error) {
		if err != nil {
			cerr = err
			return
		}
		for _, t := range resp.Topics {
			for _, p := range t.Partitions {
				if e := kerrOf(p.ErrorCode); e != nil && cerr == nil {
					cerr = e
				}
			}
		}
	})
	return cerr
}

// commitOffsets commits offs (their offsets and metadata) as a member of
// the client's group, so the commit is fenced by its generation.
func commitOffsets(ctx context.Context, cl *kgo.Client, offs kadm.Offsets) error {
	at := map[string]map[int32]kgo.EpochOffset{}
	md := map[int32]string{}
	offs.Each(func(o kadm.Offset) {
		if at[o.Topic] == nil {
			at[o.Topic] = map[int32]kgo.EpochOffset{}
		}
		at[o.Topic][o.Partition] = kgo.EpochOffset{Epoch: o.LeaderEpoch, Offset: o.At}
		md[o.Partition] = o.Metadata
	})
	return commitAt(ctx, cl, at, md)
}
