package console

import (
	"bytes"
	"context"
	"fmt"
	"html/template"
	"sync"

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

	// The rendered list, made by the first page that shows it: a hundred
	// entries with their checks are most of a page's rendering.
	htmlOnce sync.Once
	html     template.HTML
}

// timelineHTML is the timeline's list as the page shows it, rendered once
// per audit log head (by the same escaping templates as the rest).
func (s *Server) timelineHTML(c *timelineCache) template.HTML {
	if c == nil {
		return ""
	}
	c.htmlOnce.Do(func() {
		var b bytes.Buffer
		if err := s.tmpl.ExecuteTemplate(&b, "timeline-events", c.events); err != nil {
			s.logger.Error("console template failed", "template", "timeline-events", "err", err)
			c.html = `<p class="critical">the timeline could not be rendered (see the console's log)</p>`
			return
		}
		// The output of html/template: escaped there already.
		c.html = template.HTML(b.String())
	})
	return c.html
}

func sameEntry(a, b flags.AuditEntry) bool {
	return a.At.Equal(b.At) && a.Actor == b.Actor && a.Reason == b.Reason && a.Outcome == b.Outcome &&
		a.Revision == b.Revision && a.From == b.From && a.To == b.To && a.Forced == b.Forced && len(a.Checks) == len(b.Checks)
}

// timeline returns the newest audit entries of the migration (newest
// first, at most the timeline limit) and their events. The result is shared
// between requests: callers only read it.
func (s *Server) timeline(ctx context.Context, name string) (*timelineCache, error) {
	head, err := s.store.Audit(ctx, name, 1)
	if err != nil {
		return nil, fmt.Errorf("%s: audit: %w", name, err)
	}
	if len(head) == 0 {
		return &timelineCache{events: []Event{}}, nil
	}
	s.tlMu.Lock()
	c := s.tl[name]
	s.tlMu.Unlock()
	if c != nil && sameEntry(c.newest, head[0]) {
		return c, nil
	}
	audit, err := s.store.Audit(ctx, name, s.timelineLimit)
	if err != nil {
		return nil, fmt.Errorf("%s: audit: %w", name, err)
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
	c = &timelineCache{audit: audit, events: events}
	if len(audit) > 0 {
		c.newest = audit[0]
		s.tlMu.Lock()
		s.tl[name] = c
		s.tlMu.Unlock()
	}
	return c, nil
}
