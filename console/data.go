package console

import (
	"context"
	"fmt"
	"html/template"
	"slices"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
)

// Overview is the data of the overview page (GET /api/overview).
type Overview struct {
	GeneratedAt time.Time `json:"generated_at"`
	Fleet       Fleet     `json:"fleet"`
	// Migrations are sorted by name.
	Migrations []Summary `json:"migrations"`
	// BackfillError says why the backfill jobs could not be read.
	BackfillError string `json:"backfill_error,omitempty"`
	// Slots are the replication slots of change data capture ([WithSlots]).
	Slots *SlotsView `json:"slots,omitempty"`
	// Alerts concern every migration: a slot retaining too much WAL.
	Alerts []Alert `json:"alerts"`
}

// Fleet sums up the fleet registry.
type Fleet struct {
	Live  int    `json:"live"`
	Error string `json:"error,omitempty"`
}

// Summary is one migration as the overview shows it: where it stands, what
// its next step would meet and what needs attention.
type Summary struct {
	Name string `json:"name"`
	// State is the stored flag: stage, rollout, revision, epoch, last change.
	State flags.State `json:"state"`
	// Describe is the state for people: "shadow (live 5%)".
	Describe string `json:"describe"`
	// Next is the stage an advance would move to; empty when complete.
	Next string `json:"next,omitempty"`
	// Ready reports whether an advance would be applied now.
	Ready bool `json:"ready"`
	// Checks are the verdicts of every check of the next step.
	Checks  []flags.CheckResult `json:"checks"`
	Failing int                 `json:"failing"`
	Alerts  []Alert             `json:"alerts"`
}

// Alert is something an operator should look at.
type Alert struct {
	// Level is "critical" or "warning".
	Level string `json:"level"`
	Text  string `json:"text"`
}

// Migration is the data of a migration page (GET /api/m/{name}).
type Migration struct {
	Summary
	GeneratedAt time.Time `json:"generated_at"`
	Fleet       Fleet     `json:"fleet"`
	// Instances are the live instances, sorted by id.
	Instances []InstanceView `json:"instances"`
	// Health is the fleet's published watchdog windows per stage, for the
	// stages with any observation.
	Health []StageHealth `json:"health"`
	// Timeline holds the newest audit entries, newest first.
	Timeline []Event `json:"timeline"`
	// TimelineHTML is Timeline as the page shows it (pages only).
	TimelineHTML template.HTML `json:"-"`
	tl           *timelineCache
	// TimelineLimit is how many entries Timeline holds at most; when it is
	// full, older entries exist (dimmer audit prints them all).
	TimelineLimit int `json:"timeline_limit"`
	// History holds the samples of Health the console took, oldest first:
	// the charts' data.
	History []Sample `json:"history"`
	// Backfills are the migration's backfill jobs ([WithBackfills]);
	// BackfillError says why they could not be read.
	Backfills     []BackfillView `json:"backfills"`
	BackfillError string         `json:"backfill_error,omitempty"`
	// Repairs is the migration's repair log ([WithRepairs]).
	Repairs *RepairView `json:"repairs,omitempty"`
	// Plans are the schema plans naming the migration ([WithSchemaPlans]);
	// PlanError says why they could not be read.
	Plans     []PlanView `json:"plans"`
	PlanError string     `json:"plan_error,omitempty"`
	// Slots are the replication slots of change data capture ([WithSlots]);
	// their alerts are among the Summary's.
	Slots *SlotsView `json:"slots,omitempty"`
}

// InstanceView is one live instance and what it observes of the migration.
type InstanceView struct {
	ID    string `json:"id"`
	Build string `json:"build"`
	// Revision is the migration's flag revision the instance evaluates
	// (0: it has not seen the migration).
	Revision int64 `json:"revision"`
	// Observes is the state at that revision, when the timeline shows it.
	Observes     string    `json:"observes,omitempty"`
	Acknowledged bool      `json:"acknowledged"`
	StartedAt    time.Time `json:"started_at"`
	SeenAt       time.Time `json:"seen_at"`
	// Schema is the schema-stage range the instance published, if any.
	Schema string `json:"schema,omitempty"`
}

