package outbox

import (
	"context"
	"time"
)

// Record is a message as a relay hands it to a [Publisher].
type Record struct {
	Message
	// Seq is the outbox row's sequence number (per key, increasing in
	// commit order).
	Seq int64
	// CreatedAt is when the row was written (database clock).
	CreatedAt time.Time
	// Attempts counts earlier failed publish attempts.
	Attempts int
}

// Publisher sends a batch of records and reports, per record, whether the
// broker acknowledged it durably. The relay never puts two records with the
// same key in one batch, so a Publisher may send the whole batch at once.
//
// results[i] is the outcome of batch[i]: nil means acknowledged (the row is
// then deleted). A Publisher must return exactly len(batch) results and must
// not keep using a record after returning.
type Publisher interface {
	Publish(ctx context.Context, batch []Record) (results []error)
}

// PublisherFunc adapts a function to [Publisher].
type PublisherFunc func(ctx context.Context, batch []Record) []error

// Publish calls f.
func (f PublisherFunc) Publish(ctx context.Context, batch []Record) []error { return f(ctx, batch) }

var _ Publisher = PublisherFunc(nil)

// HeaderMessageID is the header (Kafka) or field (Redis Streams) the shipped
// publishers put the message ID in, for consumers' de-duplication.
const HeaderMessageID = "dimmer-message-id"
