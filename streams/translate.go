package streams

import (
	"context"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
)

// Translation is a group's exact position on one cluster for one
// partition: the offset of the first record it has not processed.
type Translation struct {
	Partition int32
	// From is the cluster holding the group's current state, At its
	// committed position there.
	From flags.Side
	At   int64
	// Next is the offset on the asked cluster of the first record whose
	// origin the group has not processed (the end offset when there is
	// none); Scanned counts the records read to find it.
	Next, Scanned int64
}

// Translate computes, for every partition, where group would resume on
// cluster to: the first record there whose origin it has not processed,
// found by reading from a lower bound (the highest of the group's commit on
// to, the bound its current state carries for to, and the log start) with
// the processed set of its current state. It changes nothing.
// The clients are one per cluster (opts, for reading records; adm derived).
func Translate(ctx context.Context, opts [3][]kgo.Opt, topic, group string, to flags.Side) ([]Translation, error) {
	var adm [3]*kadm.Client
	for _, side := range []flags.Side{flags.Old, flags.New} {
		if len(opts[side]) == 0 {
			return nil, fmt.Errorf("%w: %s", ErrMissingCluster, side)
		}
		cl, err := kgo.NewClient(opts[side]...)
		if err != nil {
			return nil, fmt.Errorf("streams: %s cluster client: %w", side, err)
		}
		defer cl.Close()
		adm[side] = kadm.NewClient(cl)
	}
	n, err := samePartitions(ctx, adm, [3]string{flags.Old: topic, flags.New: topic})
	if err != nil {
		return nil, err
	}
	var commits [3]map[int32]kadm.Offset
	for _, side := range []flags.Side{flags.Old, flags.New} {
		if commits[side], err = committed(ctx, adm[side], group, topic); err != nil {
			return nil, err
		}
	}
	if len(commits[flags.Old]) == 0 && len(commits[flags.New]) == 0 {
		return nil, fmt.Errorf("%w %q: no commits for topic %q on either cluster", ErrUnknownGroup, group, topic)
	}
	starts, err := startOffsets(ctx, adm[to], topic)
	if err != nil {
		return nil, err
	}
	ends, err := endOffsets(ctx, adm[to], topic)
	if err != nil {
		return nil, err
	}
	out := make([]Translation, n)
	states := map[int32]*partState{}
	assign := map[int32]kgo.Offset{}
	for i := range out {
		p := int32(i)
		tr := Translation{Partition: p, Next: ends[p]}
		var best *partState
		for _, side := range []flags.Side{flags.Old, flags.New} {
			o, ok := commits[side][p]
			if !ok {
				continue
			}
			s, dimmers, _ := decodeState(o.Metadata)
			if !dimmers {
				s = partState{}
				s.side[side].next = o.At
			}
			if best == nil || s.epoch > best.epoch {
				best, tr.From, tr.At = &s, side, o.At
			}
		}
		lower := starts[p]
		if o, ok := commits[to][p]; ok {
			lower = max(lower, o.At)
		}
		if best == nil {
			best = &partState{} // never consumed: every record is unprocessed
		} else if tr.From != to {
			lower = max(lower, best.other)
		}
		states[p] = best
		if lower < ends[p] {
			assign[p] = kgo.NewOffset().At(lower)
		}
		out[i] = tr
	}
	if len(assign) == 0 {
		return out, nil
	}
	cl, err := kgo.NewClient(append(append([]kgo.Opt(nil), opts[to]...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: assign}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()))...)
	if err != nil {
		return nil, fmt.Errorf("streams: %s cluster client: %w", to, err)
	}
	defer cl.Close()
	left := len(assign)
	done := map[int32]bool{}
	for left > 0 {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		fs := cl.PollFetches(pctx)
		cancel()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		var ferr error
		fs.EachError(func(t string, p int32, err error) {
			if ferr == nil {
				ferr = fmt.Errorf("streams: translate: fetch %s/%d on the %s cluster: %w", t, p, to, err)
			}
		})
		if ferr != nil {
			return nil, ferr
		}
		fs.EachRecord(func(rec *kgo.Record) {
			p := rec.Partition
			if done[p] {
				return
			}
			tr := &out[p]
			tr.Scanned++
			o, err := OriginOf(rec, to)
			if err != nil || !states[p].processed(o) || rec.Offset+1 >= ends[p] {
				if err != nil || !states[p].processed(o) {
					tr.Next = rec.Offset
				}
				done[p] = true
				left--
			}
		})
	}
	return out, nil
}
