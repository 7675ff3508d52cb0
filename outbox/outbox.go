package outbox

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Defaults for [Config].
const (
	DefaultSchema     = "dimmer"
	DefaultTable      = "outbox"
	DefaultBuckets    = 64
	DefaultMaxPayload = 1 << 20
	// MaxBuckets bounds Config.Buckets: a bucket is the unit a relay leases.
	MaxBuckets = 4096
	// MaxPartitions bounds Config.Partitions: installing a partition takes
	// locks on it and its indexes until the install commits, and 4096
	// partitions ran a default server (max_locks_per_transaction 64) out
	// of shared memory. It is far more relays than one table serves.
	MaxPartitions = 256
)

// Sentinel errors callers branch on.
var (
	// ErrInvalidMessage: the message was refused and nothing was written.
	ErrInvalidMessage = errors.New("outbox: invalid message")
	// ErrInvalidConfig: a Config or RelayConfig field is out of range.
	ErrInvalidConfig = errors.New("outbox: invalid config")
	// ErrSchemaMismatch: the installed schema disagrees with the Config
	// (another bucket count or partition count) or is newer than this code.
	ErrSchemaMismatch = errors.New("outbox: installed schema does not match")
	// ErrRecordTooLarge: the message as a whole (payload, key, headers and
	// the broker's per-record overhead) is larger than the publisher's
	// broker accepts (Config.RecordLimit). It comes as a
	// [*RecordTooLargeError], which also matches [ErrInvalidMessage];
	// nothing was written.
	ErrRecordTooLarge = errors.New("outbox: record too large for the broker")
	// ErrNotDead: the dead-letter operation named a message that is not a
	// dead letter (delivered, pending, or unknown).
	ErrNotDead = errors.New("outbox: no such dead letter")
)

// FieldError names the field of a Message or a config that was refused.
type FieldError struct {
	Field  string
	Reason string
	kind   error
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("%v: %s %s", e.kind, e.Field, e.Reason)
}

func (e *FieldError) Unwrap() error { return e.kind }

func badMessage(field, format string, args ...any) error {
	return &FieldError{Field: field, Reason: fmt.Sprintf(format, args...), kind: ErrInvalidMessage}
}

func badConfig(field, format string, args ...any) error {
	return &FieldError{Field: field, Reason: fmt.Sprintf(format, args...), kind: ErrInvalidConfig}
}

// RecordTooLargeError details an [ErrRecordTooLarge] refusal.
type RecordTooLargeError struct {
	Topic, Key string
	// Bytes is the record's size as the broker counts it; Limit the most
	// it accepts.
	Bytes, Limit int
}

func (e *RecordTooLargeError) Error() string {
	return fmt.Sprintf("%v: the message to topic %q (key %q) takes %d bytes as a record, over the broker's limit of %d (payload, key, headers and record overhead all count)",
		ErrRecordTooLarge, e.Topic, truncateKey(e.Key), e.Bytes, e.Limit)
}

// Unwrap makes the error match both [ErrRecordTooLarge] and
// [ErrInvalidMessage].
func (e *RecordTooLargeError) Unwrap() []error { return []error{ErrRecordTooLarge, ErrInvalidMessage} }

func truncateKey(k string) string {
	if len(k) > 64 {
		return k[:64] + "…"
	}
	return k
}

// RecordLimit is what a publisher can say about the records its broker
// accepts; kafkasink.Publisher implements it. Set as Config.RecordLimit, it
// makes Enqueue refuse a message the broker would refuse, instead of the
// relay dead-lettering it later (where it would hold back its key).
type RecordLimit interface {
	// MaxRecordBytes is the largest record the broker accepts, in bytes.
	MaxRecordBytes() int
	// RecordBytes is m's size as one record, counted as MaxRecordBytes
	// counts (key, value, headers the publisher adds, framing).
	RecordBytes(m Message) int
}

