package main

import (
	"bytes"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/dimmer-dev/dimmer/examples/events/eventsvc"
	"github.com/dimmer-dev/dimmer/flags"
)

// The events part of the report fails the demo on each broken invariant,
// naming it, and passes a clean move.
func TestValidateEvents(t *testing.T) {
	t.Parallel()
	clean := func() *eventsvc.Report {
		return &eventsvc.Report{Produced: 100, Consumed: 100, Cutovers: 3,
			Moves: []eventsvc.Move{{To: flags.New, Keys: 40, Resumed: 40, Pause: 20 * time.Millisecond},
				{To: flags.Old, Keys: 40, Resumed: 40}, {To: flags.New, Keys: 40, Resumed: 40}},
			Steps: []eventsvc.Step{{Stage: flags.Live, Why: "consumers move to new first", GroupOn: flags.New, Lag: 3, Produced: 50, Consumed: 47}}}
	}
	rep := &report{Events: clean()}
	validateEvents(rep)
	assert.Empty(t, rep.Failures)
	var out bytes.Buffer
	printEvents(&out, rep.Events)
	assert.Contains(t, out.String(), "   events cutover 1 to new                    skipped 0, processed twice 0; 40 of 40 customers resumed at their next event; pause 20ms\n")
	assert.Contains(t, out.String(), "   events lag at live                         3 (group on new); produced 50, consumed 47; skipped 0, processed twice 0; consumers move to new first\n")

	for name, c := range map[string]struct {
		broke func(*eventsvc.Report)
		want  string
	}{
		"not run":         {func(*eventsvc.Report) {}, "events: the topic move did not run"},
		"consumed fewer":  {func(r *eventsvc.Report) { r.Consumed = 99 }, "events: 99 events consumed of 100 produced"},
		"skipped":         {func(r *eventsvc.Report) { r.Skipped = 1 }, "events: 1 events skipped"},
		"twice":           {func(r *eventsvc.Report) { r.ProcessedTwice = 2 }, "events: 2 events processed twice"},
		"disorder":        {func(r *eventsvc.Report) { r.Disorder = 1 }, "events: 1 per-key order violations"},
		"twice at move":   {func(r *eventsvc.Report) { r.Moves[1].ProcessedTwice = 1 }, "events: move 2 to old: 1 events processed twice"},
		"skipped at move": {func(r *eventsvc.Report) { r.Moves[2].Skipped = 4 }, "events: move 3 to new: 4 events skipped"},
		"not resumed":     {func(r *eventsvc.Report) { r.Moves[0].Resumed = 39 }, "events: move 1 to new: 39 of 40 customers resumed at their next event"},
		"no rollback":     {func(r *eventsvc.Report) { r.Moves = r.Moves[:1] }, "events: the consumer moved to new 1 times and back 0 times"},
		"twice at step":   {func(r *eventsvc.Report) { r.Steps[0].ProcessedTwice = 1 }, "events: at live (consumers move to new first): 0 skipped, 1 processed twice"},
	} {
		rep := &report{Events: clean()}
		if name == "not run" {
			rep.Events = nil
		} else {
			c.broke(rep.Events)
		}
		validateEvents(rep)
		if assert.Len(t, rep.Failures, 1, name) {
			assert.Contains(t, rep.Failures[0], c.want, name)
		}
	}
}
