package expandcontract

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dimmer-dev/dimmer/flags"
)

// Request is who asks for a phase and why, for the audit trail. Force
// overrides failed guards of a contract or rollback (it needs a Reason and
// is audited); it never allows a rollback after contract.
type Request struct {
	Actor  string
	Reason string
	Force  bool
}

// ApplicationName is the application_name of the connection applying a
// plan's steps, so an operator sees it in pg_stat_activity.
func ApplicationName(plan string) string { return "dimmer-schema:" + plan }

// Expand runs the plan's expand steps and moves it to [Expanded]. Steps
// already applied (by an earlier, interrupted run) are skipped; a plan at or
// past expanded is left as it is, so a service may call Expand at every
// start. A plan that was rolled back can be expanded again.
func (r *Registry) Expand(ctx context.Context, plan string, req Request) (Status, error) {
	return r.apply(ctx, plan, PhaseExpand, req)
}

// Migrate records that the data move has begun (dual writes and the
// backfill under the linked dimmer migration): [Expanded] -> [Migrating].
// It runs no DDL.
func (r *Registry) Migrate(ctx context.Context, plan string, req Request) (Status, error) {
	return r.apply(ctx, plan, "migrate", req)
}

// Contract runs the plan's contract steps and moves it to [Contracted],
// after the contract guards pass (see [Registry.ContractChecks]); a refusal
// is a *flags.RefusedError listing every failed check, and is audited.
// Contract starts from [Migrating]. The phase is marked running before the
// guards are judged, so no build that needs the old shape passes
// [Registry.Check] between the fleet check and the DDL; a contract
// interrupted after a step was tried resumes without judging the guards
// again, since part of the old shape may already be gone.
func (r *Registry) Contract(ctx context.Context, plan string, req Request) (Status, error) {
	return r.apply(ctx, plan, PhaseContract, req)
}

// Rollback runs the plan's rollback steps, undoing the expand, and moves it
// to [RolledBack]. It is offered before contract only: once a contract step
// has been applied the old shape is gone and rollback is refused with
// [ErrWrongStage] (even forced). Its guards: no live instance declares a
// range that needs the expanded shape, and the linked migration is off.
//
// An expand that failed or was interrupted (one that can never succeed,
// such as a unique index over duplicate values) can be rolled back too:
// first the invalid indexes its unfinished concurrent steps left are
// dropped (by their identity), then the rollback steps run. They run over a
// partial expand, so they must be idempotent (IF EXISTS). Afterwards the
// plan is rolled back and a corrected definition may be registered.
func (r *Registry) Rollback(ctx context.Context, plan string, req Request) (Status, error) {
	return r.apply(ctx, plan, PhaseRollback, req)
}

// target returns the stage the action ends in, whether it is already
// there (a no-op), or why it is not possible from st.
func target(action string, st Status) (to Stage, done bool, err error) {
	wrong := func(format string, args ...any) (Stage, bool, error) {
		return 0, false, fmt.Errorf("%w: plan %s is %s: %s", ErrWrongStage, st.Plan.Name, st.Stage, fmt.Sprintf(format, args...))
	}
	if st.Running != "" && st.Running != action && (action != PhaseRollback || st.Running != PhaseExpand) {
		if st.Running == PhaseExpand {
			return wrong("its expand was interrupted: run expand again to finish it, or rollback to undo it")
		}
		return wrong("its %s was interrupted: run %s again to finish it first", st.Running, st.Running)
	}
	switch action {
	case PhaseExpand:
		switch st.Stage {
		case Pending, RolledBack:
			return Expanded, false, nil
		}
		return Expanded, true, nil
	case "migrate":
		switch st.Stage {
		case Expanded:
			return Migrating, false, nil
		case Migrating, Contracted:
			return Migrating, true, nil
		}
		return wrong("expand it first")
	case PhaseContract:
		switch st.Stage {
		case Migrating:
			return Contracted, false, nil
		case Contracted:
			return Contracted, true, nil
		case Expanded:
			return wrong("run migrate first: the data move (dual writes, backfill) must be under way before the old shape can go")
		}
		return wrong("expand and migrate it first")
	case PhaseRollback:
		if st.Stage == Contracted || len(st.applied(PhaseContract)) > 0 {
			return wrong("rollback is refused after contract: the contract removed the old shape, so it cannot be restored by undoing the expand; write a new plan")
		}
		switch st.Stage {
		case RolledBack:
			return RolledBack, true, nil
		case Pending:
			if st.Running == "" && len(st.applied(PhaseExpand)) == 0 {
				return wrong("nothing was expanded, nothing to roll back")
			}
		}
		return RolledBack, false, nil
	}
	return wrong("unknown action %q", action)
}

