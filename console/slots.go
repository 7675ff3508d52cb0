package console

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/dimmer-dev/dimmer/cdc"
)

// ReplicationSlots is what the console reads of change data capture: the
// replication slots package cdc registered. [CDCSlots] reads them from the
// source database.
type ReplicationSlots interface {
	Slots(ctx context.Context) ([]cdc.SlotStatus, error)
}

// SlotDB is the source database holding the slots: *pgxpool.Pool fits.
type SlotDB interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// CDCSlots reads the slots registered in schema (default "dimmer") of db,
// as `dimmer cdc status` does.
func CDCSlots(db SlotDB, schema string) ReplicationSlots { return cdcSlots{db, schema} }

type cdcSlots struct {
	db     SlotDB
	schema string
}

func (c cdcSlots) Slots(ctx context.Context) ([]cdc.SlotStatus, error) {
	return cdc.Slots(ctx, c.db, c.schema)
}

// WithSlots shows the replication slots of change data capture (reader,
// lag, retained WAL) on the overview and every migration page, with a
// critical alert for a slot retaining more than maxRetained bytes of WAL
// (0: no bound), one that lost WAL or is registered but gone, as
// [cdc.CheckSlots] and so `dimmer cdc status --max-retained` fail; a slot
// without a connected reader is a warning, its retained WAL only grows.
func WithSlots(r ReplicationSlots, maxRetained int64) Option {
	return func(s *Server) error {
		switch {
		case r == nil:
			return errors.New("WithSlots: nil")
		case maxRetained < 0:
			return fmt.Errorf("WithSlots: maxRetained %d: must not be negative", maxRetained)
		}
		s.slots, s.maxRetained = r, maxRetained
		return nil
	}
}

// SlotView is one replication slot as the pages show it.
type SlotView struct {
	Slot        string   `json:"slot"`
	Publication string   `json:"publication"`
	Purpose     string   `json:"purpose"`
	Tables      []string `json:"tables"`
	Exists      bool     `json:"exists"`
	Active      bool     `json:"active"`
	ActivePID   int32    `json:"active_pid,omitempty"`
	// LagBytes is WAL written since the reader's confirmed position;
	// RetainedBytes is WAL the server keeps for the slot.
	LagBytes      int64  `json:"lag_bytes"`
	RetainedBytes int64  `json:"retained_bytes"`
	WALStatus     string `json:"wal_status"`
	// Over: the slot retains more than the bound, lost WAL or is gone.
	Over bool `json:"over"`
}

// SlotsView is every registered slot and the bound they are held to.
type SlotsView struct {
	Slots       []SlotView `json:"slots"`
	MaxRetained int64      `json:"max_retained_bytes"`
	// Error says why the slots could not be read.
	Error string `json:"error,omitempty"`
}

// slotsView reads the slots; nil without [WithSlots].
func (s *Server) slotsView(ctx context.Context) *SlotsView {
	if s.slots == nil {
		return nil
	}
	v := &SlotsView{Slots: []SlotView{}, MaxRetained: s.maxRetained}
	st, err := s.slots.Slots(ctx)
	if err != nil {
		v.Error = err.Error()
		return v
	}
	for _, sl := range st {
		v.Slots = append(v.Slots, SlotView{
			Slot: sl.Slot, Publication: sl.Publication, Purpose: sl.Purpose, Tables: sl.Tables,
			Exists: sl.Exists, Active: sl.Active, ActivePID: sl.ActivePID,
			LagBytes: sl.LagBytes, RetainedBytes: sl.RetainedBytes, WALStatus: sl.WALStatus,
			Over: !sl.Exists || sl.WALStatus == "lost" || (s.maxRetained > 0 && sl.RetainedBytes > s.maxRetained),
		})
	}
	return v
}

// slotAlerts raises what cdc.CheckSlots fails on, and a warning for a slot
// nobody reads.
func slotAlerts(v *SlotsView) []Alert {
	if v == nil {
		return nil
	}
	if v.Error != "" {
		return []Alert{{"critical", "replication slots unreadable: " + v.Error}}
	}
	var out []Alert
	for _, sl := range v.Slots {
		switch {
		case !sl.Exists:
			out = append(out, Alert{"critical", fmt.Sprintf("replication slot %s is registered but does not exist", sl.Slot)})
		case sl.WALStatus == "lost":
			out = append(out, Alert{"critical", fmt.Sprintf("replication slot %s has lost WAL it needed: drop it and sync again", sl.Slot)})
		case v.MaxRetained > 0 && sl.RetainedBytes > v.MaxRetained:
			out = append(out, Alert{"critical", fmt.Sprintf("replication slot %s retains %s of WAL (bound %s; lag %s; reader %s)",
				sl.Slot, bytesText(sl.RetainedBytes), bytesText(v.MaxRetained), bytesText(sl.LagBytes), readerText(sl))})
		case !sl.Active:
			out = append(out, Alert{"warning", fmt.Sprintf("replication slot %s has no reader connected: it retains %s of WAL and keeps growing",
				sl.Slot, bytesText(sl.RetainedBytes))})
		}
	}
	return out
}

func readerText(sl SlotView) string {
	if sl.Active {
		return fmt.Sprintf("process %d", sl.ActivePID)
	}
	return "not connected"
}

func bytesText(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
