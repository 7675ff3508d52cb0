package dualwrite

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dimmer-dev/dimmer/flags"
)

// Reason says why a secondary write became a repair.
type Reason string

const (
	// ReasonError: the secondary write returned an error.
	ReasonError Reason = "error"
	// ReasonTimeout: the secondary write ran past its timeout.
	ReasonTimeout Reason = "timeout"
	// ReasonPanic: the secondary write panicked (recovered).
	ReasonPanic Reason = "panic"
	// ReasonShed: the async queue was full, the write never ran.
	ReasonShed Reason = "shed"
	// ReasonBreakerOpen: the secondary side's circuit breaker refused the write.
	ReasonBreakerOpen Reason = "breaker_open"
	// ReasonClosed: the writer was shut down, the write never ran.
	ReasonClosed Reason = "closed"
	// ReasonTx: the write went through [Writer.WriteTx]; the intent was
	// recorded in the caller's transaction and the secondary side is brought
	// up to date by the [Repairer] after commit.
	ReasonTx Reason = "tx"
	// ReasonStageUnavailable: the stage could not be evaluated and the
	// write was routed by the fallback stage, which writes one side only.
	// The real stage may write both: the [Repairer] finds out once the flag
	// is back (and skips the repair if it writes one side indeed).
	ReasonStageUnavailable Reason = "stage_unavailable"
)

// Repair says that one key of one migration may differ between the sides and
// must be brought in line from the authoritative side. It carries no payload
// on purpose: the [Repairer] re-reads the current authoritative state, so a
// stale operation is never replayed over a newer one.
type Repair struct {
	Migration string `json:"migration"`
	Key       string `json:"key"`
	// Stage and Side: the stage the write ran in and the side that missed it.
	Stage  flags.Stage `json:"stage"`
	Side   flags.Side  `json:"side"`
	Reason Reason      `json:"reason"`
	// Err is the secondary's error text, if any.
	Err string    `json:"err,omitempty"`
	At  time.Time `json:"at"`
}

// String names the repair for logs.
func (r Repair) String() string {
	return fmt.Sprintf("%s/%s (side %s, %s)", r.Migration, r.Key, r.Side, r.Reason)
}

type repairJSON struct {
	Migration string    `json:"migration"`
	Key       string    `json:"key"`
	Stage     string    `json:"stage"`
	Side      string    `json:"side"`
	Reason    Reason    `json:"reason"`
	Err       string    `json:"err,omitempty"`
	At        time.Time `json:"at"`
}

// MarshalJSON encodes sides and stages by name, so the payload stays
// readable in the outbox and in dead letters.
func (r Repair) MarshalJSON() ([]byte, error) {
	return json.Marshal(repairJSON{r.Migration, r.Key, r.Stage.String(), r.Side.String(), r.Reason, r.Err, r.At})
}

// UnmarshalJSON decodes what MarshalJSON wrote, naming the bad field.
func (r *Repair) UnmarshalJSON(b []byte) error {
	var j repairJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return fmt.Errorf("dualwrite: decode repair: %w", err)
	}
	st, err := flags.ParseStage(j.Stage)
	if err != nil {
		return fmt.Errorf("dualwrite: decode repair: stage: %w", err)
	}
	var side flags.Side
	switch j.Side {
	case "old":
		side = flags.Old
	case "new":
		side = flags.New
	default:
		return fmt.Errorf("dualwrite: decode repair: side %q is neither old nor new", j.Side)
	}
	if j.Migration == "" || j.Key == "" {
		return errors.New("dualwrite: decode repair: migration and key are required")
	}
	*r = Repair{Migration: j.Migration, Key: j.Key, Stage: st, Side: side, Reason: j.Reason, Err: j.Err, At: j.At}
	return nil
}

// RepairLog is where repairs go: durable, because a repair that is lost is a
// silent divergence. [OutboxRepairLog] is the durable implementation.
type RepairLog interface {
	Record(ctx context.Context, r Repair) error
}

// TxRepairLog is a RepairLog that can also write inside the caller's
// transaction, so the repair intent commits or rolls back with the
// authoritative write ([Writer.WriteTx]).
type TxRepairLog interface {
	RepairLog
	RecordTx(ctx context.Context, tx pgx.Tx, r Repair) error
}

// RepairLogFunc adapts a function to RepairLog.
type RepairLogFunc func(ctx context.Context, r Repair) error

// Record calls f.
func (f RepairLogFunc) Record(ctx context.Context, r Repair) error { return f(ctx, r) }