func (r *Registry) apply(ctx context.Context, plan, action string, req Request) (Status, error) {
	if err := ValidateName(plan); err != nil {
		return Status{}, err
	}
	if req.Force && strings.TrimSpace(req.Reason) == "" {
		return Status{}, errors.New("expandcontract: a forced request needs a reason (it goes to the audit trail)")
	}
	if req.Actor == "" {
		req.Actor = "unknown"
	}
	// A cheap look first, so a no-op needs no dedicated connection.
	st, err := r.Status(ctx, plan)
	if err != nil {
		return st, err
	}
	if _, done, err := target(action, st); err != nil || done {
		return st, err
	}
	conn, err := r.connect(ctx, plan)
	if err != nil {
		return st, err
	}
	defer conn.Close(context.Background())
	if err := r.lock(ctx, conn, plan); err != nil {
		if !errors.Is(err, ErrBusy) {
			// The lock may have been granted with the answer lost.
			r.release(ctx, conn, plan)
		}
		return st, err
	}
	defer r.release(ctx, conn, plan)
	// Under the lock, the stored state is the truth.
	if st, err = r.status(ctx, conn, plan); err != nil {
		return st, err
	}
	to, done, err := target(action, st)
	if err != nil || done {
		return st, err
	}
	if st.SearchPath != "" {
		if _, err := conn.Exec(ctx, `SELECT set_config('search_path', $1, false)`, st.SearchPath); err != nil {
			return st, fmt.Errorf("expandcontract: plan %s: search_path %q: %w", plan, st.SearchPath, err)
		}
	}
	entry := AuditEntry{Plan: plan, Actor: req.Actor, Action: action, From: st.Stage.String(), To: to.String(), Reason: req.Reason}
	// Mark the phase as running before judging the guards and running the
	// first step: from now on Check refuses builds that cannot run with the
	// target shape, so none can start between the fleet check and the DDL.
	// The guards are judged until a step of the phase has been tried (also
	// after a crash right after the mark); once one has, the shape is
	// already changing and the phase may only go forward.
	judge := (action == PhaseContract || action == PhaseRollback) && !st.tried(action)
	// What a refusal restores: an expand interrupted before a rollback was
	// asked stays interrupted; the refused phase's own mark goes.
	wasRunning := st.Running
	if wasRunning == action {
		wasRunning = ""
	}
	if st.Running != action && action != "migrate" {
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if action == PhaseExpand && st.Stage == RolledBack {
				if _, err := tx.Exec(ctx, `DELETE FROM `+r.t.steps+` WHERE plan = $1 AND phase = $2`, plan, PhaseRollback); err != nil {
					return err
				}
			}
			_, err := tx.Exec(ctx, `UPDATE `+r.t.plans+` SET running = $2, updated_at = now(), updated_by = $3 WHERE plan = $1`,
				plan, action, req.Actor)
			return err
		})
		if err != nil {
			return st, fmt.Errorf("expandcontract: plan %s: start %s: %w", plan, action, err)
		}
		st.Running = action
	}
	if judge {
		checks, err := r.checks(ctx, action, st.Plan)
		if err != nil {
			return st, err
		}
		entry.Checks = checks
		if failed := failedChecks(checks); len(failed) > 0 {
			if !req.Force {
				// A refused rollback of an interrupted expand leaves the
				// expand interrupted, as it found it.
				if _, err := conn.Exec(context.WithoutCancel(ctx), `UPDATE `+r.t.plans+` SET running = nullif($2, '') WHERE plan = $1`, plan, wasRunning); err != nil {
					return st, fmt.Errorf("expandcontract: plan %s: %s refused, and clearing its start failed: %w", plan, action, err)
				}
				st.Running = wasRunning
				entry.Outcome = OutcomeRefused
				if err := r.appendAudit(ctx, r.pool, entry); err != nil {
					r.logger.Warn("expandcontract: audit of a refusal failed", "plan", plan, "err", err)
				}
				return st, &flags.RefusedError{Migration: plan, From: st.Stage.String(), To: to.String(), Failed: failed}
			}
			entry.Forced = true
		}
	}
	if action == "migrate" {
		return r.finish(ctx, conn, st, to, entry, nil)
	}
	if action == PhaseRollback {
		dropped, err := r.dropLeftovers(ctx, conn, st)
		if len(dropped) > 0 {
			entry.Detail = "dropped what failed expand steps left: " + strings.Join(dropped, "; ")
		}
		if err != nil {
			err = &StepError{Plan: plan, Phase: action, Step: "drop-leftovers", Attempts: 1, Err: err}
			entry.Outcome, entry.Detail = OutcomeFailed, err.Error()
			if aerr := r.appendAudit(context.WithoutCancel(ctx), r.pool, entry); aerr != nil {
				r.logger.Warn("expandcontract: audit of a failure failed", "plan", plan, "err", aerr)
			}
			return st, err
		}
	}
	// A second session watches the runner's lock waits; it is its own so
	// that it still gets through when the service's pool is saturated by
	// queries queued behind the DDL.
	var mon querier = r.pool
	if mc, err := r.connectMonitor(ctx, plan); err != nil {
		r.logger.Warn("expandcontract: no monitor session; lock holders are looked up through the pool", "plan", plan, "err", err)
	} else {
		defer mc.Close(context.Background())
		mon = mc
	}
	applied := st.applied(action)
	for _, step := range st.Plan.Steps(action) {
		if applied[step.Name] && !r.invalidIndex(ctx, conn, plan, step) {
			continue
		}
		if err := r.runStep(ctx, conn, mon, plan, action, step); err != nil {
			entry.Outcome, entry.Detail = OutcomeFailed, err.Error()
			if aerr := r.appendAudit(context.WithoutCancel(ctx), r.pool, entry); aerr != nil {
				r.logger.Warn("expandcontract: audit of a failure failed", "plan", plan, "err", aerr)
			}
			st, serr := r.Status(context.WithoutCancel(ctx), plan)
			if serr != nil {
				r.logger.Warn("expandcontract: status after a failure", "plan", plan, "err", serr)
			}
			return st, err
		}
	}
	var cleanup []string
	if action == PhaseRollback {
		// The expand is undone: its records go, so a new expand runs
		// every step again.
		cleanup = []string{PhaseExpand, PhaseContract}
	}
	return r.finish(ctx, conn, st, to, entry, cleanup)
}

