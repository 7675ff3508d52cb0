package kafkasink

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/outbox"
)

// Publisher is an [outbox.Publisher] over a franz-go client.
type Publisher struct {
	client *kgo.Client
	topic  func(string) string
}

var (
	_ outbox.Publisher   = (*Publisher)(nil)
	_ outbox.RecordLimit = (*Publisher)(nil)
)

// Option configures a [Publisher].
type Option func(*Publisher)

// WithTopicMap maps a message's topic to the Kafka topic (e.g. to add an
// environment prefix). Default: the message topic unchanged.
func WithTopicMap(f func(topic string) string) Option {
	return func(p *Publisher) { p.topic = f }
}

// ErrNilClient is returned by [New] without a client.
var ErrNilClient = errors.New("kafkasink: client is nil")

// ErrWeakProducer is returned by [New] for a client whose settings would
// let an acknowledged record be lost or a retry duplicate or reorder it.
var ErrWeakProducer = errors.New("kafkasink: producer must use acks=all and the idempotent producer")

// New returns a publisher producing through client. The client is the
// caller's: it is not closed by the publisher. A client configured with
// fewer than all in-sync replicas' acks, or with idempotent writes
// disabled, is refused ([ErrWeakProducer]): the outbox deletes a row once
// its record is acknowledged, so the acknowledgement must be durable.
func New(client *kgo.Client, opts ...Option) (*Publisher, error) {
	if client == nil {
		return nil, ErrNilClient
	}
	if acks, ok := client.OptValue(kgo.RequiredAcks).(kgo.Acks); ok && acks != kgo.AllISRAcks() {
		name := "LeaderAck"
		if acks == kgo.NoAck() {
			name = "NoAck"
		}
		return nil, fmt.Errorf("%w: RequiredAcks is %s", ErrWeakProducer, name)
	}
	if off, ok := client.OptValue(kgo.DisableIdempotentWrite).(bool); ok && off {
		return nil, fmt.Errorf("%w: DisableIdempotentWrite is set", ErrWeakProducer)
	}
	p := &Publisher{client: client, topic: func(t string) string { return t }}
	for _, o := range opts {
		o(p)
	}
	if p.topic == nil {
		return nil, errors.New("kafkasink: WithTopicMap: function is nil")
	}
	return p, nil
}

// DefaultMaxMessageBytes is Kafka's default message.max.bytes (and
// kfake's): the largest record batch a broker accepts unless the broker or
// topic is configured otherwise.
const DefaultMaxMessageBytes = 1048588

// ClientOptions are the producer settings the outbox relies on, to append
// to the caller's own (seed brokers, TLS, SASL): acks from all in-sync
// replicas and the idempotent producer (both franz-go defaults, stated so
// that no later option silently weakens them), no linger, since the relay
// already batches, and record batches capped at Kafka's default
// message.max.bytes ([DefaultMaxMessageBytes]), so that a batch of many
// records is split as the broker requires. For a broker or topic that
// accepts larger batches, append kgo.ProducerBatchMaxBytes with its
// max.message.bytes: [Publisher.MaxRecordBytes] follows it.
func ClientOptions(brokers ...string) []kgo.Opt {
	return []kgo.Opt{
		kgo.SeedBrokers(brokers...),
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.ProducerLinger(0),
		kgo.ProducerBatchMaxBytes(DefaultMaxMessageBytes),
	}
}

// MaxRecordBytes is the largest record the client produces: its
// ProducerBatchMaxBytes (franz-go refuses a record that does not fit in a
// batch on its own), which must not exceed the broker's message.max.bytes
// (the topic's max.message.bytes). Set the Publisher as the outbox's
// Config.RecordLimit so Enqueue refuses what the broker would.
func (p *Publisher) MaxRecordBytes() int {
	if v, ok := p.client.OptValue(kgo.ProducerBatchMaxBytes).(int32); ok && v > 0 {
		return int(v)
	}
	return DefaultMaxMessageBytes
}

// RecordBytes is the size of a batch holding m's record alone, as franz-go
// counts it against ProducerBatchMaxBytes: the batch framing, and the
// record with its key, value, the message-ID header this publisher adds and
// m's headers, each length a zig-zag varint (record format v2,
// uncompressed).
func (p *Publisher) RecordBytes(m outbox.Message) int { return RecordBytes(m) }

// recordBatchOverhead is franz-go's framing of a record batch in a produce
// request (a 4-byte array length, then Kafka's 61-byte batch header).
const recordBatchOverhead = 4 + 61

