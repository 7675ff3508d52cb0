package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
)

func init() {
	commandGroups = append(commandGroups, func(c *cli) *cobra.Command { return c.schemaCmd() })
}

type schemaOpts struct {
	db             string
	backfillSchema string
	lockTimeout    time.Duration
	lockWaitBudget time.Duration
	attempts       int
}

func (c *cli) schemaCmd() *cobra.Command {
	o := &schemaOpts{}
	cmd := &cobra.Command{
		Use:   "schema",
		Short: "Apply expand/contract schema plans: status, expand, migrate, contract, rollback",
		Long: `Apply the expand/contract plans a service registered (package
expandcontract): the service calls Registry.Register at start-up, which
stores each plan with its SQL in the registry, so these commands apply a
plan by name. Steps run with the search_path of the session that registered
the plan.

The database is --db (default: --store when it is a postgres:// URL). The
registry lives in --schema (default "dimmer"), beside the flag store.
--store also gives the contract and rollback guards the fleet registry and
the linked migrations' stages; without it those guards fail.

Exit codes: 0 done (or nothing to do); 2 bad usage or unknown plan;
3 refused by a guard or not possible at the plan's stage; 4 the plan is
being applied by another process; 1 other (a failed step: run the
command again to resume at it).

Locks: each attempt of a step waits at most --lock-timeout (150ms) for its
locks, since every query of the service on that table queues behind a
waiting ALTER; then it leaves the queue, pauses (jittered backoff) and tries
again, for up to --lock-wait-budget (5m). Each retry names the sessions
holding the lock (pid, application, user, state, transaction age).`,
	}
	cmd.PersistentFlags().StringVar(&o.db, "db", os.Getenv("DIMMER_SCHEMA_DB"), "Postgres URL of the database the plans change (env DIMMER_SCHEMA_DB; default --store)")
	cmd.PersistentFlags().StringVar(&o.backfillSchema, "backfill-schema", envOr("DIMMER_BACKFILL_SCHEMA", backfill.DefaultSchema), "schema of the backfill tables, for the backfill-verified check (env DIMMER_BACKFILL_SCHEMA)")
	cmd.PersistentFlags().DurationVar(&o.lockTimeout, "lock-timeout", expandcontract.DefaultLockTimeout,
		"lock_timeout of each attempt of a step: the longest the service's queries queue behind it")
	cmd.PersistentFlags().DurationVar(&o.lockWaitBudget, "lock-wait-budget", expandcontract.DefaultLockWaitBudget,
		"total time a step keeps retrying when its locks are held by others")
	cmd.PersistentFlags().IntVar(&o.attempts, "attempts", 0, "cap on attempts per step on lock timeouts and deadlocks (0: the budget alone bounds them)")
	cmd.AddCommand(c.schemaStatusCmd(o), c.schemaAuditCmd(o), c.schemaVerifyCmd(o),
		c.schemaActionCmd(o, "expand", "Run the plan's expand steps (resumes an interrupted expand)"),
		c.schemaActionCmd(o, "migrate", "Record that the data move (dual writes, backfill) is under way"),
		c.schemaActionCmd(o, "contract", "Run the plan's contract steps once every guard passes"),
		c.schemaActionCmd(o, "rollback", "Undo the expand, also a failed or interrupted one (before contract only)"))
	return cmd
}

