package backfill

import (
	"context"
	"slices"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// Progress is a job's state after a chunk, as this process sees it.
type Progress struct {
	Job string
	// RowsDone counts source rows copied by every worker of every process
	// (as of this process's last look) ; RowsTotal is the planner's estimate
	// of the rows up to the upper bound.
	RowsDone, RowsTotal int64
	// RowsPerSecond is this process's rate since it started.
	RowsPerSecond float64
	// ETA at this process's rate; 0 when unknown.
	ETA                time.Duration
	RangesDone, Ranges int
	Workers            []WorkerProgress
	// Held says why the job is waiting (a signal, a pause), empty when not.
	Held string
}

// WorkerProgress is one worker of this process.
type WorkerProgress struct {
	ID            string
	Range         int
	Rows          int64
	RowsPerSecond float64
	ChunkSize     int
}

type instruments struct {
	rows      metric.Int64Counter
	chunks    metric.Float64Histogram
	held      metric.Float64Counter
	retries   metric.Int64Counter
	fallbacks metric.Int64Counter
}

func newInstruments(m metric.Meter) (*instruments, error) {
	var i instruments
	var err error
	if i.rows, err = m.Int64Counter("dimmer.backfill.rows", metric.WithDescription("source rows copied"), metric.WithUnit("{row}")); err != nil {
		return nil, err
	}
	if i.chunks, err = m.Float64Histogram("dimmer.backfill.chunk.duration", metric.WithDescription("time to copy and checkpoint one chunk"), metric.WithUnit("s")); err != nil {
		return nil, err
	}
	if i.held, err = m.Float64Counter("dimmer.backfill.held", metric.WithDescription("time held back by signals, the rate limit or a pause"), metric.WithUnit("s")); err != nil {
		return nil, err
	}
	if i.retries, err = m.Int64Counter("dimmer.backfill.retries", metric.WithDescription("chunks retried after a transient error")); err != nil {
		return nil, err
	}
	if i.fallbacks, err = m.Int64Counter("dimmer.backfill.fallbacks", metric.WithDescription("chunks whose plain insert met a dual write and were redone by the upsert")); err != nil {
		return nil, err
	}
	return &i, nil
}

// tracker aggregates workers' progress for the callback.
type tracker struct {
	mu         sync.Mutex
	job        string
	started    time.Time
	base       int64 // rows done before this process started
	mine       int64
	total      int64
	ranges     int
	rangesDone int
	workers    map[string]*WorkerProgress
	held       string
	cb         func(Progress)
	m          *instruments
	attrs      metric.MeasurementOption
}

func newTracker(job string, base, total int64, ranges, rangesDone int, cb func(Progress), m *instruments) *tracker {
	return &tracker{job: job, started: time.Now(), base: base, total: total, ranges: ranges, rangesDone: rangesDone,
		workers: map[string]*WorkerProgress{}, cb: cb, m: m,
		attrs: metric.WithAttributes(attribute.String("job", job))}
}

func (t *tracker) chunk(ctx context.Context, worker string, rng, rows, size int, took time.Duration) {
	t.m.rows.Add(ctx, int64(rows), t.attrs)
	t.m.chunks.Record(ctx, took.Seconds(), t.attrs)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.mine += int64(rows)
	w := t.workers[worker]
	if w == nil {
		w = &WorkerProgress{ID: worker}
		t.workers[worker] = w
	}
	w.Range, w.Rows, w.ChunkSize = rng, w.Rows+int64(rows), size
	w.RowsPerSecond = float64(w.Rows) / max(time.Since(t.started).Seconds(), 1e-9)
	t.held = ""
	t.report()
}

func (t *tracker) rangeDone() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.rangesDone++
	t.report()
}

// split counts a range this process split off a busy one.
func (t *tracker) split() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.ranges++
}

func (t *tracker) hold(ctx context.Context, why string, d time.Duration) {
	t.m.held.Add(ctx, d.Seconds(), t.attrs)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.held != why {
		t.held = why
		t.report()
	}
}

func (t *tracker) snapshot() Progress {
	el := max(time.Since(t.started).Seconds(), 1e-9)
	p := Progress{Job: t.job, RowsDone: t.base + t.mine, RowsTotal: t.total, RowsPerSecond: float64(t.mine) / el,
		Ranges: t.ranges, RangesDone: t.rangesDone, Held: t.held}
	if p.RowsPerSecond > 0 && p.RowsTotal > p.RowsDone {
		p.ETA = time.Duration(float64(p.RowsTotal-p.RowsDone) / p.RowsPerSecond * float64(time.Second))
	}
	for _, w := range t.workers {
		p.Workers = append(p.Workers, *w)
	}
	slices.SortFunc(p.Workers, func(a, b WorkerProgress) int {
		if a.ID < b.ID {
			return -1
		}
		if a.ID > b.ID {
			return 1
		}
		return 0
	})
	return p
}

func (t *tracker) report() {
	if t.cb != nil {
		t.cb(t.snapshot())
	}
}
