package cdc

import (
	"errors"
	"fmt"
)

// Sentinel errors callers branch on. Errors returned wrap one of them and
// name the slot, publication, table or setting concerned.
var (
	// ErrInvalidConfig: a config field is out of range (a [*FieldError]).
	ErrInvalidConfig = errors.New("cdc: invalid config")
	// ErrInvalidMessage: a message given to [Emitter] was refused; nothing
	// was written.
	ErrInvalidMessage = errors.New("cdc: invalid message")
	// ErrWalLevel: the server's wal_level is below logical.
	ErrWalLevel = errors.New("cdc: wal_level must be logical")
	// ErrSlotTaken: a replication slot of that name exists and is not one
	// dimmer created for this purpose (another plugin, database or owner).
	ErrSlotTaken = errors.New("cdc: replication slot name taken")
	// ErrPublicationTaken: a publication of that name exists and is not the
	// one registered with the slot.
	ErrPublicationTaken = errors.New("cdc: publication name taken")
	// ErrNoReplicaIdentity: a table has no primary key or other usable
	// REPLICA IDENTITY, so its updates and deletes cannot be keyed.
	ErrNoReplicaIdentity = errors.New("cdc: table has no usable replica identity")
	// ErrNoTable: a table named in the config does not exist.
	ErrNoTable = errors.New("cdc: no such table")
	// ErrNoSlot: the slot named does not exist (or is not registered).
	ErrNoSlot = errors.New("cdc: no such replication slot")
	// ErrPublicationMissingTable: the slot's publication does not publish a
	// table it is asked to stream.
	ErrPublicationMissingTable = errors.New("cdc: publication does not include the table")
	// ErrFenced: this reader lost the slot to another; it stopped
	// publishing.
	ErrFenced = errors.New("cdc: slot owned by another reader")
)

// FieldError names the config or message field that was refused.
type FieldError struct {
	Field  string
	Reason string
	kind   error
}

func (e *FieldError) Error() string { return fmt.Sprintf("%v: %s %s", e.kind, e.Field, e.Reason) }

func (e *FieldError) Unwrap() error { return e.kind }

func badConfig(field, format string, args ...any) error {
	return &FieldError{Field: field, Reason: fmt.Sprintf(format, args...), kind: ErrInvalidConfig}
}

func badMessage(field, format string, args ...any) error {
	return &FieldError{Field: field, Reason: fmt.Sprintf(format, args...), kind: ErrInvalidMessage}
}
