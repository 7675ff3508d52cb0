package console

import (
	"context"
	"errors"
	"fmt"
	"html/template"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/dimmer-dev/dimmer/flags"
)

// Sample is the fleet's published watchdog windows of one migration at one
// moment, per stage with any observation. The instances publish rolling
// windows, so a series of samples is the chart of those figures over time.
type Sample struct {
	At     time.Time     `json:"at"`
	Stages []StageHealth `json:"stages"`
}

// history is a ring of samples per migration.
type history struct {
	samples []Sample
	next    int
	full    bool
}

func (h *history) add(s Sample, capacity int) {
	if len(h.samples) < capacity {
		h.samples = append(h.samples, s)
		return
	}
	h.samples[h.next] = s
	h.next = (h.next + 1) % capacity
	h.full = true
}

// ordered returns the samples oldest first.
func (h *history) ordered() []Sample {
	if !h.full {
		return append([]Sample(nil), h.samples...)
	}
	return append(append([]Sample(nil), h.samples[h.next:]...), h.samples[:h.next]...)
}

// WithHistory sets how often the console samples the fleet's windows for
// its charts and how many samples it keeps per migration (default every 10s,
// 360 samples: an hour). The samples live in the console's memory and,
// with [WithSampleStore], in the store: the services only publish their
// current windows in the heartbeat, as they do for the guards, so charting
// adds nothing to their hot paths.
func WithHistory(every time.Duration, keep int) Option {
	return func(s *Server) error {
		if every < 10*time.Millisecond || keep < 2 {
			return fmt.Errorf("WithHistory(%v, %d): want an interval of at least 10ms and at least 2 samples", every, keep)
		}
		s.sampleEvery, s.sampleKeep = every, keep
		return nil
	}
}