// RecordBytes is [Publisher.RecordBytes] without a client.
func RecordBytes(m outbox.Message) int {
	vl := func(n int) int { return varintLen(int64(n)) }
	body := 1 + 1 + 1 // attributes, timestamp delta 0, offset delta 0
	if m.Key == "" {
		body += vl(-1)
	} else {
		body += vl(len(m.Key)) + len(m.Key)
	}
	body += vl(len(m.Payload)) + len(m.Payload)
	headers := 1 + len(m.Headers)
	body += vl(headers)
	body += vl(len(outbox.HeaderMessageID)) + len(outbox.HeaderMessageID) + vl(36) + 36 // a UUID's text
	for k, v := range m.Headers {
		body += vl(len(k)) + len(k) + vl(len(v)) + len(v)
	}
	return recordBatchOverhead + vl(body) + body
}

func varintLen(v int64) int {
	u := uint64(v<<1) ^ uint64(v>>63) // zig-zag
	n := 1
	for u >= 0x80 {
		u >>= 7
		n++
	}
	return n
}

// ErrNotAcknowledged is wrapped by the result of a record the broker had not
// acknowledged when Publish's context ended. The record stays with the
// client, which may still deliver it: the relay's retry can then make a
// duplicate (at-least-once), never a reorder, since the client keeps a
// partition's records in the order they were produced.
var ErrNotAcknowledged = errors.New("kafkasink: not acknowledged before the context ended")

// Publish produces the batch and waits for every acknowledgement, or for
// ctx: then the records not yet acknowledged fail with [ErrNotAcknowledged].
// Returning at ctx matters because the idempotent producer never fails a
// record it has sent without an answer: behind an unreachable broker,
// waiting for the callbacks would hold the relay (its leases, its gauges)
// for as long as the outage lasts.
func (p *Publisher) Publish(ctx context.Context, batch []outbox.Record) []error {
	w := &waiter{results: make([]error, len(batch)), acked: make([]bool, len(batch)), left: len(batch), done: make(chan struct{})}
	if len(batch) == 0 {
		return w.results
	}
	krs := p.records(batch)
	for i := range krs {
		p.client.Produce(ctx, &krs[i], func(_ *kgo.Record, err error) { w.finish(i, err) })
	}
	select {
	case <-w.done:
	case <-ctx.Done():
	}
	return w.collect(ctx)
}

// records builds a batch's Kafka records. Their keys, message-ID header
// values and headers are cut from one allocation each for the whole batch:
// per record, those small allocations cost the relay more than producing.
func (p *Publisher) records(batch []outbox.Record) []kgo.Record {
	krs := make([]kgo.Record, len(batch))
	keyBytes, headers := 0, 0
	for i := range batch {
		keyBytes += len(batch[i].Key)
		headers += 1 + len(batch[i].Headers)
	}
	keys := make([]byte, 0, keyBytes)
	ids := make([]byte, 36*len(batch))
	hs := make([]kgo.RecordHeader, 0, headers)
	var names []string
	for i := range batch {
		rec, kr := &batch[i], &krs[i]
		kr.Topic = p.topic(rec.Topic)
		kr.Value = rec.Payload
		if rec.Key != "" {
			keys = append(keys, rec.Key...)
			kr.Key = keys[len(keys)-len(rec.Key) : len(keys) : len(keys)]
		}
		id := ids[36*i : 36*i+36 : 36*i+36]
		uuidText(id, rec.ID)
		first := len(hs)
		hs = append(hs, kgo.RecordHeader{Key: outbox.HeaderMessageID, Value: id})
		names = names[:0]
		for k := range rec.Headers {
			names = append(names, k)
		}
		slices.Sort(names) // stable header order for consumers
		for _, k := range names {
			hs = append(hs, kgo.RecordHeader{Key: k, Value: []byte(rec.Headers[k])})
		}
		kr.Headers = hs[first:len(hs):len(hs)]
	}
	return krs
}

// uuidText writes id's canonical text form (36 bytes) into dst.
func uuidText(dst []byte, id [16]byte) {
	hex.Encode(dst[0:8], id[0:4])
	dst[8] = '-'
	hex.Encode(dst[9:13], id[4:6])
	dst[13] = '-'
	hex.Encode(dst[14:18], id[6:8])
	dst[18] = '-'
	hex.Encode(dst[19:23], id[8:10])
	dst[23] = '-'
	hex.Encode(dst[24:36], id[10:16])
}

// waiter gathers a batch's produce callbacks, some of which may come after
// Publish has returned.
type waiter struct {
	mu       sync.Mutex
	results  []error
	acked    []bool // a callback came (results alone cannot tell: nil is success)
	left     int
	done     chan struct{}
	returned bool
}

func (w *waiter) finish(i int, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.returned {
		w.results[i], w.acked[i] = err, true
	}
	if w.left--; w.left == 0 {
		close(w.done)
	}
}

func (w *waiter) collect(ctx context.Context) []error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.returned = true
	for i, ok := range w.acked {
		if !ok {
			w.results[i] = fmt.Errorf("%w: %w", ErrNotAcknowledged, context.Cause(ctx))
		}
	}
	return w.results
}
