package console

import (
	"context"
	"fmt"

	"github.com/dimmer-dev/dimmer/flags"
)

// timelineCache is the last timeline built for a migration and the newest
// audit entry it was built from. The audit log only grows at its head, so
// while the newest entry is the same, so is the whole timeline: a page
// refresh then reads one entry instead of a hundred (each with its checks,
// the bulk of a data request on a long game day).
type timelineCache struct {
	newest flags.AuditEntry
	audit  []flags.AuditEntry
	events []Event
}

func sameEntry(a, b flags.AuditEntry) bool {
	return a.At.Equal(b.At) && a.Actor == b.Actor && a.Reason == b.Reason && a.Outcome == b.Outcome &&
		a.Revision == b.Revision && a.From == b.From && a.To == b.To && a.Forced == b.Forced && len(a.Checks) == len(b.Checks)
}

// timeline returns the newest audit entries of the migration (newest
// first, at most the timeline limit) and their events. Both are shared
// between requests: callers only read them.
func (s *Server) timeline(ctx context.Context, name string) ([]flags.AuditEntry, []Event, error) {
	head, err := s.store.Audit(ctx, name, 1)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: audit: %w", name, err)
	}
	if len(head) == 0 {
		return nil, []Event{}, nil
	}
	s.tlMu.Lock()
	c := s.tl[name]
	s.tlMu.Unlock()
	if c != nil && sameEntry(c.newest, head[0]) {
		return c.audit, c.events, nil
	}
	audit, err := s.store.Audit(ctx, name, s.timelineLimit)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: audit: %w", name, err)
	}
	events := make([]Event, 0, len(audit))
	for _, e := range audit {
		ev := Event{AuditEntry: e, Automatic: s.automatic(e)}
		for _, c := range e.Checks {
			if !c.Passed {
				ev.Failed = append(ev.Failed, c)
			}
		}
		events = append(events, ev)
	}
	if len(audit) > 0 {
		s.tlMu.Lock()
		s.tl[name] = &timelineCache{newest: audit[0], audit: audit, events: events}
		s.tlMu.Unlock()
	}
	return audit, events, nil
}
