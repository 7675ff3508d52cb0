package streams

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
)

// ErrGroupActive is returned by [Rewind] while the group has members on the
// cluster: a running consumer would overwrite the rewound commit.
var ErrGroupActive = errors.New("streams: consumer group has active members")

// RewindConfig says how far back a group goes on the cluster it reads.
type RewindConfig struct {
	Topic, Group string
	// Opts are the client options of the cluster holding the group's
	// current state (Side).
	Side flags.Side
	Opts []kgo.Opt
	// FromOffset (every partition) or FromTime (each partition's first
	// record at or after it) is where the group resumes.
	FromOffset int64
	FromTime   time.Time
}

// RewindResult is what a rewind changed in one partition.
type RewindResult struct {
	Partition int32
	From, To  int64 // the committed position before and after
	Undone    int64 // records whose origins were marked unprocessed again
}

// Rewind moves a stopped group back on the cluster it reads so that its
// consumers process the range again, once: it commits the earlier position
// and removes from the group's processed set the origins of the records in
// between (otherwise they would be dropped as already processed). The
// group must have no members there ([ErrGroupActive]); a range before the
// log start is refused ([ErrOutOfRetention]); nothing is committed on any
// error.
func Rewind(ctx context.Context, cfg RewindConfig) ([]RewindResult, error) {
	switch {
	case cfg.Topic == "" || cfg.Group == "":
		return nil, errors.New("streams: RewindConfig.Topic and Group are required")
	case cfg.Side != flags.Old && cfg.Side != flags.New:
		return nil, errors.New("streams: RewindConfig.Side must be old or new")
	case len(cfg.Opts) == 0:
		return nil, fmt.Errorf("%w: RewindConfig.Opts", ErrMissingCluster)
	case cfg.FromOffset < 0:
		return nil, fmt.Errorf("streams: RewindConfig.FromOffset %d is negative", cfg.FromOffset)
	}
	cl, err := kgo.NewClient(cfg.Opts...)
	if err != nil {
		return nil, fmt.Errorf("streams: %s cluster client: %w", cfg.Side, err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	if _, err := partitions(ctx, adm, cfg.Side, cfg.Topic); err != nil {
		return nil, err
	}
	gs, err := adm.DescribeGroups(ctx, cfg.Group)
	if err != nil {
		return nil, fmt.Errorf("streams: describe group %q: %w", cfg.Group, err)
	}
	if g, ok := gs[cfg.Group]; ok && len(g.Members) > 0 {
		return nil, fmt.Errorf("%w: %q has %d on the %s cluster; stop its consumers first", ErrGroupActive, cfg.Group, len(g.Members), cfg.Side)
	}
	commits, err := committed(ctx, adm, cfg.Group, cfg.Topic)
	if err != nil {
		return nil, err
	}
	if len(commits) == 0 {
		return nil, fmt.Errorf("%w %q: no commits for topic %q on the %s cluster", ErrUnknownGroup, cfg.Group, cfg.Topic, cfg.Side)
	}
	starts, err := startOffsets(ctx, adm, cfg.Topic)
	if err != nil {
		return nil, err
	}
	from := map[int32]int64{}
	if !cfg.FromTime.IsZero() {
		at, err := listed(adm.ListOffsetsAfterMilli(ctx, cfg.FromTime.UnixMilli(), cfg.Topic))
		if err != nil {
			return nil, err
		}
		for p, o := range at {
			if o == starts[p] && starts[p] > 0 {
				return nil, fmt.Errorf("%w: %s/%d on the %s cluster keeps records from offset %d, which may be after %s",
					ErrOutOfRetention, cfg.Topic, p, cfg.Side, starts[p], cfg.FromTime.Format(time.RFC3339))
			}
			from[p] = o
		}
	} else {
		for p, s := range starts {
			if cfg.FromOffset < s {
				return nil, fmt.Errorf("%w: %s/%d on the %s cluster starts at offset %d, after %d",
					ErrOutOfRetention, cfg.Topic, p, cfg.Side, s, cfg.FromOffset)
			}
			from[p] = cfg.FromOffset
		}
	}
	states := map[int32]*partState{}
	assign := map[int32]kgo.Offset{}
	var results []RewindResult
	for p, c := range commits {
		s, dimmers, _ := decodeState(c.Metadata)
		if !dimmers {
			s = partState{}
			s.side[cfg.Side].next = c.At
		}
		states[p] = &s
		f, ok := from[p]
		if !ok || f < 0 || f >= c.At {
			continue
		}
		results = append(results, RewindResult{Partition: p, From: c.At, To: f})
		assign[p] = kgo.NewOffset().At(f)
	}
	if len(assign) == 0 {
		return nil, nil
	}
	rd, err := kgo.NewClient(append(append([]kgo.Opt(nil), cfg.Opts...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{cfg.Topic: assign}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()))...)
	if err != nil {
		return nil, err
	}
	defer rd.Close()
	idx := map[int32]int{}
	for i, r := range results {
		idx[r.Partition] = i
	}
	left := len(assign)
	finished := map[int32]bool{}
	var spillErr error
	for left > 0 {
		fs := rd.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		var ferr error
		fs.EachError(func(t string, p int32, err error) {
			if ferr == nil {
				ferr = fmt.Errorf("streams: rewind fetch %s/%d: %w", t, p, err)
			}
		})
		if ferr != nil {
			return nil, ferr
		}
		fs.EachRecord(func(rec *kgo.Record) {
			p := rec.Partition
			r := &results[idx[p]]
			if finished[p] || rec.Offset >= r.From {
				if !finished[p] {
					finished[p] = true
					left--
				}
				return
			}
			if o, err := OriginOf(rec, cfg.Side); err == nil {
				if s := &states[p].side[o.Side]; o.Offset >= s.next && o.Offset < s.spilled && spillErr == nil {
					spillErr = fmt.Errorf("streams: rewind of group %q: origin %s is in a region of its processed set spilled to the overflow, which a rewind does not change", cfg.Group, o)
				}
				states[p].side[o.Side].remove(o.Offset)
				r.Undone++
			}
			if rec.Offset+1 >= r.From {
				finished[p] = true
				left--
			}
		})
	}
	if spillErr != nil {
		return nil, spillErr
	}
	offs := kadm.Offsets{}
	for _, r := range results {
		st := states[r.Partition]
		// The other cluster's bound was checked against the set before
		// these removals: records below it may now be unprocessed.
		st.other = 0
		md, err := st.encode()
		if err != nil {
			return nil, err
		}
		offs.Add(kadm.Offset{Topic: cfg.Topic, Partition: r.Partition, At: r.To, LeaderEpoch: -1, Metadata: md})
	}
	rs, err := adm.CommitOffsets(ctx, cfg.Group, offs)
	if err == nil {
		err = rs.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("streams: commit the rewind of group %q: %w", cfg.Group, err)
	}
	return results, nil
}
