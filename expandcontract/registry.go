package expandcontract

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/flags"
)

// DefaultSchema is where the registry's tables live unless [WithSchema]
// says otherwise; it is the schema package pgflags uses too, so one
// "dimmer" schema holds a service's flags and its plans.
const DefaultSchema = "dimmer"

// SchemaVersion is the version of the registry tables this build installs.
const SchemaVersion = 1

// VerificationChecker reports whether the backfill of a migration has been
// verified (old and new compared and found equal). The contract waits for
// it. [VerifierFunc] adapts a function; [GuardVerifier] adapts a flags
// guard such as package backfill's VerifiedGuard.
type VerificationChecker interface {
	Verified(ctx context.Context, migration string) (ok bool, detail string, err error)
}

// VerifierFunc adapts a function to [VerificationChecker].
type VerifierFunc func(ctx context.Context, migration string) (bool, string, error)

// Verified calls f.
func (f VerifierFunc) Verified(ctx context.Context, migration string) (bool, string, error) {
	return f(ctx, migration)
}

// GuardVerifier asks a flags guard that judges a migration's backfill (for
// example backfill.VerifiedGuard) whether it is verified at the migration's
// current state, loaded from store: the guard's error text is the detail.
func GuardVerifier(g flags.Guard, store flags.Store) VerificationChecker {
	return VerifierFunc(func(ctx context.Context, migration string) (bool, string, error) {
		st, err := store.Load(ctx, migration)
		if err != nil {
			return false, "", err
		}
		if err := g.Check(ctx, flags.Transition{Migration: migration, From: st, To: st}); err != nil {
			return false, err.Error(), nil
		}
		return true, g.Name() + " passed", nil
	})
}

// Option configures a [Registry].
type Option func(*Registry) error

// WithSchema sets the schema holding the registry tables (default "dimmer").
func WithSchema(name string) Option {
	return func(r *Registry) error {
		if name == "" || len(name) > 63 || strings.ContainsRune(name, 0) {
			return fmt.Errorf("WithSchema(%q): a schema name must have 1-63 bytes and no NUL", name)
		}
		r.schema = name
		return nil
	}
}

// WithFleet sets the fleet registry the contract and rollback guards read
// the live instances' declared ranges from. Without it those guards fail:
// nothing proves no instance needs the shape being removed.
func WithFleet(f flags.FleetStore) Option {
	return func(r *Registry) error {
		if f == nil {
			return errors.New("WithFleet: fleet store is nil")
		}
		r.fleet = f
		return nil
	}
}

// WithFlagStore sets the flag store holding the linked migrations' stages.
// Without it a plan with a linked migration cannot contract or roll back
// unguarded.
func WithFlagStore(s flags.Store) Option {
	return func(r *Registry) error {
		if s == nil {
			return errors.New("WithFlagStore: flag store is nil")
		}
		r.flags = s
		return nil
	}
}

// WithVerifier sets who says whether a plan's backfill is verified.
func WithVerifier(v VerificationChecker) Option {
	return func(r *Registry) error {
		if v == nil {
			return errors.New("WithVerifier: verifier is nil")
		}
		r.verifier = v
		return nil
	}
}

// DefaultLockTimeout is how long one attempt of a step waits for its locks
// unless [WithLockTimeout] says otherwise.
const DefaultLockTimeout = 150 * time.Millisecond

// DefaultLockWaitBudget bounds the retries of one step on lock timeouts
// unless [WithLockWaitBudget] says otherwise.
const DefaultLockWaitBudget = 5 * time.Minute

// WithLockTimeout bounds how long one attempt of a step waits for its locks
// (default [DefaultLockTimeout], 150ms). While DDL waits for a lock every
// later query on the table queues behind it, so this is also the longest
// stall one attempt can cause the service: keep it short and let the
// retries ([WithLockWaitBudget]) wait out a long lock holder instead.
func WithLockTimeout(d time.Duration) Option {
	return func(r *Registry) error {
		if d < time.Millisecond {
			return fmt.Errorf("WithLockTimeout(%v): must be at least 1ms", d)
		}
		r.lockTimeout = d
		return nil
	}
}

// WithLockWaitBudget bounds the total time one step spends on attempts that
// time out on a lock (or lose a deadlock) and the pauses between them
// (default [DefaultLockWaitBudget], 5 minutes). Between attempts the step
// holds no lock and queues nobody, so a long budget costs the service
// nothing; spent, the step fails with [ErrLockTimeout], nothing of it
// applied.
func WithLockWaitBudget(d time.Duration) Option {
	return func(r *Registry) error {
		if d <= 0 {
			return fmt.Errorf("WithLockWaitBudget(%v): must be positive", d)
		}
		r.lockWaitBudget = d
		return nil
	}
}

