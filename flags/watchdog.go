package flags

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"time"
)

// WatchdogConfig holds the thresholds of a [Watchdog]. Zero fields take the
// defaults documented on each.
type WatchdogConfig struct {
	// Window is the rolling window observations are judged over (1m).
	Window time.Duration
	// Interval is how often the windows are judged (1s).
	Interval time.Duration
	// MinSamples is the least number of comparisons (for the mismatch rate)
	// or new-side operations (for error rate and latency) a window must hold
	// before it is judged (1000).
	MinSamples int
	// MaxMismatchRate is the highest tolerated share of lasting mismatches
	// among comparisons (0.01). Transient mismatches (the row changed between
	// the two reads) do not count.
	MaxMismatchRate float64
	// MaxErrorRate is the highest tolerated share of failed new-side
	// operations (0.05).
	MaxErrorRate float64
	// MaxLatencyP99 is the highest tolerated p99 latency of the new side;
	// 0 disables the latency rule.
	MaxLatencyP99 time.Duration
	// Cooldown is how long after an automatic rollback of a migration (by
	// any instance's watchdog: the store's last change is consulted) no
	// further automatic rollback of it is made (default Window).
	//
	// One incident steps back once; the people it pages decide what
	// follows. After the cooldown a migration the watchdog stepped back is
	// stepped back again only when it is a new incident: this watchdog
	// judged a window of the stage it was left in healthy (at least the
	// minimum sample, under every threshold) since the rollback, or an
	// operator changed the migration (its last change is no longer the
	// watchdog's). A fault that lasts never walks a migration down to off.
	Cooldown time.Duration
	// Actor is the name written to the audit log ("watchdog").
	Actor string
}

func (c *WatchdogConfig) setDefaults() {
	if c.Window == 0 {
		c.Window = time.Minute
	}
	if c.Interval == 0 {
		c.Interval = time.Second
	}
	if c.MinSamples == 0 {
		c.MinSamples = 1000
	}
	if c.MaxMismatchRate == 0 {
		c.MaxMismatchRate = 0.01
	}
	if c.MaxErrorRate == 0 {
		c.MaxErrorRate = 0.05
	}
	if c.Actor == "" {
		c.Actor = "watchdog"
	}
	if c.Cooldown == 0 {
		c.Cooldown = c.Window
	}
}

// Validate checks the configuration after defaults are applied.
func (c WatchdogConfig) Validate() error {
	c.setDefaults()
	switch {
	case c.Window < 0:
		return fmt.Errorf("WatchdogConfig.Window %v: must be positive", c.Window)
	case c.Interval < 0 || c.Interval > c.Window:
		return fmt.Errorf("WatchdogConfig.Interval %v: must be positive and at most Window (%v)", c.Interval, c.Window)
	case c.MinSamples < 0:
		return fmt.Errorf("WatchdogConfig.MinSamples %d: must be positive", c.MinSamples)
	case c.MaxMismatchRate < 0 || c.MaxMismatchRate > 1 || math.IsNaN(c.MaxMismatchRate):
		return fmt.Errorf("WatchdogConfig.MaxMismatchRate %v: must be in [0, 1]", c.MaxMismatchRate)
	case c.MaxErrorRate < 0 || c.MaxErrorRate > 1 || math.IsNaN(c.MaxErrorRate):
		return fmt.Errorf("WatchdogConfig.MaxErrorRate %v: must be in [0, 1]", c.MaxErrorRate)
	case c.Cooldown < 0:
		return fmt.Errorf("WatchdogConfig.Cooldown %v: must not be negative", c.Cooldown)
	case c.MaxLatencyP99 < 0:
		return fmt.Errorf("WatchdogConfig.MaxLatencyP99 %v: must not be negative", c.MaxLatencyP99)
	}
	return nil
}

// Trip is one automatic rollback (or an attempt at one).
type Trip struct {
	Migration string
	// Stage is where the bad observations were made; the watchdog moved
	// the keys served it one stage back.
	Stage  Stage
	Reason string
	At     time.Time
	// State is the state after the rollback; Err is set when it failed.
	State State
	Err   error
}

