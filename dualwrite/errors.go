package dualwrite

import (
	"errors"
	"fmt"

	"github.com/dimmer-dev/dimmer/flags"
)

var (
	// ErrPanic: a user function panicked; the panic was recovered.
	ErrPanic = errors.New("dualwrite: user function panicked")
	// ErrClosed: the writer is shut down.
	ErrClosed = errors.New("dualwrite: writer closed")
	// ErrNoTxRepairLog: WriteTx was called but the repair log cannot write
	// inside a transaction.
	ErrNoTxRepairLog = errors.New("dualwrite: repair log cannot record inside a transaction")
)

// PanicError is a recovered panic of a user function.
type PanicError struct {
	Migration string
	Side      flags.Side
	Value     any
	Stack     []byte
}

func (e *PanicError) Error() string {
	return fmt.Sprintf("dualwrite: %s: %s write panicked: %v", e.Migration, e.Side, e.Value)
}

func (e *PanicError) Unwrap() error { return ErrPanic }