// registry opens the plans' database and a registry over it, with the
// fleet, flag store and backfill verifier when --store is given.
// registry opens the plans' database. The commands that only read
// (bounded) give each statement --timeout; applying a step waits for locks
// within --lock-timeout and --lock-wait-budget, and builds indexes for as
// long as they take.
func (c *cli) registry(ctx context.Context, o *schemaOpts, bounded bool) (*expandcontract.Registry, func(), error) {
	url := o.db
	if url == "" && isPostgres(c.storeURL) {
		url = c.storeURL
	}
	if url == "" {
		return nil, nil, usagef("no database: pass --db postgres://... (or a postgres --store), or set DIMMER_SCHEMA_DB")
	}
	if o.lockTimeout < time.Millisecond {
		return nil, nil, usagef("--lock-timeout %v: must be at least 1ms", o.lockTimeout)
	}
	if o.attempts < 0 {
		return nil, nil, usagef("--attempts %d: must not be negative", o.attempts)
	}
	if o.lockWaitBudget <= 0 {
		return nil, nil, usagef("--lock-wait-budget %v: must be positive", o.lockWaitBudget)
	}
	pool, err := c.openPool(ctx, "schema database --db", url, bounded)
	if err != nil {
		return nil, nil, err
	}
	opts := []expandcontract.Option{
		expandcontract.WithSchema(c.schema), expandcontract.WithLockTimeout(o.lockTimeout),
		expandcontract.WithLockWaitBudget(o.lockWaitBudget), expandcontract.WithLogger(c.logger),
	}
	if o.attempts > 0 {
		opts = append(opts, expandcontract.WithAttempts(o.attempts))
	}
	if c.storeURL != "" {
		be, err := c.open(ctx)
		if err != nil {
			pool.Close()
			return nil, nil, err
		}
		opts = append(opts, expandcontract.WithFleet(be.fleet), expandcontract.WithFlagStore(be.store),
			expandcontract.WithVerifier(expandcontract.GuardVerifier(backfill.VerifiedGuard(pool, o.backfillSchema), be.store)))
	}
	reg, err := expandcontract.NewRegistry(pool, opts...)
	if err == nil {
		err = reg.Install(ctx)
	}
	if err != nil {
		pool.Close()
		return nil, nil, fmt.Errorf("schema registry %s: %w", maskDSN(url), err)
	}
	return reg, pool.Close, nil
}

// schemaErr maps the package's errors to the CLI's exit codes.
func schemaErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, expandcontract.ErrUnknownPlan), errors.Is(err, expandcontract.ErrInvalidName):
		return usageError{err}
	case errors.Is(err, expandcontract.ErrWrongStage):
		return refusedErr{err} // the package's message names both stages
	case errors.Is(err, expandcontract.ErrBusy):
		return fmt.Errorf("%w: %w", flags.ErrConflict, err)
	}
	return err
}

