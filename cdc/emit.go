package cdc

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/outbox"
)

// DefaultPrefix is the logical decoding message prefix an [Emitter] writes
// and a [Relay] reads.
const DefaultPrefix = "dimmer.outbox"

// DefaultMaxPayload is the largest payload an [Emitter] accepts by default.
const DefaultMaxPayload = 1 << 20

// Emitter writes outbox messages into the write-ahead log as transactional
// logical decoding messages (pg_logical_emit_message): a message is decoded
// if and only if the caller's transaction commits, in commit order, and
// nothing is stored in a table (no rows to delete, no vacuum). A [Relay]
// reads them from a replication slot.
//
// Emitter is an [outbox.Enqueuer], so it can stand in for an outbox table
// wherever one is written (dualwrite's repair log included).
type Emitter struct {
	prefix     string
	maxPayload int
}

var _ outbox.Enqueuer = (*Emitter)(nil)

// EmitterOption configures an [Emitter].
type EmitterOption func(*Emitter)

// WithPrefix sets the message prefix (default [DefaultPrefix]); a relay
// reads the prefix it is configured with and skips others.
func WithPrefix(p string) EmitterOption { return func(e *Emitter) { e.prefix = p } }

// WithMaxPayload bounds payloads (default [DefaultMaxPayload]).
func WithMaxPayload(n int) EmitterOption { return func(e *Emitter) { e.maxPayload = n } }

// NewEmitter returns an emitter. It does not touch the database.
func NewEmitter(opts ...EmitterOption) (*Emitter, error) {
	e := &Emitter{prefix: DefaultPrefix, maxPayload: DefaultMaxPayload}
	for _, o := range opts {
		o(e)
	}
	if e.prefix == "" || strings.ContainsRune(e.prefix, 0) {
		return nil, badConfig("Prefix", "must be non-empty and free of NUL, got %q", e.prefix)
	}
	if e.maxPayload < 1 {
		return nil, badConfig("MaxPayload", "must be positive, got %d", e.maxPayload)
	}
	return e, nil
}

// Prefix is the message prefix written.
func (e *Emitter) Prefix() string { return e.prefix }

type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Enqueue writes m in the caller's transaction: it is relayed if and only
// if tx commits. It returns the message ID (a UUIDv7 when m.ID is zero). A
// refused message is an error wrapping [ErrInvalidMessage] and writes
// nothing. Unlike the table outbox it takes no lock: the log orders
// same-key messages by commit on its own.
func (e *Emitter) Enqueue(ctx context.Context, tx pgx.Tx, m outbox.Message) (uuid.UUID, error) {
	if tx == nil {
		return uuid.Nil, badMessage("tx", "is nil: Enqueue must run inside the caller's transaction (use EnqueuePool outside one)")
	}
	return e.emit(ctx, tx, m)
}

// EnqueuePool writes m in a transaction of its own on pool.
func (e *Emitter) EnqueuePool(ctx context.Context, pool *pgxpool.Pool, m outbox.Message) (uuid.UUID, error) {
	if pool == nil {
		return uuid.Nil, badMessage("pool", "is nil")
	}
	return e.emit(ctx, pool, m)
}

// EnqueueBatch writes ms in the caller's transaction, in order, and
// returns their IDs. Nothing is written if one is refused. The messages are
// packed into as few log records as fit in about 256 KiB each: a WAL sender
// sends each decoded record as a message of its own, so packing is what
// lets a relay drain bulk writes quickly.
func (e *Emitter) EnqueueBatch(ctx context.Context, tx pgx.Tx, ms []outbox.Message) ([]uuid.UUID, error) {
	if tx == nil {
		return nil, badMessage("tx", "is nil: EnqueueBatch must run inside the caller's transaction")
	}
	ids := make([]uuid.UUID, len(ms))
	var frames [][]byte
	var frame []byte
	var inFrame int
	flush := func() {
		if inFrame > 0 {
			frames = append(frames, packFrame(frame, inFrame))
		}
		frame, inFrame = nil, 0
	}
	for i := range ms {
		m := ms[i]
		if err := e.validate(&m); err != nil {
			return nil, fmt.Errorf("message %d: %w", i, err)
		}
		if m.ID == uuid.Nil {
			id, err := uuid.NewV7()
			if err != nil {
				return nil, fmt.Errorf("cdc: generate id: %w", err)
			}
			m.ID = id
		}
		ids[i] = m.ID
		enc := encodeMessage(m)
		if len(frame)+len(enc) > frameTarget {
			flush()
		}
		frame = binary.AppendUvarint(frame, uint64(len(enc)))
		frame = append(frame, enc...)
		inFrame++
	}
	flush()
	// unnest yields the array in order, and the records are emitted row
	// by row as it does.
	if _, err := tx.Exec(ctx, `SELECT count(pg_logical_emit_message(true, $1::text, m)) FROM unnest($2::bytea[]) AS m`, e.prefix, frames); err != nil {
		return nil, fmt.Errorf("cdc: emit %d messages (prefix %s): %w", len(ms), e.prefix, err)
	}
	return ids, nil
}

const frameTarget = 256 << 10