// Message is one record to publish. The same type serves as a durable repair
// log entry for dualwrite: a failed secondary write is enqueued on a topic of
// its own (e.g. "dimmer.repair.<migration>") keyed by the entity key, so the
// repairs of one entity replay in the order they were recorded.
type Message struct {
	// ID identifies the message end to end (consumers de-duplicate on it,
	// see package inbox). Zero means: generate a UUIDv7.
	ID uuid.UUID
	// Topic is the Kafka topic or stream name the message goes to. Required.
	Topic string
	// Key orders messages: messages with the same non-empty Key are
	// published in the order their transactions committed. It is also the
	// Kafka record key. Empty means no key and no order.
	Key string
	// Payload is the message body, at most Config.MaxPayload bytes.
	Payload []byte
	// Headers travel with the message (Kafka headers, stream fields).
	Headers map[string]string
}

// Config names where the outbox lives and how it is shaped.
type Config struct {
	// Schema and Table name the message table; the package also owns
	// <Table>_leases, <Table>_relays and <Table>_meta in the same schema.
	// Defaults: "dimmer", "outbox".
	Schema string
	Table  string
	// Buckets is the number of key buckets relays lease. Fixed at install:
	// a key's bucket must never change while it has pending messages.
	// Default 64; it caps how many relays can share the work.
	Buckets int
	// Partitions splits the table into this many partitions, each holding
	// an equal range of the buckets (Buckets must be a multiple of it), so
	// relays leasing different ranges write and read different heap pages.
	// On one table, every relay passes over the others' rows and prunes the
	// pages they delete from: on 2 cores, 4 relays spent twice the
	// database CPU per message one relay did, and over 4 separate tables
	// one relay's; on 4 partitions their drain rate grew with them. Set
	// it to the number of relays a service expects to run, and give each
	// relay a stable RelayConfig.ID: a relay's range follows its ID's
	// rank, so a relay back under a new ID moves the others' ranges. 1
	// (the default) is one plain table, the faster layout for a single
	// relay. At most MaxPartitions; fixed at install, like Buckets. Unlike
	// a plain table, a partitioned one refuses a row edited to a bucket
	// outside 0..Buckets-1.
	Partitions int
	// MaxPayload is the largest payload Enqueue accepts, in bytes. Default 1 MiB.
	MaxPayload int
	// RecordLimit, when set, is asked about every message at Enqueue: one
	// larger as a whole than the broker accepts is refused with
	// [ErrRecordTooLarge]. Set it to the publisher the relays use (for
	// Kafka: the kafkasink.Publisher), since only the publisher knows how
	// its records are framed. Nil: only MaxPayload is checked.
	RecordLimit RecordLimit
	// NoNotify turns off the NOTIFY Enqueue sends (relays then rely on
	// polling). One NOTIFY per transaction (PostgreSQL folds repeats) was
	// measured at no visible cost for a single writer; but PostgreSQL
	// serialises the commits of notifying transactions on one lock, so at
	// very high write concurrency set NoNotify and a short
	// RelayConfig.PollInterval instead.
	NoNotify bool
}

func (c *Config) withDefaults() {
	if c.Schema == "" {
		c.Schema = DefaultSchema
	}
	if c.Table == "" {
		c.Table = DefaultTable
	}
	if c.Buckets == 0 {
		c.Buckets = DefaultBuckets
	}
	if c.MaxPayload == 0 {
		c.MaxPayload = DefaultMaxPayload
	}
	if c.Partitions == 0 {
		c.Partitions = 1
	}
}

// Validate reports the first field out of range.
func (c Config) Validate() error {
	if c.Schema == "" || len(c.Schema) > 63 {
		return badConfig("Schema", "must be 1..63 bytes, got %q", c.Schema)
	}
	// The longest owned name is <Table>_leases / _relays.
	if c.Table == "" || len(c.Table) > 56 {
		return badConfig("Table", "must be 1..56 bytes, got %q", c.Table)
	}
	if strings.ContainsRune(c.Schema+c.Table, 0) {
		return badConfig("Table", "must not contain NUL")
	}
	if c.Buckets < 1 || c.Buckets > MaxBuckets {
		return badConfig("Buckets", "must be 1..%d, got %d", MaxBuckets, c.Buckets)
	}
	if c.Partitions < 1 || c.Partitions > min(c.Buckets, MaxPartitions) || c.Buckets%c.Partitions != 0 {
		return badConfig("Partitions", "must be 1..%d and divide Buckets (%d) evenly, got %d", min(c.Buckets, MaxPartitions), c.Buckets, c.Partitions)
	}
	if c.MaxPayload < 1 {
		return badConfig("MaxPayload", "must be positive, got %d", c.MaxPayload)
	}
	return nil
}