// StageHealth is the sum of the windows the fleet published for one stage.
type StageHealth struct {
	Stage     string        `json:"stage"`
	Reporting int           `json:"reporting"`
	Ops       int64         `json:"ops"`
	Errors    int64         `json:"errors"`
	ErrorRate float64       `json:"error_rate"`
	Compared  int64         `json:"compared"`
	Lasting   int64         `json:"lasting"`
	Transient int64         `json:"transient"`
	Mismatch  float64       `json:"mismatch_rate"`
	P99       time.Duration `json:"p99_ns"`
}

// Event is one audit entry as the timeline shows it.
type Event struct {
	flags.AuditEntry
	// Automatic marks a rollback made by the watchdog.
	Automatic bool `json:"automatic"`
	// Failed are the checks that refused the request.
	Failed []flags.CheckResult `json:"failed,omitempty"`
}

// overview gathers the overview data.
func (s *Server) overview(ctx context.Context) (Overview, error) {
	ov := Overview{GeneratedAt: s.now().UTC(), Alerts: []Alert{}}
	ctx = withFleetRead(ctx)
	all, corrupt, err := s.migrations(ctx)
	if err != nil {
		return ov, fmt.Errorf("list migrations: %w", err)
	}
	for _, c := range corrupt {
		ov.Alerts = append(ov.Alerts, Alert{Level: "critical", Text: c.Error() + overwriteHint(c.Migration)})
	}
	insts, ferr := s.fleet.Instances(ctx)
	ov.Fleet = fleetOf(insts, ferr)
	var jobs []backfill.JobStatus
	if s.backfills != nil {
		var jerr error
		if jobs, jerr = s.backfills.Jobs(ctx); jerr != nil {
			ov.BackfillError = jerr.Error()
		}
	}
	ov.Slots = s.slotsView(ctx)
	ov.Alerts = append(ov.Alerts, slotAlerts(ov.Slots)...)
	slices.SortFunc(all, func(a, b flags.State) int { return strings.Compare(a.Migration, b.Migration) })
	for _, st := range all {
		sum, err := s.summary(ctx, st.Migration, insts, ferr)
		if err != nil {
			return ov, err
		}
		// The same timeline as the migration's page: one entry read while
		// the log's head is unchanged.
		tl, err := s.timeline(ctx, st.Migration)
		if err != nil {
			return ov, err
		}
		sum.Alerts = append(sum.Alerts, s.timelineAlerts(tl.audit)...)
		sum.Alerts = append(sum.Alerts, backfillAlerts(backfillViews(jobs, st.Migration, sum.State.Epoch))...)
		sum.Alerts = append(sum.Alerts, repairAlerts(s.repairView(ctx, st.Migration))...)
		ov.Migrations = append(ov.Migrations, sum)
	}
	return ov, nil
}

func fleetOf(insts []flags.Instance, err error) Fleet {
	if err != nil {
		return Fleet{Error: err.Error()}
	}
	return Fleet{Live: len(insts)}
}

// summary runs the next step's checks and raises the alerts the state and
// the fleet call for.
func (s *Server) summary(ctx context.Context, name string, insts []flags.Instance, ferr error) (Summary, error) {
	st, err := s.ctrl.Status(ctx, name, nil)
	if err != nil {
		return Summary{}, fmt.Errorf("%s: status: %w", name, err)
	}
	return s.summarize(st, insts, ferr), nil
}

func (s *Server) summarize(st flags.Status, insts []flags.Instance, ferr error) Summary {
	sum := Summary{Name: st.State.Migration, State: st.State, Describe: st.State.String(), Ready: st.Ready, Checks: st.Checks, Alerts: []Alert{}}
	if st.State.Stage != flags.Complete {
		sum.Next = st.Next.String()
	}
	for _, c := range st.Checks {
		if !c.Passed {
			sum.Failing++
		}
	}
	sum.Alerts = append(sum.Alerts, s.fleetAlerts(st.State, insts, ferr)...)
	return sum
}