// WithAttempts caps how many times a step is tried when it times out on a
// lock or is chosen as a deadlock victim (default: no cap, the lock-wait
// budget alone bounds the retries).
func WithAttempts(n int) Option {
	return func(r *Registry) error {
		if n < 1 {
			return fmt.Errorf("WithAttempts(%d): must be at least 1", n)
		}
		r.attempts = n
		return nil
	}
}

// WithBackoff sets the pause after the first failed attempt and its cap; it
// doubles per attempt with jitter (default 100ms, 3s).
func WithBackoff(initial, max time.Duration) Option {
	return func(r *Registry) error {
		if initial <= 0 || max < initial {
			return fmt.Errorf("WithBackoff(%v, %v): want 0 < initial <= max", initial, max)
		}
		r.backoff, r.maxBackoff = initial, max
		return nil
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(r *Registry) error {
		if l == nil {
			return errors.New("WithLogger: logger is nil")
		}
		r.logger = l
		return nil
	}
}

// Registry keeps every plan's stage, step progress and audit trail in
// Postgres, applies the phases and judges the guards. Plans are independent:
// each is applied under its own advisory lock, so several are in flight at
// once. It is safe for concurrent use.
type Registry struct {
	pool        *pgxpool.Pool
	schema      string
	fleet       flags.FleetStore
	flags       flags.Store
	verifier    VerificationChecker
	lockTimeout time.Duration
	// lockWaitBudget bounds one step's retries on lock timeouts.
	lockWaitBudget time.Duration
	// attempts caps the tries of a step; 0: no cap.
	attempts   int
	backoff    time.Duration
	maxBackoff time.Duration
	logger     *slog.Logger
	t          tables
}

type tables struct{ schema, plans, steps, audit, version string }

// NewRegistry returns a registry over pool: the pool of the database whose
// schema the plans change (the steps run there). It does no I/O; call
// [Registry.Install] once.
func NewRegistry(pool *pgxpool.Pool, opts ...Option) (*Registry, error) {
	if pool == nil {
		return nil, errors.New("expandcontract.NewRegistry: pool is nil")
	}
	r := &Registry{pool: pool, schema: DefaultSchema, lockTimeout: DefaultLockTimeout, lockWaitBudget: DefaultLockWaitBudget,
		backoff: 100 * time.Millisecond, maxBackoff: 3 * time.Second, logger: slog.Default()}
	for _, o := range opts {
		if o == nil {
			return nil, errors.New("expandcontract.NewRegistry: nil option")
		}
		if err := o(r); err != nil {
			return nil, fmt.Errorf("expandcontract.NewRegistry: %w", err)
		}
	}
	q := func(n string) string { return pgx.Identifier{r.schema, n}.Sanitize() }
	r.t = tables{schema: pgx.Identifier{r.schema}.Sanitize(), plans: q("schema_plans"), steps: q("schema_plan_steps"),
		audit: q("schema_plan_audit"), version: q("schema_plan_version")}
	return r, nil
}

// Schema is the schema holding the registry tables.
func (r *Registry) Schema() string { return r.schema }

// Install creates the registry tables, idempotently; concurrent installers
// take turns. Tables of a newer version are refused.
func (r *Registry) Install(ctx context.Context) error {
	return pgx.BeginFunc(ctx, r.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`,
			"dimmer/expandcontract/install/"+r.schema); err != nil {
			return fmt.Errorf("expandcontract: install %s: %w", r.schema, err)
		}
		if _, err := tx.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+r.t.schema+`;
CREATE TABLE IF NOT EXISTS `+r.t.version+` (version int PRIMARY KEY, installed_at timestamptz NOT NULL DEFAULT now())`); err != nil {
			return fmt.Errorf("expandcontract: install %s: %w", r.schema, err)
		}
		var cur int
		if err := tx.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM `+r.t.version).Scan(&cur); err != nil {
			return fmt.Errorf("expandcontract: install %s: %w", r.schema, err)
		}
		if cur > SchemaVersion {
			return fmt.Errorf("expandcontract: registry in schema %s is at version %d, newer than this build supports (%d): upgrade dimmer",
				r.schema, cur, SchemaVersion)
		}
		if cur == SchemaVersion {
			return nil
		}
		if _, err := tx.Exec(ctx, `
CREATE TABLE IF NOT EXISTS `+r.t.plans+` (
	plan       text PRIMARY KEY,
	definition jsonb NOT NULL,
	stage      text NOT NULL DEFAULT 'pending',
	running    text,
	search_path text NOT NULL DEFAULT '',
	revision   bigint NOT NULL DEFAULT 0,
	updated_at timestamptz NOT NULL DEFAULT now(),
	updated_by text NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS `+r.t.steps+` (
	plan        text NOT NULL,
	phase       text NOT NULL,
	step        text NOT NULL,
	state       text NOT NULL,
	attempts    int NOT NULL DEFAULT 0,
	last_error  text NOT NULL DEFAULT '',
	updated_at  timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (plan, phase, step)
);
CREATE TABLE IF NOT EXISTS `+r.t.audit+` (
	id    bigserial PRIMARY KEY,
	plan  text NOT NULL,
	at    timestamptz NOT NULL DEFAULT now(),
	entry jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS schema_plan_audit_plan_id ON `+r.t.audit+` (plan, id DESC);
INSERT INTO `+r.t.version+` (version) VALUES (1) ON CONFLICT DO NOTHING`); err != nil {
			return fmt.Errorf("expandcontract: install %s: %w", r.schema, err)
		}
		return nil
	})
}