// Health is what a window holds for one migration in one stage.
type Health struct {
	Ops        int64         `json:"ops"`
	Errors     int64         `json:"errors"`
	Compared   int64         `json:"compared"`
	Mismatches int64         `json:"mismatches"`
	Lasting    int64         `json:"lasting"`
	P99        time.Duration `json:"p99"`
}

// MismatchRate is lasting mismatches per comparison.
func (h Health) MismatchRate() float64 { return ratio(h.Lasting, h.Compared) }

// ErrorRate is failed new-side operations per new-side operation.
func (h Health) ErrorRate() float64 { return ratio(h.Errors, h.Ops) }

func ratio(a, b int64) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// Watchdog watches observations of the new side and steps a migration back
// (live -> shadow, shadow -> dualwrite, ...) through the [Controller] when a
// rolling window crosses a threshold over at least the minimum sample. The
// step is audited with the reason. Rollback is a flag flip, never a deploy.
//
// A Watchdog judges what its own process observes. Its windows are also
// published through the fleet heartbeat ([Watchdog.Attributes]), so
// [HealthGuard] judges the whole fleet before live and rampdown.
type Watchdog struct {
	ctrl   *Controller
	cfg    WatchdogConfig
	logger *slog.Logger
	onTrip func(Trip)
	slot   time.Duration

	states func(migration string) (State, bool)

	mu      sync.Mutex
	windows map[windowKey]*window
	// since holds each migration's last change as last seen: observations
	// older than it belong to an earlier episode and are not judged.
	since map[string]time.Time
	// recovered holds, per window, the revision during which it was judged
	// healthy: after the watchdog's own rollback (that revision), only a
	// recovery of the window that is bad again ends the incident.
	recovered map[windowKey]int64
	// held holds the revision whose further rollback was held back and
	// logged, so an incident logs it once.
	held map[string]int64

	stop context.CancelFunc
	done chan struct{}
}

type windowKey struct {
	migration string
	stage     Stage
}

var _ Observer = (*Watchdog)(nil)

// WatchdogOption configures a [Watchdog].
type WatchdogOption func(*Watchdog) error

// OnTrip registers a function called after every automatic rollback attempt.
func OnTrip(f func(Trip)) WatchdogOption {
	return func(w *Watchdog) error {
		if f == nil {
			return errors.New("OnTrip: function is nil")
		}
		w.onTrip = f
		return nil
	}
}

// WithStates lets the watchdog read a migration's current state without I/O
// (a dimmer provider's Snapshot method fits); without it the watchdog loads
// the state from the controller's store when it judges.
func WithStates(f func(migration string) (State, bool)) WatchdogOption {
	return func(w *Watchdog) error {
		if f == nil {
			return errors.New("WithStates: function is nil")
		}
		w.states = f
		return nil
	}
}

// WithWatchdogLogger sets the logger (default slog.Default()).
func WithWatchdogLogger(l *slog.Logger) WatchdogOption {
	return func(w *Watchdog) error {
		if l == nil {
			return errors.New("WithWatchdogLogger: logger is nil")
		}
		w.logger = l
		return nil
	}
}

// NewWatchdog returns a watchdog that rolls back through ctrl. Call
// [Watchdog.Start] to judge windows periodically and [Watchdog.Close] to stop.
func NewWatchdog(ctrl *Controller, cfg WatchdogConfig, opts ...WatchdogOption) (*Watchdog, error) {
	if ctrl == nil {
		return nil, errors.New("flags.NewWatchdog: controller is nil")
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("flags.NewWatchdog: %w", err)
	}
	cfg.setDefaults()
	w := &Watchdog{ctrl: ctrl, cfg: cfg, logger: slog.Default(), windows: map[windowKey]*window{}, since: map[string]time.Time{},
		recovered: map[windowKey]int64{}, held: map[string]int64{}, onTrip: func(Trip) {}}
	w.slot = max(cfg.Window/60, time.Millisecond)
	for _, o := range opts {
		if err := o(w); err != nil {
			return nil, fmt.Errorf("flags.NewWatchdog: %w", err)
		}
	}
	return w, nil
}