// invalidIndex reports whether a step recorded as applied built an index
// that is there but not valid (recorded by a build that did not check, or
// invalidated since): on resume such a step runs again, which drops and
// rebuilds it.
func (r *Registry) invalidIndex(ctx context.Context, conn *pgx.Conn, plan string, s Step) bool {
	idx := s.builtIndex()
	if idx == "" {
		return false
	}
	ix, err := r.lookupIndex(ctx, conn, idx)
	if err != nil || !ix.exists || ix.valid {
		return false
	}
	r.logger.Warn("expandcontract: a step recorded as applied left an invalid index; running it again", "plan", plan, "step", s.Name, "index", ix.name)
	return true
}

// dropLeftovers drops the invalid indexes that concurrent expand steps
// which did not complete left behind (a failed unique build, a killed
// runner), found by identity: a rollback's own steps undo what the expand
// applied, and cannot be expected to know about a half-built index.
func (r *Registry) dropLeftovers(ctx context.Context, conn *pgx.Conn, st Status) ([]string, error) {
	var dropped []string
	for _, s := range st.Plan.Expand {
		idx := s.builtIndex()
		if idx == "" || st.applied(PhaseExpand)[s.Name] {
			continue
		}
		ix, err := r.lookupIndex(ctx, conn, idx)
		if err != nil {
			return dropped, err
		}
		if !ix.exists || ix.valid {
			continue
		}
		r.logger.Warn("expandcontract: rollback drops the invalid index a failed expand step left", "plan", st.Plan.Name, "step", s.Name, "index", ix.name)
		if err := r.dropIndex(ctx, conn, ix); err != nil {
			return dropped, err
		}
		dropped = append(dropped, fmt.Sprintf("invalid index %s of step %s", ix.name, s.Name))
	}
	return dropped, nil
}