// Outbox is a handle on one installed outbox table. It is safe for
// concurrent use and holds no connections.
type Outbox struct {
	cfg     Config
	table   string // quoted schema.table
	leases  string
	relays  string
	meta    string
	channel string // NOTIFY channel, raw
	lockNS  int32  // advisory lock class for this table

	insertKeyed, insertKeyless string
}

// New validates cfg (after defaults) and returns a handle. It does not touch
// the database: call [Outbox.Install] once (it is idempotent).
func New(cfg Config) (*Outbox, error) {
	cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	q := func(name string) string { return pgx.Identifier{cfg.Schema, name}.Sanitize() }
	h := fnv.New64a()
	h.Write([]byte(cfg.Schema + "\x00" + cfg.Table))
	sum := h.Sum64()
	o := &Outbox{
		cfg:     cfg,
		table:   q(cfg.Table),
		leases:  q(cfg.Table + "_leases"),
		relays:  q(cfg.Table + "_relays"),
		meta:    q(cfg.Table + "_meta"),
		channel: fmt.Sprintf("dimmer_outbox_%016x", sum),
		lockNS:  int32(uint32(sum)),
	}
	notify := ", pg_notify($8, '')"
	if cfg.NoNotify {
		notify = ", $8::text"
	}
	// The advisory lock runs in a MATERIALIZED CTE so it is taken before the
	// identity default draws seq: same-key writers therefore draw seq in the
	// order they commit (the lock is held to commit), which is what lets the
	// relay publish per key by seq. See doc.go.
	// The shared stripe lock (class $10) is what lets EnqueueBatch lock
	// many keys at once with a bounded number of locks; see batch.go.
	o.insertKeyed = `WITH l AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared($10::int4, $9::int4 & ` + stripeMask + `),
	pg_advisory_xact_lock($7::int4, $9::int4)` + notify + `)
INSERT INTO ` + o.table + ` (id, bucket, lane, key, topic, payload, headers)
SELECT $1, $2, $3, $3, $4, $5, $6 FROM l`
	o.insertKeyless = `WITH l AS MATERIALIZED (SELECT $7::int4, $9::int4` + notify + `)
INSERT INTO ` + o.table + ` (id, bucket, lane, key, topic, payload, headers)
SELECT $1, $2, $3, NULL, $4, $5, $6 FROM l`
	return o, nil
}

// Config returns the configuration in effect (defaults filled in).
func (o *Outbox) Config() Config { return o.cfg }

// Channel is the LISTEN/NOTIFY channel relays wait on.
func (o *Outbox) Channel() string { return o.channel }

// Bucket returns the bucket of an ordering key: xxhash64 (XXH64, seed 0) of
// the key's UTF-8 bytes, modulo Config.Buckets. A keyless message gets a
// lane of its own ("\x01" + its ID) and is bucketed by that string.
func (o *Outbox) Bucket(key string) int {
	return int(xxhash.Sum64String(key) % uint64(o.cfg.Buckets))
}

// Execer runs statements: *pgxpool.Pool, *pgx.Conn and pgx.Tx all are.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Enqueue writes m in the caller's transaction: it is published if and only
// if tx commits. It returns the message ID (generated when m.ID is zero).
// A refused message is an error wrapping [ErrInvalidMessage] (a
// [*FieldError]) and writes nothing.
//
// Enqueue of a keyed message holds a transaction-scoped lock on the key
// until tx ends, so concurrent transactions writing the same key serialise
// (that is the price of per-key commit order; unrelated keys never wait).
// Transactions enqueueing several keys should do so in a consistent key
// order, or be ready to retry a deadlock error.
func (o *Outbox) Enqueue(ctx context.Context, tx pgx.Tx, m Message) (uuid.UUID, error) {
	if tx == nil {
		return uuid.Nil, badMessage("tx", "is nil: Enqueue must run inside the caller's transaction (use EnqueuePool outside one)")
	}
	return o.enqueue(ctx, tx, m)
}

