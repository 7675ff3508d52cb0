package streams

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
)

// Repair is a copy that did not reach its cluster: the record as it must
// be produced there, origin included.
type Repair struct {
	Migration string         `json:"migration"`
	Topic     string         `json:"topic"`
	Target    flags.Side     `json:"target"`
	Origin    Origin         `json:"origin"`
	Key       []byte         `json:"key,omitempty"`
	Value     []byte         `json:"value,omitempty"`
	Headers   []RepairHeader `json:"headers,omitempty"`
	Timestamp time.Time      `json:"timestamp"`
}

// RepairHeader is one record header of a [Repair].
type RepairHeader struct {
	Key   string `json:"k"`
	Value []byte `json:"v,omitempty"`
}

// record is the copy to produce.
func (r Repair) record() *kgo.Record {
	rec := &kgo.Record{Topic: r.Topic, Key: r.Key, Value: r.Value, Timestamp: r.Timestamp}
	for _, h := range r.Headers {
		rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: h.Key, Value: h.Value})
	}
	return copyOf(r.Topic, rec, r.Origin)
}

func repairOf(migration string, target flags.Side, cp *kgo.Record, o Origin) Repair {
	r := Repair{Migration: migration, Topic: cp.Topic, Target: target, Origin: o, Key: cp.Key, Value: cp.Value, Timestamp: cp.Timestamp}
	for _, h := range cp.Headers {
		if h.Key != HeaderOrigin {
			r.Headers = append(r.Headers, RepairHeader{Key: h.Key, Value: h.Value})
		}
	}
	return r
}

// RepairLog records repairs durably and says how many are pending.
type RepairLog interface {
	Record(ctx context.Context, r Repair) error
	Pending(ctx context.Context) (int64, error)
}

// RepairTopic is the outbox topic of a migration's stream repairs.
func RepairTopic(migration string) string { return "dimmer.streamrepair." + migration }

// OutboxRepairLog records repairs as outbox messages on
// [RepairTopic](migration), keyed by target cluster, topic, partition and
// record key, so the outbox relay replays a key's repairs one at a time in
// the order they were recorded ([NewRepairRelay]).
type OutboxRepairLog struct {
	ob        *outbox.Outbox
	pool      *pgxpool.Pool
	migration string
}

var _ RepairLog = (*OutboxRepairLog)(nil)

// NewOutboxRepairLog returns a repair log in ob, written through pool.
func NewOutboxRepairLog(ob *outbox.Outbox, pool *pgxpool.Pool, migration string) (*OutboxRepairLog, error) {
	switch {
	case ob == nil:
		return nil, errors.New("streams: NewOutboxRepairLog: outbox is nil")
	case pool == nil:
		return nil, errors.New("streams: NewOutboxRepairLog: pool is nil")
	}
	if err := flags.ValidateName(migration); err != nil {
		return nil, fmt.Errorf("streams: NewOutboxRepairLog: migration: %w", err)
	}
	return &OutboxRepairLog{ob: ob, pool: pool, migration: migration}, nil
}

// repairKey orders a record key's repairs; keyless records are ordered
// per partition. Keying by record key, not by partition, lets the relay
// replay many keys per round (it delivers one message per key at a time),
// fast enough to drain under load.
func repairKey(target flags.Side, topic string, partition int32, key []byte) string {
	k := target.String() + "/" + topic + "/" + strconv.FormatInt(int64(partition), 10)
	if key != nil {
		k += "/" + string(key)
	}
	return k
}

// Record enqueues r.
func (l *OutboxRepairLog) Record(ctx context.Context, r Repair) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("streams: encode repair: %w", err)
	}
	_, err = l.ob.EnqueuePool(ctx, l.pool, outbox.Message{Topic: RepairTopic(l.migration), Key: repairKey(r.Target, r.Topic, r.Origin.Partition, r.Key), Payload: b})
	return err
}

// Pending counts the repairs not yet replayed (dead letters included).
func (l *OutboxRepairLog) Pending(ctx context.Context) (int64, error) {
	s, err := l.ob.TopicStats(ctx, l.pool, RepairTopic(l.migration))
	return s.Pending, err
}

// DecodeRepair reads back a repair recorded by [OutboxRepairLog].
func DecodeRepair(payload []byte) (Repair, error) {
	var r Repair
	if err := json.Unmarshal(payload, &r); err != nil {
		return Repair{}, fmt.Errorf("streams: decode repair: %w", err)
	}
	if r.Target != flags.Old && r.Target != flags.New {
		return Repair{}, fmt.Errorf("streams: decode repair: target %d is neither old nor new", r.Target)
	}
	return r, nil
}

// RepairPublisher replays repairs: an [outbox.Publisher] producing each to
// its target cluster, in its origin partition, with its origin header.
// Build the clients with [kgo.RecordPartitioner]([kgo.ManualPartitioner]())
// and the franz-go defaults (idempotent, acks=all).
type RepairPublisher struct {
	clients [3]*kgo.Client
}

var _ outbox.Publisher = (*RepairPublisher)(nil)

// NewRepairPublisher returns a publisher over the two clusters' clients.
func NewRepairPublisher(old, new *kgo.Client) (*RepairPublisher, error) {
	if old == nil || new == nil {
		return nil, fmt.Errorf("%w: NewRepairPublisher needs both clients", ErrMissingCluster)
	}
	return &RepairPublisher{clients: [3]*kgo.Client{flags.Old: old, flags.New: new}}, nil
}

// NewRepairRelay returns the outbox relay that replays a migration's
// stream repairs (all the migrations' repairs in ob, in fact: each carries
// its target).
func NewRepairRelay(ob *outbox.Outbox, pool *pgxpool.Pool, cfg outbox.RelayConfig, old, new *kgo.Client) (*outbox.Relay, error) {
	pub, err := NewRepairPublisher(old, new)
	if err != nil {
		return nil, err
	}
	return ob.NewRelay(pool, pub, cfg)
}

// Publish produces every repair and waits for each acknowledgement or ctx.
func (p *RepairPublisher) Publish(ctx context.Context, batch []outbox.Record) []error {
	results := make([]error, len(batch))
	acked := make([]bool, len(batch))
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i := range batch {
		r, err := DecodeRepair(batch[i].Payload)
		if err != nil {
			results[i] = err
			continue
		}
		wg.Add(1)
		p.clients[r.Target].Produce(ctx, r.record(), func(_ *kgo.Record, err error) {
			mu.Lock()
			results[i], acked[i] = err, true
			mu.Unlock()
			wg.Done()
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		// Not acknowledged yet: the relay retries; a late delivery is a
		// duplicate consumers drop by origin.
		mu.Lock()
		defer mu.Unlock()
		out := append([]error(nil), results...)
		for i := range out {
			if !acked[i] && out[i] == nil {
				out[i] = fmt.Errorf("streams: repair not acknowledged: %w", context.Cause(ctx))
			}
		}
		return out
	}
	return results
}
