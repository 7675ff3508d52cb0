package streams

import (
	"context"
	"errors"
	"fmt"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"

	"github.com/dimmer-dev/dimmer/flags"
)

// ErrUnknownTopic matches a topic missing from a cluster.
var ErrUnknownTopic = errors.New("streams: unknown topic")

// ErrPartitionMismatch is returned where partitions are kept (mirror, dual
// produce, cutover) but the clusters' topics have different partition
// counts: a key would land in another partition and lose its order.
var ErrPartitionMismatch = errors.New("streams: partition counts differ")

// ErrMissingCluster is returned when a cluster's client options are missing.
var ErrMissingCluster = errors.New("streams: cluster not configured")

// ClusterError is a request to one of the two clusters that failed: Side
// says which, for a caller that holds each cluster's settings (its
// credentials, say). Its message is Err's.
type ClusterError struct {
	Side flags.Side
	Err  error
}

func (e *ClusterError) Error() string { return e.Err.Error() }
func (e *ClusterError) Unwrap() error { return e.Err }

// partitions returns the partition count of topic on the cluster behind adm.
func partitions(ctx context.Context, adm *kadm.Client, side flags.Side, topic string) (int, error) {
	ds, err := adm.ListTopics(ctx, topic)
	if err != nil {
		return 0, &ClusterError{side, fmt.Errorf("streams: list topic %q on %s cluster: %w", topic, side, err)}
	}
	d, ok := ds[topic]
	if !ok || errors.Is(d.Err, kerr.UnknownTopicOrPartition) {
		return 0, fmt.Errorf("%w %q on the %s cluster", ErrUnknownTopic, topic, side)
	}
	if d.Err != nil {
		return 0, &ClusterError{side, fmt.Errorf("streams: topic %q on %s cluster: %w", topic, side, d.Err)}
	}
	return len(d.Partitions), nil
}

// samePartitions checks that topic exists on both clusters with the same
// partition count, and returns it.
func samePartitions(ctx context.Context, adm [3]*kadm.Client, topic [3]string) (int, error) {
	n0, err := partitions(ctx, adm[flags.Old], flags.Old, topic[flags.Old])
	if err != nil {
		return 0, err
	}
	n1, err := partitions(ctx, adm[flags.New], flags.New, topic[flags.New])
	if err != nil {
		return 0, err
	}
	if n0 != n1 {
		return 0, fmt.Errorf("%w: topic %q has %d on the old cluster, %q has %d on the new one",
			ErrPartitionMismatch, topic[flags.Old], n0, topic[flags.New], n1)
	}
	return n0, nil
}

// committed returns the group's commits for topic: partition → offset and
// metadata. A group that never committed has none.
func committed(ctx context.Context, adm *kadm.Client, group, topic string) (map[int32]kadm.Offset, error) {
	rs, err := adm.FetchOffsetsForTopics(ctx, group, topic)
	if errors.Is(err, kerr.GroupIDNotFound) {
		return map[int32]kadm.Offset{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("streams: fetch offsets of group %q: %w", group, err)
	}
	out := map[int32]kadm.Offset{}
	var first error
	rs.Each(func(r kadm.OffsetResponse) {
		if r.Topic != topic {
			return
		}
		if r.Err != nil {
			if first == nil {
				first = r.Err
			}
			return
		}
		if r.At >= 0 {
			out[r.Partition] = r.Offset
		}
	})
	if first != nil {
		return nil, fmt.Errorf("streams: fetch offsets of group %q: %w", group, first)
	}
	return out, nil
}

// startOffsets returns each partition's log start offset.
func startOffsets(ctx context.Context, adm *kadm.Client, topic string) (map[int32]int64, error) {
	return listed(adm.ListStartOffsets(ctx, topic))
}

// endOffsets returns each partition's high watermark.
func endOffsets(ctx context.Context, adm *kadm.Client, topic string) (map[int32]int64, error) {
	return listed(adm.ListEndOffsets(ctx, topic))
}

func listed(ls kadm.ListedOffsets, err error) (map[int32]int64, error) {
	if err != nil {
		return nil, fmt.Errorf("streams: list offsets: %w", err)
	}
	out := map[int32]int64{}
	var first error
	ls.Each(func(l kadm.ListedOffset) {
		if l.Err != nil && first == nil {
			first = fmt.Errorf("streams: list offsets of %s/%d: %w", l.Topic, l.Partition, l.Err)
		}
		out[l.Partition] = l.Offset
	})
	return out, first
}

func kerrOf(code int16) error { return kerr.ErrorForCode(code) }