// AuditEntry is one request on a plan: who, when, which action, from which
// stage to which, why, what the guards said and how it ended.
type AuditEntry struct {
	Plan    string              `json:"plan"`
	At      time.Time           `json:"at"`
	Actor   string              `json:"actor"`
	Action  string              `json:"action"`
	From    string              `json:"from"`
	To      string              `json:"to"`
	Reason  string              `json:"reason,omitempty"`
	Forced  bool                `json:"forced,omitempty"`
	Outcome string              `json:"outcome"`
	Checks  []flags.CheckResult `json:"checks,omitempty"`
	Detail  string              `json:"detail,omitempty"`
	// Verification is the result of a [Registry.VerifyTransform].
	Verification *TransformVerification `json:"verification,omitempty"`
}

// Audit outcomes.
const (
	OutcomeApplied    = "applied"
	OutcomeRefused    = "refused"
	OutcomeFailed     = "failed"
	OutcomeRegistered = "registered"
)

func (r *Registry) appendAudit(ctx context.Context, db DB, e AuditEntry) error {
	if e.At.IsZero() {
		e.At = time.Now().UTC()
	}
	doc, err := json.Marshal(e)
	if err != nil {
		return err
	}
	_, err = db.Exec(ctx, `INSERT INTO `+r.t.audit+` (plan, at, entry) VALUES ($1, $2, $3)`, e.Plan, e.At, doc)
	return err
}

// Audit returns the plan's newest entries first, at most limit (<= 0: all).
func (r *Registry) Audit(ctx context.Context, plan string, limit int) ([]AuditEntry, error) {
	q := `SELECT entry FROM ` + r.t.audit + ` WHERE plan = $1 ORDER BY id DESC`
	args := []any{plan}
	if limit > 0 {
		q += ` LIMIT $2`
		args = append(args, limit)
	}
	rows, err := r.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("expandcontract: audit of %s: %w", plan, err)
	}
	docs, err := pgx.CollectRows(rows, pgx.RowTo[[]byte])
	if err != nil {
		return nil, fmt.Errorf("expandcontract: audit of %s: %w", plan, err)
	}
	out := make([]AuditEntry, 0, len(docs))
	for _, d := range docs {
		var e AuditEntry
		if err := json.Unmarshal(d, &e); err != nil {
			return nil, fmt.Errorf("expandcontract: audit of %s: malformed entry: %w", plan, err)
		}
		out = append(out, e)
	}
	return out, nil
}