func (r *Registry) finish(ctx context.Context, conn *pgx.Conn, st Status, to Stage, entry AuditEntry, clear []string) (Status, error) {
	entry.Outcome = OutcomeApplied
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		for _, ph := range clear {
			if _, err := tx.Exec(ctx, `DELETE FROM `+r.t.steps+` WHERE plan = $1 AND phase = $2`, st.Plan.Name, ph); err != nil {
				return err
			}
		}
		if _, err := tx.Exec(ctx, `UPDATE `+r.t.plans+` SET stage = $2, running = NULL, revision = revision + 1, updated_at = now(), updated_by = $3 WHERE plan = $1`,
			st.Plan.Name, to.String(), entry.Actor); err != nil {
			return err
		}
		return r.appendAudit(ctx, tx, entry)
	})
	if err != nil {
		return st, fmt.Errorf("expandcontract: plan %s: record %s: %w", st.Plan.Name, to, err)
	}
	r.logger.Info("expandcontract: plan moved", "plan", st.Plan.Name, "from", entry.From, "to", to.String(), "actor", entry.Actor, "forced", entry.Forced)
	return r.status(ctx, conn, st.Plan.Name)
}

// connect opens the dedicated connection a phase runs on: its session holds
// the plan's advisory lock, and a dead runner is noticed by the server
// (client_connection_check_interval) so its DDL does not keep its locks.
func (r *Registry) connect(ctx context.Context, plan string) (*pgx.Conn, error) {
	cfg := r.pool.Config().ConnConfig.Copy()
	cfg.RuntimeParams["application_name"] = ApplicationName(plan)
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("expandcontract: plan %s: connect: %w", plan, err)
	}
	if _, err := conn.Exec(ctx, `SET client_connection_check_interval = '1s'`); err != nil && !isCode(err, "42704") {
		conn.Close(context.Background())
		return nil, fmt.Errorf("expandcontract: plan %s: %w", plan, err)
	}
	return conn, nil
}

func (r *Registry) lockKey(plan string) string {
	return "dimmer/expandcontract/" + r.schema + "/" + plan
}

func (r *Registry) lock(ctx context.Context, conn *pgx.Conn, plan string) error {
	var ok bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtextextended($1, 0))`, r.lockKey(plan)).Scan(&ok); err != nil {
		return fmt.Errorf("expandcontract: plan %s: lock: %w", plan, err)
	}
	if ok {
		return nil
	}
	// Say who holds it, so an operator can tell a live run from a stuck one.
	holder := "unknown session"
	var pid int32
	var app, state string
	var since time.Time
	err := conn.QueryRow(ctx, `
SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.state, ''), coalesce(a.backend_start, now())
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)
LIMIT 1`, r.lockKey(plan)).Scan(&pid, &app, &state, &since)
	if err == nil {
		holder = fmt.Sprintf("pid %d (%s, %s, connected %s)", pid, app, state, since.UTC().Format(time.RFC3339))
	}
	return fmt.Errorf("%w: plan %s is held by %s", ErrBusy, plan, holder)
}

// releaseTimeout bounds how long a run waits, on its way out, for the
// server to give its plan lock back.
const releaseTimeout = 10 * time.Second

// release gives the plan lock back before the run returns, so whoever runs
// the next phase right away (a deploy script, the same test) does not find
// the plan busy. Closing the connection is not enough: the server drops a
// session's locks when its backend exits, a moment after the client has
// gone. An unlock on the session is done when the server answers. A session
// that cannot take it (a query cancelled with the run's context closes the
// connection; a transaction left aborted) is ended through the pool, and
// pg_terminate_backend with a timeout waits until its backend is gone.
func (r *Registry) release(ctx context.Context, conn *pgx.Conn, plan string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), releaseTimeout)
	defer cancel()
	if !conn.IsClosed() {
		_, err := conn.Exec(ctx, `SELECT pg_advisory_unlock(hashtextextended($1, 0))`, r.lockKey(plan))
		if err == nil {
			return
		}
		r.logger.Warn("expandcontract: unlock failed; ending the runner's session", "plan", plan, "err", err)
	}
	pid := conn.PgConn().PID()
	conn.Close(ctx)
	var ended bool
	err := r.pool.QueryRow(ctx, `
