package streams

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/inbox"
)

// ErrOutOfRetention matches a replay range that starts before what the
// cluster still holds.
var ErrOutOfRetention = errors.New("streams: replay range outside retention")

// TxHandler applies one record's effect inside tx.
type TxHandler func(ctx context.Context, tx pgx.Tx, rec *kgo.Record) error

// ReplayConfig describes a re-consumption of a topic range into a handler
// through the inbox.
type ReplayConfig struct {
	// Topic is read on the cluster of Side, with client options Opts.
	Topic string
	Side  flags.Side
	Opts  []kgo.Opt
	// The range starts at FromOffset in every partition, or, when FromTime
	// is set, at each partition's first record at or after it. It ends at
	// each partition's end when the replay starts.
	FromOffset int64
	FromTime   time.Time
	// Consumer names the effect in the inbox: a record whose origin the
	// inbox already holds for Consumer is skipped.
	Consumer string
	Inbox    *inbox.Inbox
	Pool     *pgxpool.Pool
	Handler  TxHandler
}

// ReplayStats counts what a replay did.
type ReplayStats struct {
	Read, Applied, Skipped int64
}

// Replay reads the range and hands each record to the handler in a
// transaction that first marks the record's [Origin] in the inbox, so an
// effect already applied (by an earlier replay, or by a consumer that
// recorded the origin the same way) is not applied again. A record's
// origin is the same on both clusters, so a range replayed on new after it
// was handled on old is skipped record by record. A range starting before
// a partition's log start is refused ([ErrOutOfRetention]) before anything
// is applied.
func Replay(ctx context.Context, cfg ReplayConfig) (ReplayStats, error) {
	switch {
	case cfg.Topic == "":
		return ReplayStats{}, errors.New("streams: ReplayConfig.Topic is required")
	case cfg.Side != flags.Old && cfg.Side != flags.New:
		return ReplayStats{}, errors.New("streams: ReplayConfig.Side must be old or new")
	case len(cfg.Opts) == 0:
		return ReplayStats{}, fmt.Errorf("%w: ReplayConfig.Opts", ErrMissingCluster)
	case cfg.Consumer == "":
		return ReplayStats{}, errors.New("streams: ReplayConfig.Consumer is required")
	case cfg.Inbox == nil || cfg.Pool == nil:
		return ReplayStats{}, errors.New("streams: ReplayConfig.Inbox and Pool are required")
	case cfg.Handler == nil:
		return ReplayStats{}, errors.New("streams: ReplayConfig.Handler is required")
	case cfg.FromOffset < 0:
		return ReplayStats{}, fmt.Errorf("streams: ReplayConfig.FromOffset %d is negative", cfg.FromOffset)
	}
	admCl, err := kgo.NewClient(cfg.Opts...)
	if err != nil {
		return ReplayStats{}, fmt.Errorf("streams: replay client: %w", err)
	}
	defer admCl.Close()
	adm := kadm.NewClient(admCl)
	if _, err := partitions(ctx, adm, cfg.Side, cfg.Topic); err != nil {
		return ReplayStats{}, err
	}
	starts, err := startOffsets(ctx, adm, cfg.Topic)
	if err != nil {
		return ReplayStats{}, err
	}
	ends, err := endOffsets(ctx, adm, cfg.Topic)
	if err != nil {
		return ReplayStats{}, err
	}
	from := map[int32]int64{}
	if !cfg.FromTime.IsZero() {
		at, err := listed(adm.ListOffsetsAfterMilli(ctx, cfg.FromTime.UnixMilli(), cfg.Topic))
		if err != nil {
			return ReplayStats{}, err
		}
		for p, o := range at {
			if o < 0 {
				o = ends[p]
			}
			if o == starts[p] && starts[p] > 0 {
				// The first record kept is at or after FromTime: records
				// between FromTime and it may have been deleted.
				return ReplayStats{}, fmt.Errorf("%w: %s/%d on the %s cluster keeps records from offset %d, which may be after %s",
					ErrOutOfRetention, cfg.Topic, p, cfg.Side, starts[p], cfg.FromTime.Format(time.RFC3339))
			}
			from[p] = o
		}
	} else {
		for p, s := range starts {
			if cfg.FromOffset < s {
				return ReplayStats{}, fmt.Errorf("%w: %s/%d on the %s cluster starts at offset %d, after %d",
					ErrOutOfRetention, cfg.Topic, p, cfg.Side, s, cfg.FromOffset)
			}
			from[p] = min(cfg.FromOffset, ends[p])
		}
	}
	assign := map[int32]kgo.Offset{}
	left := 0
	for p, o := range from {
		if o < ends[p] {
			assign[p] = kgo.NewOffset().At(o)
			left++
		}
	}
	var st ReplayStats
	if left == 0 {
		return st, nil
	}
	cl, err := kgo.NewClient(append(append([]kgo.Opt(nil), cfg.Opts...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{cfg.Topic: assign}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()))...)
	if err != nil {
		return st, fmt.Errorf("streams: replay client: %w", err)
	}
	defer cl.Close()
	done := map[int32]bool{}
	for len(done) < left {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return st, ctx.Err()
		}
		var ferr error
		fs.EachError(func(t string, p int32, err error) {
			if ferr == nil {
				ferr = fmt.Errorf("streams: replay fetch %s/%d: %w", t, p, err)
			}
		})
		if ferr != nil {
			return st, ferr
		}
		for it := fs.RecordIter(); !it.Done(); {
			rec := it.Next()
			if rec.Offset >= ends[rec.Partition] {
				done[rec.Partition] = true
				continue
			}
			st.Read++
			applied, err := applyOnce(ctx, cfg, rec)
			if err != nil {
				return st, err
			}
			if applied {
				st.Applied++
			} else {
				st.Skipped++
			}
			if rec.Offset+1 >= ends[rec.Partition] {
				done[rec.Partition] = true
			}
		}
	}
	return st, nil
}

