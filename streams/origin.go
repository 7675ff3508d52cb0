package streams

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
)

// HeaderOrigin is the record header a copy carries: where the record was
// first acknowledged, as "<side>/<partition>/<offset>" (e.g. "old/3/1207").
// A record without it is native to the cluster it is read from.
const HeaderOrigin = "dimmer-origin"

// ErrBadOrigin matches a malformed [HeaderOrigin] value.
var ErrBadOrigin = errors.New("streams: malformed origin header")

// Origin is a record's identity across both clusters: the cluster that
// acknowledged it first (the authoritative one when it was produced), and
// the partition and offset it got there. Copies keep the partition, so a
// record has the same partition on both clusters.
type Origin struct {
	Side      flags.Side
	Partition int32
	Offset    int64
}

func (o Origin) String() string { return string(o.appendTo(nil)) }

// appendTo appends the header form of o to b (one allocation per copy on
// the mirror's path, not four).
func (o Origin) appendTo(b []byte) []byte {
	b = append(b, o.Side.String()...)
	b = append(b, '/')
	b = strconv.AppendInt(b, int64(o.Partition), 10)
	b = append(b, '/')
	return strconv.AppendInt(b, o.Offset, 10)
}

// ParseOrigin parses a [HeaderOrigin] value.
func ParseOrigin(v string) (Origin, error) {
	parts := strings.Split(v, "/")
	if len(parts) != 3 {
		return Origin{}, fmt.Errorf("%w %q: want side/partition/offset", ErrBadOrigin, v)
	}
	var o Origin
	switch parts[0] {
	case "old":
		o.Side = flags.Old
	case "new":
		o.Side = flags.New
	default:
		return Origin{}, fmt.Errorf("%w %q: side must be old or new", ErrBadOrigin, v)
	}
	p, err := strconv.ParseInt(parts[1], 10, 32)
	if err != nil || p < 0 {
		return Origin{}, fmt.Errorf("%w %q: bad partition", ErrBadOrigin, v)
	}
	off, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil || off < 0 {
		return Origin{}, fmt.Errorf("%w %q: bad offset", ErrBadOrigin, v)
	}
	o.Partition, o.Offset = int32(p), off
	return o, nil
}

// OriginOf returns the identity of rec as read from the cluster on side:
// its [HeaderOrigin] when it is a copy, else its own partition and offset.
// A header that does not parse is an error wrapping [ErrBadOrigin].
func OriginOf(rec *kgo.Record, side flags.Side) (Origin, error) {
	for _, h := range rec.Headers {
		if h.Key == HeaderOrigin {
			return ParseOrigin(string(h.Value))
		}
	}
	return Origin{Side: side, Partition: rec.Partition, Offset: rec.Offset}, nil
}

// hasOrigin reports whether rec is a copy.
func hasOrigin(rec *kgo.Record) bool {
	for _, h := range rec.Headers {
		if h.Key == HeaderOrigin {
			return true
		}
	}
	return false
}

// copyOf returns the record to produce on the other cluster for rec, which
// was acknowledged at o: same partition, key, value, timestamp and headers,
// plus the origin.
func copyOf(topic string, rec *kgo.Record, o Origin) *kgo.Record {
	hs := make([]kgo.RecordHeader, 0, len(rec.Headers)+1)
	for _, h := range rec.Headers {
		if h.Key != HeaderOrigin {
			hs = append(hs, h)
		}
	}
	hs = append(hs, kgo.RecordHeader{Key: HeaderOrigin, Value: o.appendTo(make([]byte, 0, 24))})
	return &kgo.Record{
		Topic:     topic,
		Partition: o.Partition,
		Key:       rec.Key,
		Value:     rec.Value,
		Headers:   hs,
		Timestamp: rec.Timestamp,
	}
}