SELECT pg_terminate_backend(l.pid, $3)
FROM pg_locks l
WHERE l.pid = $1 AND l.locktype = 'advisory' AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($2, 0)`,
		int64(pid), r.lockKey(plan), releaseTimeout.Milliseconds()).Scan(&ended)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		// The session is gone, and its lock with it.
	case err != nil:
		r.logger.Warn("expandcontract: the runner's session may still hold the plan lock", "plan", plan, "pid", pid, "err", err)
	case !ended:
		r.logger.Warn("expandcontract: the runner's session did not end in time; it still holds the plan lock", "plan", plan, "pid", pid, "waited", releaseTimeout)
	}
}

// runStep applies one step with retries on lock timeouts and deadlocks,
// within the lock-wait budget.
//
// Once an attempt has timed out, the runner knows which tables it waited
// for and who held them. While a session whose transaction is older than
// the lock timeout still holds a lock on one of them, another attempt would
// only time out again after queueing the service's queries once more, so the
// runner waits (with the same backoff) without entering the lock queue.
func (r *Registry) runStep(ctx context.Context, conn *pgx.Conn, mon querier, plan, phase string, s Step) error {
	start := time.Now()
	deadline := start.Add(r.lockWaitBudget)
	lt := fmt.Sprintf("%dms", r.lockTimeout.Milliseconds())
	var last blocked
	for attempt := 1; ; attempt++ {
		if len(last.relations) > 0 && attempt > 1 {
			holders, err := longHolders(ctx, mon, conn.PgConn().PID(), last, r.lockTimeout)
			if err == nil && holders != "" {
				// This attempt is spent waiting outside the queue.
				last.holders = holders
				err := fmt.Errorf("%w: waiting outside the lock queue, blocked by %s", ErrLockTimeout, holders)
				pause, left := r.pause(attempt), time.Until(deadline)
				if left <= pause || (r.attempts > 0 && attempt >= r.attempts) || ctx.Err() != nil {
					why := "lock-wait budget " + r.lockWaitBudget.String() + " spent"
					if r.attempts > 0 && attempt >= r.attempts {
						why = fmt.Sprintf("%d attempts made", attempt)
					}
					err = fmt.Errorf("%w (%s): blocked by %s", ErrLockTimeout, why, holders)
					_ = r.record(context.WithoutCancel(ctx), r.pool, plan, phase, s.Name, stateFailed, err.Error())
					return &StepError{Plan: plan, Phase: phase, Step: s.Name, Attempts: attempt, Elapsed: time.Since(start), Err: err}
				}
				r.logger.Warn("expandcontract: step waits outside the lock queue while a long transaction holds its table",
					"plan", plan, "phase", phase, "step", s.Name, "attempt", attempt, "blocked_by", holders,
					"retry_in", pause.Round(time.Millisecond), "budget_left", left.Round(time.Second))
				_ = r.record(context.WithoutCancel(ctx), r.pool, plan, phase, s.Name, stateFailed, err.Error())
				if sleep(ctx, pause) == nil {
					continue
				}
			}
		}
		watch := r.watchBlockers(ctx, mon, conn.PgConn().PID())
		var err error
		if s.Concurrently {
			clt := lt
			if s.builtIndex() != "" {
				// CREATE INDEX CONCURRENTLY waits for every older transaction,
				// and a timed-out build leaves an invalid index to drop and
				// build again. Its waits queue no query of the service (its
				// lock does not conflict with reads and writes), so it may
				// wait for the rest of the budget.
				clt = fmt.Sprintf("%dms", max(time.Until(deadline), r.lockTimeout).Milliseconds())
			}
			err = r.runConcurrent(ctx, conn, plan, phase, s, clt)
		} else {
			err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
				if _, err := tx.Exec(ctx, `SELECT set_config('lock_timeout', $1, true)`, lt); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, s.SQL); err != nil {
					return err
				}
				return r.record(ctx, tx, plan, phase, s.Name, stateApplied, "")
			})
		}
		if b := watch(); b.holders != "" {
			last = b
		}
		if err == nil {
			r.logger.Info("expandcontract: step applied", "plan", plan, "phase", phase, "step", s.Name, "attempts", attempt, "elapsed", time.Since(start))
			return nil
		}
		lockErr := isCode(err, "55P03") || isCode(err, "40P01")
		if lockErr && last.holders != "" {
			err = fmt.Errorf("%w (blocked by %s)", err, last.holders)
		}
		pause := r.pause(attempt)
		left := time.Until(deadline)
		retry := lockErr && (r.attempts == 0 || attempt < r.attempts) && left > pause && ctx.Err() == nil && !conn.IsClosed()
		if retry {
			r.logger.Warn("expandcontract: step gave up its place in the lock queue; retrying",
				"plan", plan, "phase", phase, "step", s.Name, "attempt", attempt, "blocked_by", last.holders,
				"lock_timeout", r.lockTimeout, "retry_in", pause.Round(time.Millisecond), "budget_left", left.Round(time.Second), "err", err)
			_ = r.record(context.WithoutCancel(ctx), r.pool, plan, phase, s.Name, stateFailed, err.Error())
			if werr := sleep(ctx, pause); werr == nil {
				continue
			}
		}
		if isCode(err, "55P03") {
			why := "lock-wait budget " + r.lockWaitBudget.String() + " spent"
			if r.attempts > 0 && attempt >= r.attempts {
				why = fmt.Sprintf("%d attempts made", attempt)
			}
			err = fmt.Errorf("%w (%s): %w", ErrLockTimeout, why, err)
		}
		_ = r.record(context.WithoutCancel(ctx), r.pool, plan, phase, s.Name, stateFailed, err.Error())
		return &StepError{Plan: plan, Phase: phase, Step: s.Name, Attempts: attempt, Elapsed: time.Since(start), Err: err}
	}
}

// blocked is what an attempt waited for: the tables (oids), the lock modes
// it asked for and who held them.
type blocked struct {
	relations []uint32
	modes     []string
	holders   string
}

// conflicts lists, for each table lock mode, the modes it conflicts with
// (the table in the Postgres manual, "Explicit Locking").
var conflicts = map[string][]string{
	"AccessShareLock":          {"AccessExclusiveLock"},
	"RowShareLock":             {"ExclusiveLock", "AccessExclusiveLock"},
	"RowExclusiveLock":         {"ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"},
	"ShareUpdateExclusiveLock": {"ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"},
	"ShareLock":                {"RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"},
	"ShareRowExclusiveLock":    {"RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"},
	"ExclusiveLock":            {"RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"},
	"AccessExclusiveLock":      {"AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"},
}

// conflicting is every mode that conflicts with one of b's wanted modes.
func (b blocked) conflicting() []string {
	seen := map[string]bool{}
	var out []string
	for _, m := range b.modes {
		for _, c := range conflicts[m] {
			if !seen[c] {
				seen[c] = true
				out = append(out, c)
			}
		}
	}
	return out
}

// querier is what lock waits are looked up through: the runner's monitor
// session (*pgx.Conn), or the pool.
type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// connectMonitor opens the session that watches a phase's lock waits.
func (r *Registry) connectMonitor(ctx context.Context, plan string) (*pgx.Conn, error) {
	cfg := r.pool.Config().ConnConfig.Copy()
	cfg.RuntimeParams["application_name"] = ApplicationName(plan) + " monitor"
	return pgx.ConnectConfig(ctx, cfg)
}

// watchBlockers looks, while an attempt runs, at whether the runner's
// backend (pid) waits for a lock, and if so at who holds it, so the retry
// and the final error can name them. It first looks after a quarter of the
// lock timeout, then ever less often, until it has seen a wait. The returned function stops the watch
// and returns what it saw (nothing when the attempt never waited).
func (r *Registry) watchBlockers(ctx context.Context, mon querier, pid uint32) func() blocked {
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	var seen blocked
	go func() {
		defer close(done)
		every := max(r.lockTimeout/4, 5*time.Millisecond)
		for {
			if sleep(wctx, every) != nil {
				return
			}
			// A long wait (a concurrent build) is looked at less and less often.
			every = min(every*2, time.Second)
			// Not cancelled mid-query by the stop: a *pgx.Conn whose query
			// is cancelled is closed.
			qctx, qcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			seen = blockers(qctx, mon, pid)
			qcancel()
			if len(seen.relations) > 0 {
				return
			}
		}
	}()
	return func() blocked {
		cancel()
		<-done
		return seen
	}
}

// blockerSQL describes sessions: pid, application, user, state, age of
// their transaction and the locks they hold on the tables $2. Query texts
// are left out: they may carry the service's data.
const blockerSQL = `SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.usename::text, ''), coalesce(a.state, ''),
	coalesce(extract(epoch FROM now() - a.xact_start), 0)::float8,
	coalesce((SELECT string_agg(DISTINCT l.mode || ' on ' || l.relation::regclass::text, ', ')
		FROM pg_locks l WHERE l.pid = a.pid AND l.granted AND l.relation = ANY($2::oid[])), '')