func (c *cli) schemaActionCmd(o *schemaOpts, action, short string) *cobra.Command {
	var reason string
	var force bool
	cmd := &cobra.Command{
		Use:   action + " PLAN",
		Short: short,
		Args:  exactArgs(1, "PLAN"),
		RunE: func(cmd *cobra.Command, args []string) error {
			plan := args[0]
			if err := expandcontract.ValidateName(plan); err != nil {
				return usageError{err}
			}
			if force && reason == "" {
				return usagef("--force needs --reason: say why, it goes to the audit trail")
			}
			reason, err := c.reasonArg(reason)
			if err != nil {
				return err
			}
			reg, closeDB, err := c.registry(cmd.Context(), o, false)
			if err != nil {
				return err
			}
			defer closeDB()
			req := expandcontract.Request{Actor: c.actor, Reason: reason, Force: force}
			before, err := reg.Status(cmd.Context(), plan)
			if err != nil {
				return schemaErr(err)
			}
			var st expandcontract.Status
			switch action {
			case "expand":
				st, err = reg.Expand(cmd.Context(), plan, req)
			case "migrate":
				st, err = reg.Migrate(cmd.Context(), plan, req)
			case "contract":
				st, err = reg.Contract(cmd.Context(), plan, req)
			case "rollback":
				st, err = reg.Rollback(cmd.Context(), plan, req)
			}
			if err != nil {
				return schemaErr(err)
			}
			if st.Revision == before.Revision {
				fmt.Fprintf(c.out, "%s: %s (nothing to do)\n", plan, st.Stage)
				return nil
			}
			fmt.Fprintf(c.out, "%s: %s -> %s\n", plan, before.Stage, st.Stage)
			return nil
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why (audited)")
	if action == "contract" || action == "rollback" {
		cmd.Flags().BoolVar(&force, "force", false, "override failed guards (needs --reason; audited; never a rollback after contract)")
	}
	return cmd
}

func (c *cli) schemaVerifyCmd(o *schemaOpts) *cobra.Command {
	var reason string
	cmd := &cobra.Command{
		Use:   "verify PLAN",
		Short: "Count the rows the plan's Transform has not filled yet; recorded for the backfill-verified check",
		Long: `Count the rows whose new shape does not match the plan's Transform (for
plans made by the expandcontract helpers, whose data was copied with the
Transform rather than by a backfill job) and record the count in the
plan's audit trail. The contract's backfill-verified check passes once a
verification since the expand found no row pending at the migration's
current epoch. Run it while migrating, after the copy, before the
migration is complete. Exits 1 when rows are pending.`,
		Args: exactArgs(1, "PLAN"),
		RunE: func(cmd *cobra.Command, args []string) error {
			plan := args[0]
			if err := expandcontract.ValidateName(plan); err != nil {
				return usageError{err}
			}
			reason, err := c.reasonArg(reason)
			if err != nil {
				return err
			}
			reg, closeDB, err := c.registry(cmd.Context(), o, false)
			if err != nil {
				return err
			}
			defer closeDB()
			v, err := reg.VerifyTransform(cmd.Context(), plan, expandcontract.Request{Actor: c.actor, Reason: reason})
			if err != nil {
				if errors.Is(err, expandcontract.ErrInvalidPlan) {
					return usageError{err}
				}
				return schemaErr(err)
			}
			if v.Pending > 0 {
				return fmt.Errorf("%s: %d row(s) not filled by the transform yet: copy them and verify again", plan, v.Pending)
			}
			fmt.Fprintf(c.out, "%s: transform verified, 0 rows pending", plan)
			if v.MigrationStage != "" {
				fmt.Fprintf(c.out, " (migration %s, epoch %d)", v.MigrationStage, v.Epoch)
			}
			fmt.Fprintln(c.out)
			return nil
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why (audited)")
	return cmd
}

func (c *cli) schemaStatusCmd(o *schemaOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "status [PLAN]",
		Short: "Show one plan's steps and go/no-go checks, or a line per plan",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usagef("expected at most one PLAN, got %d arguments", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			reg, closeDB, err := c.registry(cmd.Context(), o, true)
			if err != nil {
				return err
			}
			defer closeDB()
			if len(args) == 1 {
				st, err := reg.Status(cmd.Context(), args[0])
				if err != nil {
					return schemaErr(err)
				}
				return printPlanStatus(cmd.Context(), c.out, reg, st)
			}
			all, err := reg.Plans(cmd.Context())
			if err != nil {
				return err
			}
			if len(all) == 0 {
				fmt.Fprintln(c.out, "no plan has been registered yet")
				return nil
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PLAN\tSTAGE\tRUNNING\tSTEPS APPLIED\tUPDATED")
			for _, st := range all {
				applied, total := 0, 0
				for _, s := range st.Steps {
					if s.Phase == expandcontract.PhaseRollback {
						continue
					}
					total++
					if s.State == "applied" {
						applied++
					}
				}
				running := "-"
				if st.Running != "" {
					running = st.Running + " (interrupted or in progress)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%d/%d\t%s by %s\n", st.Plan.Name, st.Stage, running, applied, total,
					st.UpdatedAt.UTC().Format(time.RFC3339), st.UpdatedBy)
			}
			return tw.Flush()
		},
	}
}

func printPlanStatus(ctx context.Context, w io.Writer, reg *expandcontract.Registry, st expandcontract.Status) error {
	p := st.Plan
	fmt.Fprintf(w, "plan %s: %s  revision %d", p.Name, st.Stage, st.Revision)
	if st.Running != "" {
		fmt.Fprintf(w, "  %s in progress or interrupted", st.Running)
	}
	fmt.Fprintln(w)
	if p.Description != "" {
		fmt.Fprintf(w, "  %s\n", p.Description)
	}
	if p.Migration != "" {
		fmt.Fprintf(w, "  migration %s", p.Migration)
		if p.Backfill {
			fmt.Fprint(w, " (with a backfill)")
		}
		fmt.Fprintln(w)
	}
	for _, s := range st.Steps {
		state := s.State
		if state == "" {
			state = "-"
		}
		fmt.Fprintf(w, "  %-8s %-24s %-8s", s.Phase, s.Name, state)
		if s.Attempts > 0 {
			fmt.Fprintf(w, " attempts %d", s.Attempts)
		}
		if s.State != "applied" && s.LastError != "" {
			fmt.Fprintf(w, "  last error: %s", s.LastError)
		}
		fmt.Fprintln(w)
	}
	var next string
	var checks []flags.CheckResult
	var err error
	switch {
	case st.Running == expandcontract.PhaseExpand:
		fmt.Fprintf(w, "next: run `dimmer schema expand %s` again to resume, or `dimmer schema rollback %s` to undo it\n", p.Name, p.Name)
		next = "rollback"
		checks, err = reg.RollbackChecks(ctx, p.Name)
	case st.Running != "":
		fmt.Fprintf(w, "next: run `dimmer schema %s %s` again to resume\n", st.Running, p.Name)
		return nil
	case st.Stage == expandcontract.Pending || st.Stage == expandcontract.RolledBack:
		fmt.Fprintf(w, "next: expand\n")
		return nil
	case st.Stage == expandcontract.Expanded:
		fmt.Fprintf(w, "next: migrate (or rollback)\n")
		next = "rollback"
		checks, err = reg.RollbackChecks(ctx, p.Name)
	case st.Stage == expandcontract.Migrating:
		next = "contract"
		checks, err = reg.ContractChecks(ctx, p.Name)
	default:
		fmt.Fprintln(w, "contracted: nothing left to do")
		return nil
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "%s checks:\n", next)
	sort.SliceStable(checks, func(i, j int) bool { return !checks[i].Passed && checks[j].Passed })
	ready := true
	for _, ch := range checks {
		mark := "PASS"
		if !ch.Passed {
			mark, ready = "FAIL", false
		}
		fmt.Fprintf(w, "  [%s] %s: %s\n", mark, ch.Name, ch.Detail)
	}
	if ready {
		fmt.Fprintf(w, "verdict: GO for %s\n", next)
	} else {
		fmt.Fprintf(w, "verdict: NO-GO for %s (%d check(s) failing)\n", next, failing(checks))
	}
	return nil
}

func (c *cli) schemaAuditCmd(o *schemaOpts) *cobra.Command {
	var limit int
	cmd := &cobra.Command{
		Use:   "audit PLAN [--limit N]",
		Short: "Print the plan's audit trail, newest first",
		Args:  exactArgs(1, "PLAN"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if limit < 0 {
				return usagef("--limit %d: must not be negative", limit)
			}
			reg, closeDB, err := c.registry(cmd.Context(), o, true)
			if err != nil {
				return err
			}
			defer closeDB()
			entries, err := reg.Audit(cmd.Context(), args[0], limit)
			if err != nil {
				return err
			}
			if len(entries) == 0 {
				fmt.Fprintf(c.out, "%s: no audit entries\n", args[0])
			}
			for _, e := range entries {
				forced := ""
				if e.Forced {
					forced = " FORCED"
				}
				fmt.Fprintf(c.out, "%s  %-10s%s  %s %s -> %s  by %s", e.At.Format(time.RFC3339), e.Outcome, forced, e.Action, e.From, e.To, escapeControls(e.Actor))
				if e.Reason != "" {
					fmt.Fprintf(c.out, ": %s", escapeControls(e.Reason))
				}
				fmt.Fprintln(c.out)
				for _, ch := range e.Checks {
					if !ch.Passed {
						fmt.Fprintf(c.out, "    failed %s: %s\n", ch.Name, ch.Detail)
					}
				}
				if e.Detail != "" {
					fmt.Fprintf(c.out, "    %s\n", e.Detail)
				}
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&limit, "limit", 0, "newest N entries (0: all)")
	return cmd
}

// refusedErr is a step refused by the rules (exit 3) that carries its own
// message rather than a list of checks.
type refusedErr struct{ error }

func (e refusedErr) Unwrap() error { return e.error }