// Register stores the plans' definitions, so the CLI and other processes
// can apply them by name. It is what a service calls at start-up with the
// plans its code carries. Registering an identical definition changes
// nothing. A changed definition is stored only in the phases that have not
// run a step yet; a change to a phase that already ran is [ErrPlanChanged]
// naming the phase and step, because the registry would otherwise believe
// steps applied that never were.
func (r *Registry) Register(ctx context.Context, actor string, plans ...Plan) error {
	var errs []error
	for _, p := range plans {
		if err := p.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	for _, p := range plans {
		if err := r.register(ctx, actor, p); err != nil {
			return err
		}
	}
	return nil
}

func (r *Registry) register(ctx context.Context, actor string, p Plan) error {
	def, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("expandcontract: register %s: %w", p.Name, err)
	}
	return pgx.BeginFunc(ctx, r.pool, func(tx pgx.Tx) error {
		var stored []byte
		lookup := func() error {
			return tx.QueryRow(ctx, `SELECT definition FROM `+r.t.plans+` WHERE plan = $1 FOR UPDATE`, p.Name).Scan(&stored)
		}
		err := lookup()
		if errors.Is(err, pgx.ErrNoRows) {
			// A fleet starting together registers the same new plan at once:
			// the insert waits for a concurrent one to commit, and the loser
			// compares its definition with the winner's like any later
			// registration.
			tag, ierr := tx.Exec(ctx, `INSERT INTO `+r.t.plans+` (plan, definition, updated_by, search_path) VALUES ($1, $2, $3, current_setting('search_path')) ON CONFLICT DO NOTHING`,
				p.Name, def, actor)
			if err = ierr; err != nil {
				return fmt.Errorf("expandcontract: register %s: %w", p.Name, err)
			}
			if tag.RowsAffected() == 1 {
				return r.appendAudit(ctx, tx, AuditEntry{Plan: p.Name, Actor: actor, Action: "register", From: "-", To: Pending.String(), Outcome: OutcomeRegistered})
			}
			err = lookup()
		}
		if err != nil {
			return fmt.Errorf("expandcontract: register %s: %w", p.Name, err)
		}
		var old Plan
		if err := json.Unmarshal(stored, &old); err != nil {
			return fmt.Errorf("expandcontract: register %s: stored definition is malformed: %w", p.Name, err)
		}
		if samePlan(old, p) {
			return nil
		}
		// search_path is kept from the first registration: steps that ran
		// must keep resolving the same tables.
		ran := map[string]bool{}
		// A plan rolled back to the pending shape may change in every
		// phase: its expand records are gone, and its rollback's are only
		// history.
		rows, err := tx.Query(ctx, `SELECT DISTINCT s.phase FROM `+r.t.steps+` s JOIN `+r.t.plans+` p ON p.plan = s.plan
WHERE s.plan = $1 AND NOT (p.stage = 'rolled back' AND p.running IS NULL AND s.phase = 'rollback')`, p.Name)
		if err != nil {
			return fmt.Errorf("expandcontract: register %s: %w", p.Name, err)
		}
		phases, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return fmt.Errorf("expandcontract: register %s: %w", p.Name, err)
		}
		for _, ph := range phases {
			ran[ph] = true
		}
		for _, ph := range []string{PhaseExpand, PhaseContract, PhaseRollback} {
			if ran[ph] && !slices.Equal(old.Steps(ph), p.Steps(ph)) {
				return fmt.Errorf("%w: plan %s: the %s steps differ from the registered ones (%s), and %s has already run: write a new plan instead of editing this one",
					ErrPlanChanged, p.Name, ph, firstDiff(old.Steps(ph), p.Steps(ph)), ph)
			}
		}
		if _, err := tx.Exec(ctx, `UPDATE `+r.t.plans+` SET definition = $2, updated_at = now(), updated_by = $3 WHERE plan = $1`,
			p.Name, def, actor); err != nil {
			return fmt.Errorf("expandcontract: register %s: %w", p.Name, err)
		}
		return r.appendAudit(ctx, tx, AuditEntry{Plan: p.Name, Actor: actor, Action: "register", From: "-", To: "-",
			Outcome: OutcomeRegistered, Detail: "definition updated"})
	})
}

func samePlan(a, b Plan) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return string(x) == string(y)
}

func firstDiff(a, b []Step) string {
	for i := range max(len(a), len(b)) {
		switch {
		case i >= len(a):
			return fmt.Sprintf("step %s is new", b[i].Name)
		case i >= len(b):
			return fmt.Sprintf("step %s was removed", a[i].Name)
		case a[i] != b[i]:
			return fmt.Sprintf("step %d (%s) changed", i+1, a[i].Name)
		}
	}
	return "no difference"
}

// StepStatus is the recorded progress of one step.
type StepStatus struct {
	Phase, Name string
	// State is "applied", "failed", "running" or "" (never run).
	State     string
	Attempts  int
	LastError string
	UpdatedAt time.Time
}

// Status is a plan's stored stage and progress.
type Status struct {
	Plan  Plan
	Stage Stage
	// Running is the phase started and not finished ("" when none): in
	// progress now, or interrupted by a crash or a failed step.
	Running   string
	Revision  int64
	UpdatedAt time.Time
	UpdatedBy string
	// SearchPath is the search_path of the session that first registered
	// the plan; its steps run with it wherever they are applied from, so
	// the CLI resolves unqualified names as the service does.
	SearchPath string
	Steps      []StepStatus
}