FROM pg_stat_activity a`

// blockers names the sessions blocking pid and the tables it waits for.
func blockers(ctx context.Context, mon querier, pid uint32) blocked {
	var b blocked
	rows, err := mon.Query(ctx, `SELECT relation, mode FROM pg_locks WHERE pid = $1 AND NOT granted AND relation IS NOT NULL`, int64(pid))
	if err != nil {
		return b
	}
	for rows.Next() {
		var rel uint32
		var mode string
		if err := rows.Scan(&rel, &mode); err != nil {
			rows.Close()
			return blocked{}
		}
		b.relations, b.modes = append(b.relations, rel), append(b.modes, mode)
	}
	rows.Close()
	if len(b.relations) == 0 {
		return b
	}
	b.holders = describeSessions(ctx, mon, blockerSQL+` WHERE a.pid = ANY(pg_blocking_pids($1)) ORDER BY a.pid`, int64(pid), b.relations)
	return b
}

// longHolders names the client sessions other than pid holding a lock that
// conflicts with what b waited for, on one of b's tables, inside a
// transaction older than the lock timeout.
// Autovacuum is left out: it yields to a waiting lock request on its own,
// so an attempt is what makes it step aside.
func longHolders(ctx context.Context, mon querier, pid uint32, b blocked, lockTimeout time.Duration) (string, error) {
	modes := b.conflicting()
	if len(modes) == 0 {
		return "", nil
	}
	var held bool
	if err := mon.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted AND l.relation = ANY($2::oid[]) AND l.mode = ANY($4::text[]) AND l.pid <> $1
	AND a.xact_start < now() - $3::interval AND a.backend_type = 'client backend')`,
		int64(pid), b.relations, lockTimeout.String(), modes).Scan(&held); err != nil || !held {
		return "", err
	}
	return describeSessions(ctx, mon, blockerSQL+` WHERE a.pid <> $1 AND a.xact_start < now() - $3::interval AND a.backend_type = 'client backend'
	AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.granted AND l.relation = ANY($2::oid[]) AND l.mode = ANY($4::text[])) ORDER BY a.pid`,
		int64(pid), b.relations, lockTimeout.String(), modes), nil
}

