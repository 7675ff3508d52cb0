package dualwrite

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/outbox"
)

// OutboxEnqueuer is the part of [*outbox.Outbox] the repair log uses.
type OutboxEnqueuer interface {
	Enqueue(ctx context.Context, tx pgx.Tx, m outbox.Message) (uuid.UUID, error)
	EnqueuePool(ctx context.Context, pool *pgxpool.Pool, m outbox.Message) (uuid.UUID, error)
}

var _ OutboxEnqueuer = (*outbox.Outbox)(nil)

// OutboxRepairLog is the durable [TxRepairLog]: each repair is an outbox
// message on topic, keyed by "<migration>/<key>" so the repairs of one
// entity are relayed in the order they were recorded, with the JSON of the
// [Repair] as payload ([DecodeRepair] reads it back for the [Repairer]).
type OutboxRepairLog struct {
	ob    OutboxEnqueuer
	pool  *pgxpool.Pool
	topic string
}

var _ TxRepairLog = (*OutboxRepairLog)(nil)

// NewOutboxRepairLog writes repairs to ob on topic: in the caller's
// transaction for [Writer.WriteTx], otherwise in a transaction of its own on
// pool.
func NewOutboxRepairLog(ob OutboxEnqueuer, pool *pgxpool.Pool, topic string) (*OutboxRepairLog, error) {
	switch {
	case ob == nil:
		return nil, errors.New("dualwrite.NewOutboxRepairLog: outbox is nil")
	case pool == nil:
		return nil, errors.New("dualwrite.NewOutboxRepairLog: pool is nil")
	case topic == "":
		return nil, errors.New("dualwrite.NewOutboxRepairLog: topic is empty")
	}
	return &OutboxRepairLog{ob: ob, pool: pool, topic: topic}, nil
}

func (l *OutboxRepairLog) message(r Repair) (outbox.Message, error) {
	b, err := json.Marshal(r)
	if err != nil {
		return outbox.Message{}, fmt.Errorf("dualwrite: encode repair %s: %w", r, err)
	}
	return outbox.Message{Topic: l.topic, Key: r.Migration + "/" + r.Key, Payload: b,
		Headers: map[string]string{"dimmer-migration": r.Migration, "dimmer-repair-reason": string(r.Reason)}}, nil
}

// Record enqueues r in a transaction of its own.
func (l *OutboxRepairLog) Record(ctx context.Context, r Repair) error {
	m, err := l.message(r)
	if err != nil {
		return err
	}
	if _, err := l.ob.EnqueuePool(ctx, l.pool, m); err != nil {
		return fmt.Errorf("dualwrite: enqueue repair %s: %w", r, err)
	}
	return nil
}

// RecordTx enqueues r in tx: it is relayed if and only if tx commits.
func (l *OutboxRepairLog) RecordTx(ctx context.Context, tx pgx.Tx, r Repair) error {
	m, err := l.message(r)
	if err != nil {
		return err
	}
	if _, err := l.ob.Enqueue(ctx, tx, m); err != nil {
		return fmt.Errorf("dualwrite: enqueue repair %s: %w", r, err)
	}
	return nil
}

// DecodeRepair reads a repair from an outbox payload; a bad payload is an
// error naming what is wrong with it.
func DecodeRepair(payload []byte) (Repair, error) {
	var r Repair
	// Called directly so malformed JSON gets the same "decode repair" prefix
	// as a bad field.
	err := r.UnmarshalJSON(payload)
	return r, err
}