func (e *Emitter) emit(ctx context.Context, db execer, m outbox.Message) (uuid.UUID, error) {
	if err := e.validate(&m); err != nil {
		return uuid.Nil, err
	}
	if m.ID == uuid.Nil {
		id, err := uuid.NewV7()
		if err != nil {
			return uuid.Nil, fmt.Errorf("cdc: generate id: %w", err)
		}
		m.ID = id
	}
	if _, err := db.Exec(ctx, `SELECT pg_logical_emit_message(true, $1::text, $2::bytea)`, e.prefix, encodeMessage(m)); err != nil {
		return uuid.Nil, fmt.Errorf("cdc: emit message (prefix %s): %w", e.prefix, err)
	}
	return m.ID, nil
}

func (e *Emitter) validate(m *outbox.Message) error {
	switch {
	case m.Topic == "":
		return badMessage("Topic", "is empty")
	case len(m.Topic) > 249:
		return badMessage("Topic", "is %d bytes, the limit is 249", len(m.Topic))
	case len(m.Payload) > e.maxPayload:
		return badMessage("Payload", "is %d bytes, over the configured maximum of %d", len(m.Payload), e.maxPayload)
	}
	for k := range m.Headers {
		if k == "" {
			return badMessage("Headers", "has an empty name")
		}
	}
	return nil
}

const (
	encodingV1    = 1 // one message
	encodingFrame = 2 // uvarint count, then per message uvarint length + a V1 message
)

func packFrame(body []byte, n int) []byte {
	out := make([]byte, 0, 1+binary.MaxVarintLen64+len(body))
	out = append(out, encodingFrame)
	out = binary.AppendUvarint(out, uint64(n))
	return append(out, body...)
}

// decodeRecord decodes the content of one logical decoding message: one
// outbox message or a frame of them.
func decodeRecord(b []byte) ([]outbox.Message, error) {
	if len(b) == 0 || b[0] != encodingFrame {
		m, err := decodeMessage(b)
		if err != nil {
			return nil, err
		}
		return []outbox.Message{m}, nil
	}
	b = b[1:]
	n, w := binary.Uvarint(b)
	if w <= 0 || n > uint64(len(b)) {
		return nil, fmt.Errorf("%w: frame count", errBadEncoding)
	}
	b = b[w:]
	out := make([]outbox.Message, 0, n)
	for range n {
		l, w := binary.Uvarint(b)
		if w <= 0 || uint64(len(b)-w) < l {
			return nil, fmt.Errorf("%w: frame entry", errBadEncoding)
		}
		m, err := decodeMessage(b[w : w+int(l)])
		if err != nil {
			return nil, err
		}
		out = append(out, m)
		b = b[w+int(l):]
	}
	if len(b) != 0 {
		return nil, fmt.Errorf("%w: %d bytes after the frame", errBadEncoding, len(b))
	}
	return out, nil
}

// encodeMessage: version byte, 16-byte ID, then topic, key and headers as
// uvarint-length strings (headers preceded by their count, sorted by name),
// then the payload to the end.
func encodeMessage(m outbox.Message) []byte {
	n := 1 + 16 + 3*binary.MaxVarintLen64 + len(m.Topic) + len(m.Key) + len(m.Payload)
	for k, v := range m.Headers {
		n += 2*binary.MaxVarintLen64 + len(k) + len(v)
	}
	b := make([]byte, 0, n)
	b = append(b, encodingV1)
	b = append(b, m.ID[:]...)
	str := func(s string) {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	str(m.Topic)
	str(m.Key)
	names := make([]string, 0, len(m.Headers))
	for k := range m.Headers {
		names = append(names, k)
	}
	slices.Sort(names)
	b = binary.AppendUvarint(b, uint64(len(names)))
	for _, k := range names {
		str(k)
		str(m.Headers[k])
	}
	return append(b, m.Payload...)
}

var errBadEncoding = errors.New("cdc: malformed outbox message in the log")

func decodeMessage(b []byte) (outbox.Message, error) {
	var m outbox.Message
	if len(b) < 17 || b[0] != encodingV1 {
		return m, fmt.Errorf("%w: unknown encoding (first byte %v, %d bytes)", errBadEncoding, b[:min(1, len(b))], len(b))
	}
	copy(m.ID[:], b[1:17])
	b = b[17:]
	str := func() (string, bool) {
		n, w := binary.Uvarint(b)
		if w <= 0 || uint64(len(b)-w) < n {
			return "", false
		}
		s := string(b[w : w+int(n)])
		b = b[w+int(n):]
		return s, true
	}
	var ok bool
	if m.Topic, ok = str(); !ok {
		return m, fmt.Errorf("%w: topic", errBadEncoding)
	}
	if m.Key, ok = str(); !ok {
		return m, fmt.Errorf("%w: key", errBadEncoding)
	}
	count, w := binary.Uvarint(b)
	if w <= 0 || count > uint64(len(b)) {
		return m, fmt.Errorf("%w: headers", errBadEncoding)
	}
	b = b[w:]
	if count > 0 {
		m.Headers = make(map[string]string, count)
		for range count {
			k, ok1 := str()
			v, ok2 := str()
			if !ok1 || !ok2 {
				return m, fmt.Errorf("%w: header", errBadEncoding)
			}
			m.Headers[k] = v
		}
	}
	m.Payload = b
	return m, nil
}