func describeSessions(ctx context.Context, mon querier, sql string, args ...any) string {
	rows, err := mon.Query(ctx, sql, args...)
	if err != nil {
		return ""
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var (
			bpid             int32
			app, user, state string
			age              float64
			locks            string
		)
		if rows.Scan(&bpid, &app, &user, &state, &age, &locks) != nil {
			break
		}
		d := fmt.Sprintf("pid %d (application %q, user %s, %s", bpid, app, user, state)
		if age > 0 {
			d += fmt.Sprintf(", transaction open %v", (time.Duration(age * float64(time.Second))).Round(time.Millisecond))
		}
		if locks != "" {
			d += ", holds " + locks
		}
		out = append(out, d+")")
	}
	return strings.Join(out, "; ")
}

func (r *Registry) runConcurrent(ctx context.Context, conn *pgx.Conn, plan, phase string, s Step, lt string) error {
	if _, err := conn.Exec(ctx, `SELECT set_config('lock_timeout', $1, false)`, lt); err != nil {
		return err
	}
	defer conn.Exec(context.WithoutCancel(ctx), `RESET lock_timeout`) //nolint:errcheck // the connection is closed after the phase anyway
	idx := s.builtIndex()
	if idx != "" {
		found, err := r.lookupIndex(ctx, conn, idx)
		switch {
		case err != nil:
			return err
		case found.exists && found.valid:
			// A previous run built it and died before recording it.
			r.logger.Info("expandcontract: index of an interrupted step is valid; recording it", "plan", plan, "step", s.Name, "index", found.name)
			return r.record(ctx, conn, plan, phase, s.Name, stateApplied, "")
		case found.exists:
			r.logger.Warn("expandcontract: dropping the invalid index an interrupted build left", "plan", plan, "step", s.Name, "index", found.name)
			if err := r.dropIndex(ctx, conn, found); err != nil {
				return err
			}
		}
	}
	if err := r.record(ctx, conn, plan, phase, s.Name, stateRunning, ""); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, s.SQL); err != nil {
		return err
	}
	if idx != "" {
		// The statement may have succeeded without building anything (IF
		// NOT EXISTS over an index another session left invalid meanwhile):
		// only a valid index, found by its identity, counts as applied.
		found, err := r.lookupIndex(ctx, conn, idx)
		switch {
		case err != nil:
			return err
		case !found.exists:
			return fmt.Errorf("%w: step %s ran, but index %s does not exist: set the step's Index to the name the SQL creates", ErrInvalidIndex, s.Name, idx)
		case !found.valid:
			if err := r.dropIndex(ctx, conn, found); err != nil {
				return err
			}
			return fmt.Errorf("%w: index %s (oid %d) is not valid after the build; it was dropped", ErrInvalidIndex, found.name, found.oid)
		}
	}
	return r.record(ctx, conn, plan, phase, s.Name, stateApplied, "")
}