func (s *Server) fleetAlerts(st flags.State, insts []flags.Instance, ferr error) []Alert {
	var out []Alert
	switch {
	case ferr != nil:
		return []Alert{{"critical", "fleet registry unreachable: " + ferr.Error()}}
	case len(insts) == 0 && st.Stage != flags.Off:
		out = append(out, Alert{"warning", "no live instance is registered"})
	}
	behind := 0
	for _, in := range insts {
		if in.Applied[st.Migration] < st.Revision {
			behind++
		}
	}
	if behind > 0 {
		out = append(out, Alert{"warning", fmt.Sprintf("%d of %d instances have not applied revision %d", behind, len(insts), st.Revision)})
	}
	cfg := s.thresholds
	for _, stage := range flags.Stages() {
		h, n := flags.FleetHealth(insts, st.Migration, stage)
		if n == 0 {
			continue
		}
		if h.Lasting > 0 {
			level := "warning"
			if h.MismatchRate() > orDefault(cfg.MaxMismatchRate, 0.01) {
				level = "critical"
			}
			out = append(out, Alert{level, fmt.Sprintf("%d lasting mismatches in %s (%s of %d comparisons)", h.Lasting, stage, pct(h.MismatchRate()), h.Compared)})
		}
		if h.Errors > 0 {
			level := "warning"
			if h.ErrorRate() > orDefault(cfg.MaxErrorRate, 0.05) {
				level = "critical"
			}
			out = append(out, Alert{level, fmt.Sprintf("%d new-side errors in %s (%s of %d operations)", h.Errors, stage, pct(h.ErrorRate()), h.Ops)})
		}
		if cfg.MaxLatencyP99 > 0 && h.P99 > cfg.MaxLatencyP99 {
			out = append(out, Alert{"critical", fmt.Sprintf("new-side p99 %v in %s over %v", h.P99, stage, cfg.MaxLatencyP99)})
		}
	}
	return out
}

// automaticRollbackAlertFor is how long an automatic rollback stays an alert.
const automaticRollbackAlertFor = time.Hour

func (s *Server) timelineAlerts(newest []flags.AuditEntry) []Alert {
	now := s.now()
	for _, e := range newest {
		if now.Sub(e.At) > automaticRollbackAlertFor {
			break
		}
		if e.Outcome == flags.Applied && s.automatic(e) {
			return []Alert{{"critical", fmt.Sprintf("automatic rollback %s -> %s %s ago: %s", e.From, e.To, now.Sub(e.At).Round(time.Second), e.Reason)}}
		}
	}
	return nil
}

func (s *Server) automatic(e flags.AuditEntry) bool {
	return e.Actor == s.thresholds.Actor
}

func orDefault(v, def float64) float64 {
	if v == 0 {
		return def
	}
	return v
}

func pct(f float64) string { return fmt.Sprintf("%.2f%%", 100*f) }