// EnqueuePool writes m outside any caller transaction, in a transaction of
// its own on pool (for repair records written after a failed operation).
func (o *Outbox) EnqueuePool(ctx context.Context, pool *pgxpool.Pool, m Message) (uuid.UUID, error) {
	if pool == nil {
		return uuid.Nil, badMessage("pool", "is nil")
	}
	return o.enqueue(ctx, pool, m)
}

// Enqueuer is what writes into an outbox; [*Outbox] bound to a transaction
// or a pool. Consumers such as dualwrite define their own narrow interface;
// this one documents the shape.
type Enqueuer interface {
	Enqueue(ctx context.Context, tx pgx.Tx, m Message) (uuid.UUID, error)
	EnqueuePool(ctx context.Context, pool *pgxpool.Pool, m Message) (uuid.UUID, error)
}

var _ Enqueuer = (*Outbox)(nil)

func (o *Outbox) validate(m *Message) error {
	if m.Topic == "" {
		return badMessage("Topic", "is empty")
	}
	if len(m.Topic) > 249 {
		return badMessage("Topic", "is %d bytes, the limit is 249", len(m.Topic))
	}
	if len(m.Payload) > o.cfg.MaxPayload {
		return badMessage("Payload", "is %d bytes, over the configured maximum of %d", len(m.Payload), o.cfg.MaxPayload)
	}
	if strings.ContainsRune(m.Key, 0) || strings.ContainsRune(m.Topic, 0) {
		return badMessage("Key", "must not contain NUL bytes")
	}
	for k := range m.Headers {
		if k == "" {
			return badMessage("Headers", "has an empty name")
		}
	}
	if l := o.cfg.RecordLimit; l != nil {
		if n, limit := l.RecordBytes(*m), l.MaxRecordBytes(); n > limit {
			return &RecordTooLargeError{Topic: m.Topic, Key: m.Key, Bytes: n, Limit: limit}
		}
	}
	return nil
}

func (o *Outbox) enqueue(ctx context.Context, db Execer, m Message) (uuid.UUID, error) {
	if err := o.validate(&m); err != nil {
		return uuid.Nil, err
	}
	if m.ID == uuid.Nil {
		id, err := uuid.NewV7()
		if err != nil {
			return uuid.Nil, fmt.Errorf("outbox: generate id: %w", err)
		}
		m.ID = id
	}
	var headers any // NULL when absent
	if len(m.Headers) > 0 {
		headers = m.Headers
	}
	payload := m.Payload
	if payload == nil {
		payload = []byte{}
	}
	// As [16]byte, as in EnqueueBatch: pgx encodes that straight to uuid,
	// where a uuid.UUID first fails a formatted lookup and then goes
	// through its driver.Valuer.
	id := [16]byte(m.ID)
	var err error
	if m.Key == "" {
		lane := keylessLane(m.ID)
		_, err = db.Exec(ctx, o.insertKeyless, id, o.Bucket(lane), lane, m.Topic, payload, headers, o.lockNS, o.channel, int32(0))
	} else {
		_, err = db.Exec(ctx, o.insertKeyed, id, o.Bucket(m.Key), m.Key, m.Topic, payload, headers, o.lockNS, o.channel, keyLock(m.Key), o.lockNS+3)
	}
	if err != nil {
		return uuid.Nil, fmt.Errorf("outbox: enqueue to %s: %w", o.table, err)
	}
	return m.ID, nil
}

// keylessLane gives a keyless message a lane of its own, so it neither waits
// for nor holds up any other message. The NUL-free prefix cannot collide
// with a real key of the same form by accident in practice; if one does,
// the two are merely ordered together.
func keylessLane(id uuid.UUID) string { return "\x01" + id.String() }

func keyLock(key string) int32 {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], xxhash.Sum64String(key))
	return int32(binary.LittleEndian.Uint32(b[4:]))
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