// index is what the catalog says about the index a concurrent step builds,
// found by its name as SQL text and then known by its oid.
type index struct {
	exists, valid bool
	oid           uint32
	// name is the index's qualified, quoted name derived from its oid, safe
	// to splice into DDL whatever characters it has.
	name string
}

func (r *Registry) lookupIndex(ctx context.Context, conn *pgx.Conn, sqlName string) (index, error) {
	var ix index
	err := conn.QueryRow(ctx, `SELECT c.oid, i.indisvalid AND i.indisready, c.oid::regclass::text
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indexrelid = to_regclass($1)`, sqlName).Scan(&ix.oid, &ix.valid, &ix.name)
	if errors.Is(err, pgx.ErrNoRows) {
		return index{}, nil
	}
	if err != nil {
		// to_regclass raises on text that is not a name at all.
		return index{}, fmt.Errorf("look up index %s: %w", sqlName, err)
	}
	ix.exists = true
	return ix, nil
}

// dropIndex drops an index by its identity: the name comes from its oid,
// and the drop is skipped when that oid is gone (a concurrent runner
// dropped it).
func (r *Registry) dropIndex(ctx context.Context, conn *pgx.Conn, ix index) error {
	var name *string
	if err := conn.QueryRow(ctx, `SELECT $1::oid::regclass::text FROM pg_class WHERE oid = $1`, ix.oid).Scan(&name); err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		return fmt.Errorf("drop invalid index %s: %w", ix.name, err)
	}
	if _, err := conn.Exec(ctx, `DROP INDEX CONCURRENTLY IF EXISTS `+*name); err != nil {
		return fmt.Errorf("drop invalid index %s: %w", ix.name, err)
	}
	return nil
}

// record notes a step's state; attempts counts every try over all runs.
func (r *Registry) record(ctx context.Context, db DB, plan, phase, step, state string, lastErr string) error {
	_, err := db.Exec(ctx, `INSERT INTO `+r.t.steps+` (plan, phase, step, state, attempts, last_error, updated_at)
VALUES ($1, $2, $3, $4, 1, $5, now())
ON CONFLICT (plan, phase, step) DO UPDATE SET state = $4, last_error = $5, updated_at = now(),
	attempts = `+r.t.steps+`.attempts + CASE WHEN $4 IN ('applied', 'failed') AND `+r.t.steps+`.state = 'running' THEN 0 ELSE 1 END`,
		plan, phase, step, state, lastErr)
	return err
}

func (r *Registry) pause(attempt int) time.Duration {
	d := r.backoff << min(attempt-1, 20)
	if d > r.maxBackoff || d <= 0 {
		d = r.maxBackoff
	}
	// Full jitter in [d/2, d): runners of several plans do not retry in step.
	return d/2 + rand.N(d/2+1)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func isCode(err error, code string) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == code
}

func failedChecks(cs []flags.CheckResult) []flags.CheckResult {
	var out []flags.CheckResult
	for _, c := range cs {
		if !c.Passed {
			out = append(out, c)
		}
	}
	return out
}
