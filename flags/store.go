package flags

import (
	"context"
	"encoding/json"
	"fmt"
	"time"
	"unicode/utf8"
)

// Store holds the stage flags, their audit log and the fleet registry. The
// controller and the CLI write through it; providers read the same data. The
// Postgres implementation is in package pgflags, the Redis one in redisflags.
type Store interface {
	// Load returns the migration's state. A migration never set is not an
	// error: it reads as State{Migration: name, Stage: Off, Revision: 0}. A
	// stored document that does not decode is an error wrapping a
	// *CorruptFlagError.
	Load(ctx context.Context, migration string) (State, error)
	// Swap stores next if the stored revision still equals expectRevision,
	// setting next.Revision to expectRevision+1, and appends entry to the
	// audit log in the same atomic step. A different stored revision is a
	// *ConflictError.
	Swap(ctx context.Context, expectRevision int64, next State, entry AuditEntry) (State, error)
	// Migrations lists every migration that was ever set. Corrupt stored
	// documents are reported as *CorruptFlagError in the error (joined,
	// one per migration) while every other migration is still returned.
	Migrations(ctx context.Context) ([]State, error)
	// AppendAudit records an entry that changed nothing (a refusal).
	AppendAudit(ctx context.Context, entry AuditEntry) error
	// Audit returns the migration's newest entries first, at most limit
	// (limit <= 0: all).
	Audit(ctx context.Context, migration string, limit int) ([]AuditEntry, error)
}

// MaxText is the most bytes of free text (a reason, an actor, a corrupt
// document quoted in an audit entry) the controller accepts or records: an
// audit log is read by people, and a runaway value must not fill the store.
const MaxText = 1024

// CapText returns s cut to at most [MaxText] bytes (at a rune boundary),
// marked with "…" when cut.
func CapText(s string) string {
	if len(s) <= MaxText {
		return s
	}
	cut := MaxText - len("…")
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// Outcome of an audited transition request.
type Outcome string

const (
	Applied Outcome = "applied"
	Refused Outcome = "refused"
	// Unreadable marks a stored entry that does not decode (edited by
	// hand, cut short): [DecodeAuditEntry] keeps its place in the log.
	Unreadable Outcome = "unreadable"
)

// DecodeAuditEntry parses a stored audit entry of migration. One that does
// not decode is returned as an [Unreadable] entry quoting it, rather than
// an error: one bad entry must not hide the rest of the log.
func DecodeAuditEntry(migration string, doc []byte) AuditEntry {
	var e AuditEntry
	if err := json.Unmarshal(doc, &e); err != nil {
		return AuditEntry{Migration: migration, Outcome: Unreadable,
			Reason: CapText(fmt.Sprintf("the stored entry does not decode (%v): %s", err, doc))}
	}
	return e
}

// AuditEntry is one transition request: who asked, when, from what to what,
// why, what the guards said and whether it was applied.
type AuditEntry struct {
	Migration string        `json:"migration"`
	At        time.Time     `json:"at"`
	Actor     string        `json:"actor"`
	From      string        `json:"from"`
	To        string        `json:"to"`
	Reason    string        `json:"reason"`
	Forced    bool          `json:"forced,omitempty"`
	Outcome   Outcome       `json:"outcome"`
	Revision  int64         `json:"revision"`
	Checks    []CheckResult `json:"checks,omitempty"`
}

// Capped returns the entry with every free text cut to [MaxText] bytes
// (the stores apply it, so the audit log stays readable whoever writes).
func (e AuditEntry) Capped() AuditEntry {
	e.Actor, e.Reason, e.From, e.To = CapText(e.Actor), CapText(e.Reason), CapText(e.From), CapText(e.To)
	if len(e.Checks) > 0 {
		checks := make([]CheckResult, len(e.Checks))
		for i, c := range e.Checks {
			c.Name, c.Detail = CapText(c.Name), CapText(c.Detail)
			checks[i] = c
		}
		e.Checks = checks
	}
	return e
}

// CheckResult is one guard's verdict on a transition.
type CheckResult struct {
	Name   string `json:"name"`
	Passed bool   `json:"passed"`
	Detail string `json:"detail"`
}

// FleetStore is the fleet registry: live instances heartbeat into it and
// guards read it.
type FleetStore interface {
	// Heartbeat records the instance as alive until now+ttl.
	Heartbeat(ctx context.Context, inst Instance, ttl time.Duration) error
	// Instances returns the instances whose last heartbeat has not expired.
	Instances(ctx context.Context) ([]Instance, error)
	// Deregister removes an instance at shutdown.
	Deregister(ctx context.Context, id string) error
}

// Instance is one running service process as it reports itself.
type Instance struct {
	ID    string `json:"id"`
	Build string `json:"build"`
	// Applied maps a migration to the flag revision the instance evaluates.
	Applied map[string]int64 `json:"applied"`
	// Attributes carry what other packages publish (expandcontract: the
	// schema stages a build can run with).
	Attributes map[string]string `json:"attributes,omitempty"`
	StartedAt  time.Time         `json:"started_at"`
	SeenAt     time.Time         `json:"seen_at"`
}

// Swapped is what a [Store] implementation writes for one Swap: the next
// state with its revision and time filled in, and both documents encoded.
type Swapped struct {
	State    State
	Doc      []byte // the flag document
	EntryDoc []byte // the audit entry
}

// PrepareSwap does the part of Swap every store shares: it validates next,
// sets its revision to expectRevision+1, completes the audit entry
// (migration, time, outcome, revision) and refuses an entry that names
// another migration.
//
// Who and when of the stored state are always this change's: UpdatedBy is
// the entry's actor and UpdatedAt the entry's time (now when unset), never
// what a state copied from an earlier Load carried — a copy of the
// watchdog's rollback would otherwise keep its cooldown alive.
func PrepareSwap(expectRevision int64, next State, entry AuditEntry) (Swapped, error) {
	if err := next.Validate(); err != nil {
		return Swapped{}, err
	}
	m := next.Migration
	if entry.Migration == "" {
		entry.Migration = m
	}
	if entry.Migration != m {
		return Swapped{}, fmt.Errorf("%s: audit entry is for migration %q", m, entry.Migration)
	}
	next.Revision = expectRevision + 1
	if entry.At.IsZero() {
		entry.At = time.Now().UTC()
	}
	next.UpdatedAt = entry.At
	next.UpdatedBy = entry.Actor
	if entry.Outcome == "" {
		entry.Outcome = Applied
	}
	if entry.Revision == 0 {
		entry.Revision = next.Revision
	}
	doc, err := next.Encode()
	if err != nil {
		return Swapped{}, err
	}
	entryDoc, err := json.Marshal(entry.Capped())
	if err != nil {
		return Swapped{}, fmt.Errorf("%s: encode audit entry: %w", m, err)
	}
	return Swapped{State: next, Doc: doc, EntryDoc: entryDoc}, nil
}