// migration gathers a migration page's data.
func (s *Server) migration(ctx context.Context, name string) (Migration, error) {
	if err := flags.ValidateName(name); err != nil {
		return Migration{}, err
	}
	ctx = withFleetRead(ctx)
	// The reads are independent: overlapping them keeps the answer
	// as fast as the slowest, not their sum.
	var (
		insts  []flags.Instance
		ferr   error
		status flags.Status
		tl     *timelineCache
		jobs   []backfill.JobStatus
		jerr   error
		rv     *RepairView
		plans  []expandcontract.Status
		perr   error
		slots  *SlotsView
	)
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		insts, ferr = s.fleet.Instances(gctx)
		return nil
	})
	g.Go(func() (err error) {
		if status, err = s.ctrl.Status(gctx, name, nil); err != nil {
			return fmt.Errorf("%s: status: %w", name, err)
		}
		return nil
	})
	g.Go(func() (err error) {
		tl, err = s.timeline(gctx, name)
		return err
	})
	if s.backfills != nil {
		g.Go(func() error {
			jobs, jerr = s.backfills.Jobs(gctx)
			return nil
		})
	}
	if s.repairs != nil {
		g.Go(func() error {
			rv = s.repairView(gctx, name)
			return nil
		})
	}
	if s.plans != nil {
		g.Go(func() error {
			plans, perr = s.plans.Plans(gctx)
			return nil
		})
	}
	if s.slots != nil {
		g.Go(func() error {
			slots = s.slotsView(gctx)
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return Migration{}, err
	}
	audit := tl.audit
	sum := s.summarize(status, insts, ferr)
	bviews := backfillViews(jobs, name, status.State.Epoch)
	sum.Alerts = append(sum.Alerts, backfillAlerts(bviews)...)
	sum.Alerts = append(sum.Alerts, repairAlerts(rv)...)
	pviews := planViews(plans, name)
	sum.Alerts = append(sum.Alerts, planAlerts(pviews)...)
	sum.Alerts = append(sum.Alerts, s.timelineAlerts(audit)...)
	sum.Alerts = append(sum.Alerts, slotAlerts(slots)...)
	m := Migration{
		Summary: sum, GeneratedAt: s.now().UTC(), Fleet: fleetOf(insts, ferr),
		Instances: []InstanceView{}, Health: []StageHealth{}, Timeline: tl.events, tl: tl,
		TimelineLimit: s.timelineLimit, Backfills: bviews, Repairs: rv, Plans: pviews, Slots: slots,
	}
	if perr != nil {
		m.PlanError = perr.Error()
	}
	if jerr != nil {
		m.BackfillError = jerr.Error()
	}
	// The k-th newest applied entry produced revision current-k: every
	// applied change increments the revision by one.
	byRevision := map[int64]string{}
	rev := sum.State.Revision
	for _, e := range audit {
		if e.Outcome == flags.Applied {
			byRevision[rev] = e.To
			rev--
		}
	}
	slices.SortFunc(insts, func(a, b flags.Instance) int { return strings.Compare(a.ID, b.ID) })
	for _, in := range insts {
		r := in.Applied[name]
		iv := InstanceView{
			ID: in.ID, Build: in.Build, Revision: r, Observes: byRevision[r],
			Acknowledged: r >= sum.State.Revision, StartedAt: in.StartedAt, SeenAt: in.SeenAt,
			Schema: schemaAttr(in.Attributes),
		}
		if r == 0 {
			iv.Observes = "off (never set)"
		}
		m.Instances = append(m.Instances, iv)
	}
	m.Health = healthOf(insts, name)
	if ferr == nil {
		s.record(name, m.Health, m.GeneratedAt, false)
	}
	m.History = s.samples(name)
	return m, nil
}

// schemaAttr shows what package expandcontract publishes about the schema
// stages an instance can run with.
func schemaAttr(attrs map[string]string) string {
	var parts []string
	for k, v := range attrs {
		if strings.HasPrefix(k, "dimmer.schema") {
			parts = append(parts, strings.TrimPrefix(strings.TrimPrefix(k, "dimmer.schema"), "/")+"="+v)
		}
	}
	slices.Sort(parts)
	return strings.Join(parts, " ")
}

// migrations lists the stored flags. A corrupt flag is no reason to hide the
// others: the corrupt ones come back apart, for an alert that names them.
func (s *Server) migrations(ctx context.Context) ([]flags.State, []*flags.CorruptFlagError, error) {
	all, err := s.store.Migrations(ctx)
	corrupt, err := flags.SplitCorrupt(err)
	if err != nil {
		return nil, nil, err
	}
	return all, corrupt, nil
}

// overwriteHint is the command that overwrites a corrupt flag.
func overwriteHint(migration string) string {
	return " (dimmer stage set " + migration + " STAGE --force --reason TEXT)"
}
