package streams

import (
	"context"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
)

// followTick bounds how long the follower waits for records, hence how
// often it re-checks the stage, the assignment and the records it holds.
const followTick = 250 * time.Millisecond

// followed is one partition the follower reads on the other cluster: the
// state whose bound it raises, and the records read but not yet known to
// be processed (the partition is paused while there are any).
type followed struct {
	st      *partState
	pending []*kgo.Record
	paused  bool
}

// follow runs beside a consumer reading side while the stage writes the
// other cluster too. For each assigned partition it reads the other
// cluster's partition from the state's bound and raises the bound over
// every record whose origin the state holds, stopping at the first one it
// does not: that record waits until the consumer processes its origin here.
// The bound is committed with the state, so a move to the other cluster
// starts reading near its first unprocessed record instead of at the log
// start, however long the topic. Reading is best effort: a failure only
// leaves the bound lower.
func (c *Consumer) follow(ctx context.Context, side flags.Side) {
	other := side.Other()
	opts := c.cfg.Old
	if other == flags.New {
		opts = c.cfg.New
	}
	topic := c.cfg.Topic
	var cl *kgo.Client
	var parts map[int32]*followed
	stop := func() {
		if cl != nil {
			cl.Close()
			cl, parts = nil, nil
		}
	}
	defer stop()
	for ctx.Err() == nil {
		want := map[int32]*partState{}
		if st, err := c.cfg.Source.Stage(ctx, c.cfg.Migration, c.cfg.StageKey); err == nil && st.Writes(other) {
			c.mu.Lock()
			for p, s := range c.parts {
				want[p] = s
			}
			c.mu.Unlock()
		}
		if !sameStates(want, parts) {
			// An assignment change or a state reloaded from a commit: the
			// records checked against the states left are checked again.
			stop()
			if len(want) > 0 {
				assign := map[int32]kgo.Offset{}
				parts = map[int32]*followed{}
				c.mu.Lock()
				for p, s := range want {
					assign[p] = kgo.NewOffset().At(s.other)
					parts[p] = &followed{st: s}
				}
				c.mu.Unlock()
				var err error
				cl, err = kgo.NewClient(append(append([]kgo.Opt(nil), opts...),
					kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: assign}),
					kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
					kgo.FetchIsolationLevel(kgo.ReadCommitted()))...)
				if err != nil {
					c.cfg.Logger.Debug("streams: follower client", "group", c.cfg.Group, "cluster", other, "err", err)
					cl, parts = nil, nil
				}
			}
		}
		if cl == nil {
			select {
			case <-ctx.Done():
			case <-time.After(followTick):
			}
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, followTick)
		fs := cl.PollFetches(pctx)
		cancel()
		fs.EachPartition(func(ftp kgo.FetchTopicPartition) {
			if f := parts[ftp.Partition]; f != nil {
				f.pending = append(f.pending, ftp.Records...)
			}
		})
		var pause, resume []int32
		var n int64
		c.mu.Lock()
		for p, f := range parts {
			for len(f.pending) > 0 {
				rec := f.pending[0]
				if rec.Offset >= f.st.other {
					o, err := OriginOf(rec, other)
					if err != nil || o.Partition != p || !f.st.processed(o) {
						break
					}
					f.st.other = rec.Offset + 1
					n++
				}
				f.pending[0] = nil
				f.pending = f.pending[1:]
			}
			switch {
			case len(f.pending) > 0 && !f.paused:
				f.paused = true
				pause = append(pause, p)
			case len(f.pending) == 0 && f.paused:
				f.paused = false
				resume = append(resume, p)
			}
		}
		c.stats.Followed += n
		c.mu.Unlock()
		if len(pause) > 0 {
			cl.PauseFetchPartitions(map[string][]int32{topic: pause})
		}
		if len(resume) > 0 {
			cl.ResumeFetchPartitions(map[string][]int32{topic: resume})
		}
	}
}

func sameStates(want map[int32]*partState, have map[int32]*followed) bool {
	if len(want) != len(have) {
		return false
	}
	for p, s := range want {
		if f := have[p]; f == nil || f.st != s {
			return false
		}
	}
	return true
}