// Shapes is the span of stages the schema may be in: the stage itself, or
// from it to the running phase's target while a phase is in progress.
func (s Status) Shapes() (lo, hi Stage) {
	cur := s.Stage.Shape()
	switch s.Running {
	case PhaseExpand:
		return Pending, Expanded
	case PhaseContract:
		return Migrating, Contracted
	case PhaseRollback:
		// Also a rollback of an interrupted expand: the schema may be
		// partly expanded.
		return Pending, max(cur, Expanded)
	}
	return cur, cur
}

func (s Status) applied(phase string) map[string]bool {
	m := map[string]bool{}
	for _, st := range s.Steps {
		if st.Phase == phase && st.State == stateApplied {
			m[st.Name] = true
		}
	}
	return m
}

// tried reports whether any step of the phase has a record.
func (s Status) tried(phase string) bool {
	for _, st := range s.Steps {
		if st.Phase == phase && st.State != "" {
			return true
		}
	}
	return false
}

const (
	stateApplied = "applied"
	stateFailed  = "failed"
	stateRunning = "running"
)

// Plan returns the registered definition of a plan.
func (r *Registry) Plan(ctx context.Context, name string) (Plan, error) {
	st, err := r.Status(ctx, name)
	return st.Plan, err
}

// Status returns a plan's stage and step progress; an unregistered plan is
// [ErrUnknownPlan].
func (r *Registry) Status(ctx context.Context, name string) (Status, error) {
	return r.status(ctx, r.pool, name)
}

func (r *Registry) status(ctx context.Context, db interface {
	DB
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, name string) (Status, error) {
	var (
		st      Status
		def     []byte
		stage   string
		running *string
	)
	err := db.QueryRow(ctx, `SELECT definition, stage, running, revision, updated_at, updated_by, search_path FROM `+r.t.plans+` WHERE plan = $1`, name).
		Scan(&def, &stage, &running, &st.Revision, &st.UpdatedAt, &st.UpdatedBy, &st.SearchPath)
	if errors.Is(err, pgx.ErrNoRows) {
		return st, fmt.Errorf("%w %q: register it first (a service registers its plans at start-up)", ErrUnknownPlan, name)
	}
	if err != nil {
		return st, fmt.Errorf("expandcontract: status of %s: %w", name, err)
	}
	if err := json.Unmarshal(def, &st.Plan); err != nil {
		return st, fmt.Errorf("expandcontract: plan %s: stored definition is malformed: %w", name, err)
	}
	if st.Stage, err = ParseStage(stage); err != nil {
		return st, fmt.Errorf("expandcontract: plan %s: stored stage: %w", name, err)
	}
	if running != nil {
		st.Running = *running
	}
	rows, err := db.Query(ctx, `SELECT phase, step, state, attempts, last_error, updated_at FROM `+r.t.steps+` WHERE plan = $1`, name)
	if err != nil {
		return st, fmt.Errorf("expandcontract: status of %s: %w", name, err)
	}
	recs, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (StepStatus, error) {
		var s StepStatus
		err := row.Scan(&s.Phase, &s.Name, &s.State, &s.Attempts, &s.LastError, &s.UpdatedAt)
		return s, err
	})
	if err != nil {
		return st, fmt.Errorf("expandcontract: status of %s: %w", name, err)
	}
	for _, ph := range []string{PhaseExpand, PhaseContract, PhaseRollback} {
		for _, s := range st.Plan.Steps(ph) {
			ss := StepStatus{Phase: ph, Name: s.Name}
			for _, rec := range recs {
				if rec.Phase == ph && rec.Name == s.Name {
					ss = rec
				}
			}
			st.Steps = append(st.Steps, ss)
		}
	}
	return st, nil
}

// Plans returns the status of every registered plan, by name.
func (r *Registry) Plans(ctx context.Context) ([]Status, error) {
	rows, err := r.pool.Query(ctx, `SELECT plan FROM `+r.t.plans+` ORDER BY plan`)
	if err != nil {
		return nil, fmt.Errorf("expandcontract: list plans: %w", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("expandcontract: list plans: %w", err)
	}
	out := make([]Status, 0, len(names))
	for _, n := range names {
		st, err := r.Status(ctx, n)
		if err != nil {
			return nil, err
		}
		out = append(out, st)
	}
	return out, nil
}