// Observe records one observation; it takes a short lock and never blocks on I/O.
func (w *Watchdog) Observe(o Observation) {
	if o.Stage == Off || o.Migration == "" {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	k := windowKey{o.Migration, o.Stage}
	win := w.windows[k]
	if win == nil {
		win = newWindow(int(w.cfg.Window/w.slot), w.slot)
		w.windows[k] = win
	}
	win.add(time.Now(), o)
}

// Health returns the current window of a migration in a stage.
func (w *Watchdog) Health(migration string, stage Stage) Health {
	w.mu.Lock()
	defer w.mu.Unlock()
	win := w.windows[windowKey{migration, stage}]
	if win == nil {
		return Health{}
	}
	return win.sum(time.Now(), w.since[migration])
}

// Start judges the windows every Interval until Close.
func (w *Watchdog) Start() {
	ctx, cancel := context.WithCancel(context.Background())
	w.stop = cancel
	w.done = make(chan struct{})
	go func() {
		defer close(w.done)
		t := time.NewTicker(w.cfg.Interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				w.Judge(ctx)
			}
		}
	}()
}

// Close stops the judging loop and waits for it.
func (w *Watchdog) Close(ctx context.Context) error {
	if w.stop == nil {
		return nil
	}
	w.stop()
	select {
	case <-w.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Judge checks every window once and rolls back those over a threshold. It
// returns the trips it made. Start calls it every Interval.
func (w *Watchdog) Judge(ctx context.Context) []Trip {
	now := time.Now()
	w.mu.Lock()
	migrations := map[string]bool{}
	for k := range w.windows {
		migrations[k.migration] = true
	}
	w.mu.Unlock()
	current := map[string]State{}
	for m := range migrations {
		st, err := w.state(ctx, m)
		if err != nil {
			w.logger.Warn("watchdog cannot read the stage; judging skipped", "migration", m, "err", err)
			continue
		}
		current[m] = st
	}
	type verdict struct {
		k      windowKey
		reason string
	}
	var bad []verdict
	w.mu.Lock()
	for m, st := range current {
		w.since[m] = st.UpdatedAt
	}
	for k, win := range w.windows {
		st, ok := current[k.migration]
		if !ok {
			continue
		}
		h := win.sum(now, st.UpdatedAt)
		if reason := overThreshold(h, w.cfg); reason != "" {
			bad = append(bad, verdict{k, reason})
			// Judged once: the next trip needs a fresh sample.
			win.reset()
		} else if judged(h, w.cfg) {
			w.recovered[k] = st.Revision
		}
	}
	var trips []Trip
	var held []verdict
	for i := 0; i < len(bad); i++ {
		v := bad[i]
		cur := current[v.k.migration]
		if cur.UpdatedBy != w.cfg.Actor {
			continue
		}
		// The watchdog's own rollback is the last change: the same
		// incident unless the window recovered since.
		coolingDown := now.Sub(cur.UpdatedAt) < w.cfg.Cooldown
		if coolingDown || w.recovered[v.k] != cur.Revision {
			if w.held[v.k.migration] != cur.Revision {
				w.held[v.k.migration] = cur.Revision
				held = append(held, v)
			}
			bad = append(bad[:i], bad[i+1:]...)
			i--
		}
	}
	w.mu.Unlock()
	for _, v := range held {
		cur := current[v.k.migration]
		w.logger.Info("watchdog threshold crossed again in the incident it already stepped back for; not stepping back further until the window recovers or an operator acts",
			"migration", v.k.migration, "stage", v.k.stage.String(), "reason", v.reason, "last_rollback", cur.UpdatedAt, "revision", cur.Revision)
	}
	for _, v := range bad {
		trip := Trip{Migration: v.k.migration, Stage: v.k.stage, Reason: v.reason, At: now}
		reason := fmt.Sprintf("automatic rollback from %s: %s", v.k.stage, v.reason)
		trip.State, trip.Err = w.ctrl.StepBack(ctx, v.k.migration, v.k.stage, w.cfg.Actor, reason)
		if trip.Err != nil {
			w.logger.Error("watchdog rollback failed", "migration", trip.Migration, "stage", trip.Stage.String(), "reason", trip.Reason, "err", trip.Err)
		} else {
			w.logger.Warn("watchdog rolled back", "migration", trip.Migration, "from", trip.Stage.String(), "to", trip.State.String(), "reason", trip.Reason)
		}
		w.onTrip(trip)
		trips = append(trips, trip)
	}
	return trips
}

func (w *Watchdog) state(ctx context.Context, migration string) (State, error) {
	if w.states != nil {
		if st, ok := w.states(migration); ok {
			return st, nil
		}
	}
	return w.ctrl.store.Load(ctx, migration)
}

// judged: the window holds the minimum sample, so its verdict counts.
func judged(h Health, cfg WatchdogConfig) bool {
	min := int64(cfg.MinSamples)
	return h.Compared >= min || h.Ops >= min
}

func overThreshold(h Health, cfg WatchdogConfig) string {
	min := int64(cfg.MinSamples)
	var reasons []string
	if h.Compared >= min && h.MismatchRate() > cfg.MaxMismatchRate {
		reasons = append(reasons, fmt.Sprintf("lasting mismatch rate %.2f%% over %d comparisons > %.2f%%",
			100*h.MismatchRate(), h.Compared, 100*cfg.MaxMismatchRate))
	}
	if h.Ops >= min && h.ErrorRate() > cfg.MaxErrorRate {
		reasons = append(reasons, fmt.Sprintf("new-side error rate %.2f%% over %d operations > %.2f%%",
			100*h.ErrorRate(), h.Ops, 100*cfg.MaxErrorRate))
	}
	if cfg.MaxLatencyP99 > 0 && h.Ops >= min && h.P99 > cfg.MaxLatencyP99 {
		reasons = append(reasons, fmt.Sprintf("new-side p99 %v over %d operations > %v", h.P99, h.Ops, cfg.MaxLatencyP99))
	}
	return strings.Join(reasons, "; ")
}

// healthAttrPrefix marks heartbeat attributes that carry watchdog windows:
// "dimmer.health/<migration>/<stage>" -> JSON Health.
const healthAttrPrefix = "dimmer.health/"

// Attributes returns the current windows as heartbeat attributes, for
// [Heartbeater] (WithAttributes(w.Attributes)).
func (w *Watchdog) Attributes() map[string]string {
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[string]string, len(w.windows))
	for k, win := range w.windows {
		b, err := json.Marshal(win.sum(now, w.since[k.migration]))
		if err != nil {
			continue
		}
		out[healthAttrPrefix+k.migration+"/"+k.stage.String()] = string(b)
	}
	return out
}

// FleetHealth sums the windows every live instance published for a
// migration in a stage.
func FleetHealth(insts []Instance, migration string, stage Stage) (Health, int) {
	var total Health
	reporting := 0
	key := healthAttrPrefix + migration + "/" + stage.String()
	for _, in := range insts {
		v, ok := in.Attributes[key]
		if !ok {
			continue
		}
		var h Health
		if json.Unmarshal([]byte(v), &h) != nil {
			continue
		}
		reporting++
		total.Ops += h.Ops
		total.Errors += h.Errors
		total.Compared += h.Compared
		total.Mismatches += h.Mismatches
		total.Lasting += h.Lasting
		total.P99 = max(total.P99, h.P99)
	}
	return total, reporting
}

// HealthGuard refuses to enter live (judging what the fleet saw in shadow)
// or rampdown (judging live) unless the fleet's windows hold at least the
// minimum sample and are under the thresholds of cfg.
func HealthGuard(fleet FleetStore, cfg WatchdogConfig) Guard {
	cfg.setDefaults()
	return NewGuard("health", Entering(Live, RampDown), func(ctx context.Context, t Transition) error {
		insts, err := fleet.Instances(ctx)
		if err != nil {
			return fmt.Errorf("fleet registry unreachable: %v", err)
		}
		var problems []string
		for _, judged := range []Stage{Shadow, Live} {
			if !t.Entering(judged + 1) {
				continue
			}
			h, n := FleetHealth(insts, t.Migration, judged)
			if h.Compared < int64(cfg.MinSamples) {
				problems = append(problems, fmt.Sprintf("only %d comparisons in %s from %d instances (need %d)",
					h.Compared, judged, n, cfg.MinSamples))
				continue
			}
			if reason := overThreshold(h, cfg); reason != "" {
				problems = append(problems, fmt.Sprintf("%s: %s", judged, reason))
			}
		}
		if len(problems) > 0 {
			return errors.New(strings.Join(problems, "; "))
		}
		return nil
	})
}

// CanaryGuard refuses to finish a rollout (every key moves to the stage a
// share of keys was trying) unless the fleet's windows for that stage,
// which only the canary's keys fed, hold at least cfg.MinSamples
// operations and are under the thresholds of cfg. [HealthGuard] judges the
// stage the other keys leave; without this guard a canary would prove
// nothing.
func CanaryGuard(fleet FleetStore, cfg WatchdogConfig) Guard {
	cfg.setDefaults()
	return NewGuard("canary-healthy", finishesRollout, func(ctx context.Context, t Transition) error {
		insts, err := fleet.Instances(ctx)
		if err != nil {
			return fmt.Errorf("fleet registry unreachable: %v", err)
		}
		stage := t.From.Rollout.Stage
		h, n := FleetHealth(insts, t.Migration, stage)
		if h.Ops < int64(cfg.MinSamples) {
			return fmt.Errorf("canary: only %d operations in %s from %d instances (need %d)", h.Ops, stage, n, cfg.MinSamples)
		}
		if reason := overThreshold(h, cfg); reason != "" {
			return fmt.Errorf("canary in %s: %s", stage, reason)
		}
		return nil
	})
}

// finishesRollout: the transition moves every key to the stage a rollout
// was serving to some.
func finishesRollout(t Transition) bool {
	return t.From.Rollout != nil && t.To.Rollout == nil && t.To.Stage == t.From.Rollout.Stage
}

// window is a ring of time slots.
type window struct {
	slot  time.Duration
	slots []slotStats
}

type slotStats struct {
	start      int64 // slot index (unix nanos / slot)
	ops, errs  int64
	compared   int64
	mismatches int64
	lasting    int64
	lat        [latBuckets]int64
}

// Latency histogram: bucket i holds latencies below 10µs * 1.25^i.
const latBuckets = 80

func latBucket(d time.Duration) int {
	if d <= 10*time.Microsecond {
		return 0
	}
	i := int(math.Ceil(math.Log(float64(d)/float64(10*time.Microsecond)) / math.Log(1.25)))
	return min(i, latBuckets-1)
}

func latUpper(i int) time.Duration {
	return time.Duration(float64(10*time.Microsecond) * math.Pow(1.25, float64(i)))
}

func newWindow(n int, slot time.Duration) *window {
	return &window{slot: slot, slots: make([]slotStats, max(n, 1))}
}

func (w *window) add(now time.Time, o Observation) {
	idx := now.UnixNano() / int64(w.slot)
	s := &w.slots[idx%int64(len(w.slots))]
	if s.start != idx {
		*s = slotStats{start: idx}
	}
	if o.Side == New {
		s.ops++
		if o.Err {
			s.errs++
		}
		s.lat[latBucket(o.Latency)]++
	}
	if o.Compared {
		s.compared++
		if o.Mismatch {
			s.mismatches++
			if o.Lasting {
				s.lasting++
			}
		}
	}
}

// sum adds the slots inside the window that start after since.
func (w *window) sum(now, since time.Time) Health {
	idx := now.UnixNano() / int64(w.slot)
	oldest := idx - int64(len(w.slots)) + 1
	if !since.IsZero() {
		oldest = max(oldest, since.UnixNano()/int64(w.slot)+1)
	}
	var h Health
	var lat [latBuckets]int64
	for i := range w.slots {
		s := &w.slots[i]
		if s.start < oldest || s.start > idx {
			continue
		}
		h.Ops += s.ops
		h.Errors += s.errs
		h.Compared += s.compared
		h.Mismatches += s.mismatches
		h.Lasting += s.lasting
		for j, c := range s.lat {
			lat[j] += c
		}
	}
	if h.Ops > 0 {
		target := int64(math.Ceil(float64(h.Ops) * 0.99))
		var seen int64
		for j, c := range lat {
			seen += c
			if seen >= target {
				h.P99 = latUpper(j)
				break
			}
		}
	}
	return h
}

func (w *window) reset() {
	for i := range w.slots {
		w.slots[i] = slotStats{}
	}
}