func applyOnce(ctx context.Context, cfg ReplayConfig, rec *kgo.Record) (bool, error) {
	id := ""
	if o, err := OriginOf(rec, cfg.Side); err == nil {
		id = o.String()
	} else {
		id = cfg.Side.String() + "/" + fmt.Sprint(rec.Partition) + "/" + fmt.Sprint(rec.Offset) // the copy itself
	}
	applied := false
	err := pgx.BeginFunc(ctx, cfg.Pool, func(tx pgx.Tx) error {
		first, err := cfg.Inbox.Mark(ctx, tx, cfg.Consumer, id)
		if err != nil || !first {
			return err
		}
		applied = true
		return cfg.Handler(ctx, tx, rec)
	})
	if err != nil {
		return false, fmt.Errorf("streams: replay %s/%d@%d (origin %s): %w", rec.Topic, rec.Partition, rec.Offset, id, err)
	}
	return applied, nil
}

// InboxDedup returns a ConsumerConfig.UnknownOrigin that de-duplicates a
// record whose origin cannot be read on the outbox message id it carries
// (outbox.HeaderMessageID), marking it in its own transaction. The handler's
// effect is not in that transaction: use it for handlers whose effect is
// idempotent, or replay with [Replay] for effects that must be exact.
func InboxDedup(in *inbox.Inbox, pool *pgxpool.Pool, consumer string) func(ctx context.Context, rec *kgo.Record) (bool, error) {
	return func(ctx context.Context, rec *kgo.Record) (bool, error) {
		id := ""
		for _, h := range rec.Headers {
			if h.Key == outbox.HeaderMessageID {
				id = string(h.Value)
			}
		}
		if id == "" {
			return true, nil // nothing to de-duplicate on: counted as unknown, processed
		}
		first := false
		err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			var err error
			first, err = in.Mark(ctx, tx, consumer, id)
			return err
		})
		return first, err
	}
}