// Run samples every migration's fleet windows for the charts until ctx
// ends. Pages also sample when they are requested, so Run only fills the
// charts while nobody is looking. With [WithChanges] it also passes the
// store's changes to the pages' event streams, and ends them when it
// returns (so a server's graceful shutdown does not wait on them).
func (s *Server) Run(ctx context.Context) error {
	if s.changes != nil {
		var wg sync.WaitGroup
		defer wg.Wait()
		wg.Go(func() { s.forwardChanges(ctx) })
	}
	t := time.NewTicker(s.sampleEvery)
	defer t.Stop()
	for {
		if err := s.SampleOnce(ctx); err != nil && ctx.Err() == nil {
			s.logger.Warn("console sampling failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// SampleOnce records a sample of every migration now.
func (s *Server) SampleOnce(ctx context.Context) error {
	all, _, err := s.migrations(ctx)
	if err != nil {
		return err
	}
	insts, err := s.fleet.Instances(ctx)
	if err != nil {
		return err
	}
	now := s.now().UTC()
	var errs []error
	for _, st := range all {
		name := st.Migration
		if err := s.seed(ctx, name); err != nil {
			errs = append(errs, err)
		}
		smp := Sample{At: now, Stages: healthOf(insts, name)}
		s.record(name, smp.Stages, now, true)
		if s.sampleStore != nil {
			if err := s.sampleStore.AddSample(ctx, name, smp, s.sampleEvery, s.sampleKeep); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// seed puts the samples the store holds for the migration before the ones
// this console took, once: a console started later draws the charts of
// the consoles before it.
func (s *Server) seed(ctx context.Context, name string) error {
	s.histMu.Lock()
	done := s.sampleStore == nil || s.seeded[name]
	s.histMu.Unlock()
	if done {
		return nil
	}
	stored, err := s.sampleStore.Samples(ctx, name, s.sampleKeep)
	if err != nil {
		return err
	}
	s.histMu.Lock()
	defer s.histMu.Unlock()
	if s.seeded[name] {
		return nil
	}
	s.seeded[name] = true
	var mine []Sample
	if h := s.hist[name]; h != nil {
		mine = h.ordered()
	}
	h := &history{}
	for _, smp := range stored {
		if len(mine) == 0 || smp.At.Before(mine[0].At) {
			h.add(smp, s.sampleKeep)
		}
	}
	for _, smp := range mine {
		h.add(smp, s.sampleKeep)
	}
	s.hist[name] = h
	return nil
}

func healthOf(insts []flags.Instance, name string) []StageHealth {
	out := []StageHealth{}
	for _, stage := range flags.Stages() {
		h, n := flags.FleetHealth(insts, name, stage)
		if n == 0 {
			continue
		}
		out = append(out, StageHealth{
			Stage: stage.String(), Reporting: n, Ops: h.Ops, Errors: h.Errors, ErrorRate: h.ErrorRate(),
			Compared: h.Compared, Lasting: h.Lasting, Transient: h.Mismatches - h.Lasting,
			Mismatch: h.MismatchRate(), P99: h.P99,
		})
	}
	return out
}

// record adds a sample unless the last one is younger than the interval
// (force: the sampler's tick, which always records).
func (s *Server) record(name string, stages []StageHealth, now time.Time, force bool) {
	s.histMu.Lock()
	defer s.histMu.Unlock()
	h := s.hist[name]
	if h == nil {
		h = &history{}
		s.hist[name] = h
	}
	if !force && len(h.samples) > 0 {
		last := h.samples[len(h.samples)-1]
		if h.full {
			last = h.samples[(h.next+len(h.samples)-1)%len(h.samples)]
		}
		if now.Sub(last.At) < s.sampleEvery {
			return
		}
	}
	h.add(Sample{At: now, Stages: stages}, s.sampleKeep)
}

func (s *Server) samples(name string) []Sample {
	s.histMu.Lock()
	defer s.histMu.Unlock()
	if h := s.hist[name]; h != nil {
		return h.ordered()
	}
	return []Sample{}
}

// Chart is one figure over time, drawn as an inline SVG by the page.
type chart struct {
	Title string
	Unit  string
	Max   string
	SVG   template.HTML
}

// charts draws the error rate, the mismatch rates and p99 of every stage in
// the samples. The SVG holds numbers and stage names only (stages are one
// of six constants), so it is safe to mark as HTML.
func charts(samples []Sample) []chart {
	if len(samples) < 2 {
		return nil
	}
	type series struct {
		class  string
		values []float64
	}
	figures := []struct {
		title, unit string
		value       func(StageHealth) float64
		transient   func(StageHealth) float64
	}{
		{"new-side error rate", "%", func(h StageHealth) float64 { return 100 * h.ErrorRate }, nil},
		{"mismatch rate (solid: lasting, dashed: transient)", "%", func(h StageHealth) float64 { return 100 * h.Mismatch },
			func(h StageHealth) float64 {
				if h.Compared == 0 {
					return 0
				}
				return 100 * float64(h.Transient) / float64(h.Compared)
			}},
		{"new-side p99", "ms", func(h StageHealth) float64 { return float64(h.P99) / float64(time.Millisecond) }, nil},
	}
	t0, t1 := samples[0].At, samples[len(samples)-1].At
	span := math.Max(float64(t1.Sub(t0)), 1)
	const w, h = 600.0, 120.0
	var out []chart
	for _, f := range figures {
		var all []series
		top := 0.0
		for _, stage := range flags.Stages() {
			name := stage.String()
			for _, kind := range []string{"", "transient"} {
				get := f.value
				if kind == "transient" {
					if f.transient == nil {
						continue
					}
					get = f.transient
				}
				vals := make([]float64, len(samples))
				seen := false
				for i, smp := range samples {
					vals[i] = math.NaN()
					for _, sh := range smp.Stages {
						if sh.Stage == name {
							vals[i] = get(sh)
							seen = true
							top = math.Max(top, vals[i])
						}
					}
				}
				if seen {
					all = append(all, series{class: strings.TrimSpace("line stage-" + name + " " + kind), values: vals})
				}
			}
		}
		if len(all) == 0 {
			continue
		}
		if top == 0 {
			top = 1
		}
		top *= 1.1
		var b strings.Builder
		fmt.Fprintf(&b, `<svg class="chart" viewBox="0 0 %g %g" preserveAspectRatio="none" role="img">`, w, h)
		fmt.Fprintf(&b, `<line class="axis" x1="0" y1="%g" x2="%g" y2="%g"></line>`, h, w, h)
		for _, sr := range all {
			var pts []string
			flush := func() {
				if len(pts) > 1 {
					fmt.Fprintf(&b, `<polyline class="%s" points="%s"></polyline>`, sr.class, strings.Join(pts, " "))
				}
				pts = pts[:0]
			}
			for i, v := range sr.values {
				if math.IsNaN(v) {
					flush()
					continue
				}
				x := w * float64(samples[i].At.Sub(t0)) / span
				y := h - h*v/top
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", x, y))
			}
			flush()
		}
		b.WriteString(`</svg>`)
		out = append(out, chart{Title: f.title, Unit: f.unit, Max: fmt.Sprintf("%.3g", top), SVG: template.HTML(b.String())})
	}
	return out
}
