package streams

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"

	"github.com/dimmer-dev/dimmer/flags"
)

// ErrUnknownGroup matches a consumer group that committed nothing for the
// topic on either cluster.
var ErrUnknownGroup = errors.New("streams: unknown consumer group")

// PartitionStatus is where one partition of a moving topic stands.
type PartitionStatus struct {
	Partition      int32
	OldEnd, NewEnd int64 // high watermarks
	// MirrorOn is the cluster the mirror copies from, where its group
	// commits (NoSide: no mirror asked for): old, or new for a mirror back
	// to old after complete ([MirrorConfig.From]). MirrorAt is the mirror's
	// committed position there (-1: no mirror), MirrorLag the records of
	// that cluster it has not copied yet.
	MirrorOn            flags.Side
	MirrorAt, MirrorLag int64
	// GroupOn is the cluster holding the group's current state (NoSide: the
	// group has not consumed this partition), At its committed position
	// there, Lag the records behind that cluster's end.
	GroupOn flags.Side
	Epoch   uint64
	At, Lag int64
	// OldNext and NewNext are the processed frontiers per origin cluster;
	// Holes counts processed spans above them.
	OldNext, NewNext int64
	Holes            int
}

// Status is a topic's and a group's position on both clusters.
type Status struct {
	Topic, Group string
	Partitions   []PartitionStatus
}

// MaxGroupLag is the largest Lag of any partition.
func (s Status) MaxGroupLag() int64 {
	var m int64
	for _, p := range s.Partitions {
		m = max(m, p.Lag)
	}
	return m
}

// MaxMirrorLag is the largest MirrorLag of any partition.
func (s Status) MaxMirrorLag() int64 {
	var m int64
	for _, p := range s.Partitions {
		m = max(m, p.MirrorLag)
	}
	return m
}

// GroupStatus reads where topic and group (optional: "") stand on both
// clusters, and the mirror's position when mirrorGroup is not "". Unknown
// topics, differing partition counts and a group that committed nothing on
// either cluster are errors naming them.
//
// The mirror's group is looked for on both clusters, as a mirror from new
// ([MirrorConfig.From]) commits on new. When both hold it (the default
// group name is the same both ways: a mirror to new before complete, one
// back to old after), the cluster where the group has members, a running
// mirror, is the one shown; with members on neither, new, since a mirror
// from new only runs once the one from old is done.
func GroupStatus(ctx context.Context, old, new *kadm.Client, topic, group, mirrorGroup string) (Status, error) {
	adm := [3]*kadm.Client{flags.Old: old, flags.New: new}
	n, err := samePartitions(ctx, adm, [3]string{flags.Old: topic, flags.New: topic})
	if err != nil {
		return Status{}, err
	}
	st := Status{Topic: topic, Group: group, Partitions: make([]PartitionStatus, n)}
	var ends [3]map[int32]int64
	for _, side := range []flags.Side{flags.Old, flags.New} {
		if ends[side], err = endOffsets(ctx, adm[side], topic); err != nil {
			return Status{}, err
		}
	}
	var mirror map[int32]kadm.Offset
	mirrorOn := flags.NoSide
	if mirrorGroup != "" {
		if mirrorOn, mirror, err = mirrorPosition(ctx, adm, mirrorGroup, topic); err != nil {
			return Status{}, err
		}
	}
	var commits [3]map[int32]kadm.Offset
	if group != "" {
		for _, side := range []flags.Side{flags.Old, flags.New} {
			if commits[side], err = committed(ctx, adm[side], group, topic); err != nil {
				return Status{}, err
			}
		}
		if len(commits[flags.Old]) == 0 && len(commits[flags.New]) == 0 {
			return Status{}, fmt.Errorf("%w %q: no commits for topic %q on either cluster", ErrUnknownGroup, group, topic)
		}
	}
	for i := range st.Partitions {
		p := int32(i)
		ps := PartitionStatus{Partition: p, OldEnd: ends[flags.Old][p], NewEnd: ends[flags.New][p], MirrorAt: -1}
		if mirrorGroup != "" {
			ps.MirrorOn, ps.MirrorAt = mirrorOn, 0
			if o, ok := mirror[p]; ok {
				ps.MirrorAt = o.At
			}
			ps.MirrorLag = max(0, ends[mirrorOn][p]-ps.MirrorAt)
		}
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
				best = &s
				ps.GroupOn, ps.At = side, o.At
			}
		}
		if best != nil {
			ps.Epoch = best.epoch
			ps.Lag = max(0, ends[ps.GroupOn][p]-ps.At)
			ps.OldNext, ps.NewNext = best.side[flags.Old].next, best.side[flags.New].next
			ps.Holes = len(best.side[flags.Old].done) + len(best.side[flags.New].done)
		}
		st.Partitions[i] = ps
	}
	return st, nil
}

// mirrorPosition finds the cluster the mirror's group consumes (see
// [GroupStatus]) and its commits there. A group committed on neither is a
// mirror from old (the default) that has copied nothing yet.
func mirrorPosition(ctx context.Context, adm [3]*kadm.Client, group, topic string) (flags.Side, map[int32]kadm.Offset, error) {
	var commits [3]map[int32]kadm.Offset
	for _, side := range []flags.Side{flags.Old, flags.New} {
		var err error
		if commits[side], err = committed(ctx, adm[side], group, topic); err != nil {
			return flags.NoSide, nil, err
		}
	}
	switch {
	case len(commits[flags.New]) == 0:
		return flags.Old, commits[flags.Old], nil
	case len(commits[flags.Old]) == 0:
		return flags.New, commits[flags.New], nil
	}
	var running [3]bool
	for _, side := range []flags.Side{flags.Old, flags.New} {
		var err error
		if running[side], err = hasMembers(ctx, adm[side], group); err != nil {
			return flags.NoSide, nil, err
		}
	}
	if running[flags.Old] && !running[flags.New] {
		return flags.Old, commits[flags.Old], nil
	}
	return flags.New, commits[flags.New], nil
}

// hasMembers says whether group has members on the cluster: a running
// mirror is one.
func hasMembers(ctx context.Context, adm *kadm.Client, group string) (bool, error) {
	gs, err := adm.DescribeGroups(ctx, group)
	if err != nil {
		return false, fmt.Errorf("streams: describe group %q: %w", group, err)
	}
	g, ok := gs[group]
	if !ok {
		return false, nil
	}
	if g.Err != nil {
		if errors.Is(g.Err, kerr.GroupIDNotFound) {
			return false, nil
		}
		return false, fmt.Errorf("streams: describe group %q: %w", group, g.Err)
	}
	return len(g.Members) > 0, nil
}

// ParseMirrorCheckpoint reads the offset a mirror commit records on the
// cluster the mirror copies to ("dimmer-mirror1 to=<offset>", or "new=" as
// written before mirrors could copy back to old).
func ParseMirrorCheckpoint(md string) (int64, bool) {
	v, ok := strings.CutPrefix(md, mirrorMetaPrefix)
	if !ok {
		if v, ok = strings.CutPrefix(md, legacyMirrorMetaPrefix); !ok {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return n, err == nil
}
