package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/user"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/flags"
)

// Exit codes.
const (
	exitOK       = 0
	exitError    = 1
	exitUsage    = 2
	exitRefused  = 3
	exitConflict = 4
)

// usageError marks bad usage (exit 2): what the operator typed is wrong.
// It is the only way to exit 2; nothing is classified by its text.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

type cli struct {
	storeURL string
	schema   string
	prefix   string
	actor    string
	out      io.Writer
	timeout  time.Duration
	envErr   error // a DIMMER_* default that does not parse
	// readOnly: the command only reads the flag store, which it then
	// checks rather than installs (a misspelt --schema is an error, not an
	// empty store, and a read-only role can read).
	readOnly bool
	logger   *slog.Logger
	be       *backend
	red      *redactor
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	// The outcome is printed to stdout and the exit code; logs only say
	// what went wrong on the way.
	// Nothing written carries a password given to this run.
	red := newRedactor(args, environ())
	stdout, stderr = red.writer(stdout), red.writer(stderr)
	c := &cli{out: stdout, red: red, logger: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
	routeRedisLogs(c.logger)
	root := c.rootCmd()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if c.be != nil {
		c.be.close()
	}
	if err == nil {
		return exitOK
	}
	fmt.Fprintln(stderr, "dimmer:", err)
	return exitCode(err)
}

// exitCode maps an error to the documented exit codes by its type: a
// usageError is bad usage, a *flags.RefusedError a refusal, ErrConflict a
// conflict; everything else (a store that cannot be reached, a corrupt
// stored flag) is 1, whatever its text says.
func exitCode(err error) int {
	if err == nil {
		return exitOK
	}
	var refused *flags.RefusedError
	var ue usageError
	switch {
	case errors.As(err, &ue), errors.Is(err, flags.ErrInvalidRequest),
		errors.Is(err, backfill.ErrInvalidJob), errors.Is(err, backfill.ErrUnknownJob):
		return exitUsage
	case errors.As(err, &refused), errors.As(err, new(refusedErr)), errors.Is(err, backfill.ErrStageNotReady):
		return exitRefused
	case errors.Is(err, flags.ErrConflict):
		return exitConflict
	}
	return exitError
}

// reasonArg checks and masks a --reason: refused (bad usage) when longer
// than the audit log keeps, rather than cut without the operator knowing.
func (c *cli) reasonArg(reason string) (string, error) {
	if len(reason) > flags.MaxText {
		return "", usagef("--reason is %d bytes; at most %d are kept in the audit log: shorten it", len(reason), flags.MaxText)
	}
	return c.red.String(reason), nil
}

// argName checks a migration name given as an argument.
func argName(name string) error {
	if err := flags.ValidateName(name); err != nil {
		return usageError{err}
	}
	return nil
}

// argStage parses a stage given as an argument.
func argStage(s string) (flags.Stage, error) {
	st, err := flags.ParseStage(s)
	if err != nil {
		return st, usageError{err}
	}
	return st, nil
}

// groupCommands makes every command that only groups others (and the root)
// answer an unknown sub-command with its help and a usage error, instead of
// the help and exit 0 (cobra's default for a nested group) or an untyped
// error (the root). A group named alone prints its help.
func groupCommands(cmd *cobra.Command) {
	for _, sub := range cmd.Commands() {
		groupCommands(sub)
	}
	if !cmd.HasSubCommands() || cmd.Runnable() {
		return
	}
	cmd.Args = cobra.ArbitraryArgs
	if cmd.SuggestionsMinimumDistance <= 0 {
		cmd.SuggestionsMinimumDistance = 2
	}
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) == 0 {
			return cmd.Help()
		}
		msg := fmt.Sprintf("unknown command %q for %q", oneLine(args[0], 100), cmd.CommandPath())
		if sugg := cmd.SuggestionsFor(args[0]); len(sugg) > 0 {
			msg += fmt.Sprintf(" (did you mean %s?)", strings.Join(sugg, ", "))
		}
		fmt.Fprintln(cmd.ErrOrStderr(), cmd.UsageString())
		return usageError{errors.New(msg)}
	}
}

func defaultActor() string {
	name := "unknown"
	if u, err := user.Current(); err == nil && u.Username != "" {
		name = u.Username
	}
	if h, err := os.Hostname(); err == nil {
		name += "@" + h
	}
	return name
}

// envDuration is the duration in the environment variable k, or def when it
// is unset. A value that does not parse is kept in bad, so the command can
// refuse it as it refuses a bad flag rather than run with the default.
func envDuration(k string, def time.Duration, bad *error) time.Duration {
	v, ok := os.LookupEnv(k)
	if !ok || v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		*bad = usagef("%s=%q: want a duration with a unit, such as 30s or 2m", k, flags.Echo(v))
		return def
	}
	return d
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func (c *cli) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "dimmer",
		Short:         "Operate dimmer migrations: stages, rollouts, go/no-go status and audit",
		SilenceUsage:  true,
		SilenceErrors: true,
		Long: `dimmer moves migrations between stages (off, dualwrite, shadow, live,
rampdown, complete) through the guarded controller.

The store is the flag store the services' providers read:
postgres://... or a keyword DSN host=... dbname=... (package pgflags), or
redis://... (package redisflags).

Guards of forward steps: every live instance applied the current revision;
the fleet's mismatch and error rates before live and rampdown; the canary's
own windows before a rollout is finished (every key moved to the stage a
share of keys was trying); a verified
backfill (package backfill, schema DIMMER_BACKFILL_SCHEMA) before shadow and
no pending repairs (the outbox table DIMMER_OUTBOX_TABLE of --schema) before
complete, read from the Postgres store's database, or from DIMMER_GUARDS_DB
with a Redis store. --force with a reason overrides a failed guard.

--timeout bounds connecting to each store and database, and each
statement of the commands that read or flip state (backfill run and verify,
and schema's steps, wait for locks within their own retries and lock
timeouts). Passwords in URLs and DSNs are never printed.

Exit codes: 0 done; 2 bad usage (an unknown stage, command, job or column,
an unparsable URL, a bad number, a --reason over 1 KiB); 3 refused by the
transition rules or guards, or a backfill in a stage that allows none; 4
conflict with a concurrent change; 1 other (a store that cannot be reached,
a corrupt stored flag).`,
	}
	root.PersistentFlags().StringVar(&c.storeURL, "store", os.Getenv("DIMMER_STORE"), "flag store URL: postgres://... or redis://... (env DIMMER_STORE)")
	root.PersistentFlags().StringVar(&c.schema, "schema", envOr("DIMMER_SCHEMA", "dimmer"), "Postgres schema of the flag store (env DIMMER_SCHEMA)")
	root.PersistentFlags().StringVar(&c.prefix, "prefix", envOr("DIMMER_PREFIX", "dimmer:"), "Redis key prefix of the flag store (env DIMMER_PREFIX)")
	root.PersistentFlags().StringVar(&c.actor, "actor", envOr("DIMMER_ACTOR", defaultActor()), "who is acting, for the audit log (env DIMMER_ACTOR)")
	root.PersistentFlags().DurationVar(&c.timeout, "timeout", envDuration("DIMMER_TIMEOUT", defaultTimeout, &c.envErr),
		"give up connecting to a store or database, and each statement, after this long (env DIMMER_TIMEOUT)")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })

	stage := &cobra.Command{Use: "stage", Short: "Read or set a migration's stage"}
	stage.AddCommand(c.stageGetCmd(), c.stageSetCmd())
	root.AddCommand(stage, c.rolloutCmd(), c.statusCmd(), c.auditCmd())
	for _, add := range commandGroups {
		root.AddCommand(add(c))
	}
	groupCommands(root)
	maskDefaults(root)
	root.PersistentPreRunE = func(*cobra.Command, []string) error {
		// The actor is stored in the audit log and shown by status.
		c.actor = c.red.String(c.actor)
		if c.envErr != nil && !root.PersistentFlags().Changed("timeout") {
			return c.envErr
		}
		if c.timeout <= 0 {
			return usagef("--timeout %v: must be positive", c.timeout)
		}
		if len(c.actor) > flags.MaxText {
			return usagef("--actor is %d bytes; at most %d are kept in the audit log: shorten it", len(c.actor), flags.MaxText)
		}
		return nil
	}
	return root
}

// maskDefaults masks passwords in flag defaults taken from the environment
// (DIMMER_STORE, DIMMER_OUTBOX_DB, ...), which every --help shows.
func maskDefaults(cmd *cobra.Command) {
	for _, fs := range []*pflag.FlagSet{cmd.Flags(), cmd.PersistentFlags()} {
		fs.VisitAll(func(f *pflag.Flag) { f.DefValue = maskDSN(f.DefValue) })
	}
	for _, sub := range cmd.Commands() {
		maskDefaults(sub)
	}
}

// commandGroups are the top-level commands other files of this package add
// (outbox, schema, backfill), each registering itself in an init function,
// so each package's commands live beside each other and not in this file.
var commandGroups []func(*cli) *cobra.Command

func (c *cli) open(ctx context.Context) (*backend, error) {
	if c.be != nil {
		return c.be, nil
	}
	if c.storeURL == "" {
		return nil, usagef("no store: pass --store postgres://... or redis://..., or set DIMMER_STORE")
	}
	be, err := c.openBackend(ctx, c.storeURL, c.schema, c.prefix, c.logger)
	if err != nil {
		return nil, err
	}
	c.be = be
	return be, nil
}

// openController opens the store and a controller over it with the fleet
// barrier and the built-in guards.
func (c *cli) openController(ctx context.Context) (*backend, *flags.Controller, error) {
	be, err := c.open(ctx)
	if err != nil {
		return nil, nil, err
	}
	ctrl, err := c.controller(be)
	return be, ctrl, err
}

func (c *cli) controller(be *backend) (*flags.Controller, error) {
	guards, err := defaultGuards(be)
	if err != nil {
		return nil, err
	}
	return flags.NewController(be.store, flags.WithFleet(be.fleet), flags.WithGuards(guards...),
		flags.WithControllerLogger(c.logger))
}

func exactArgs(n int, names string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) != n {
			return usagef("expected %s, got %d argument(s)", names, len(args))
		}
		return nil
	}
}

func minArgs(n int, names string) cobra.PositionalArgs {
	return func(_ *cobra.Command, args []string) error {
		if len(args) < n {
			return usagef("expected %s, got %d argument(s)", names, len(args))
		}
		return nil
	}
}

func (c *cli) stageGetCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "get MIGRATION",
		Short: "Print the migration's stage (a migration never set reads as off)",
		Args:  exactArgs(1, "MIGRATION"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := argName(args[0]); err != nil {
				return err
			}
			c.readOnly = true
			be, err := c.open(cmd.Context())
			if err != nil {
				return err
			}
			st, err := be.store.Load(cmd.Context(), args[0])
			var corrupt *flags.CorruptFlagError
			if errors.As(err, &corrupt) {
				return fmt.Errorf("%w\nstored document: %s\nfix: dimmer stage set %s STAGE --force --reason TEXT",
					corrupt, oneLine(string(corrupt.Raw), 200), corrupt.Migration)
			}
			if err != nil {
				return err
			}
			fmt.Fprintln(c.out, st.String())
			return nil
		},
	}
}

func (c *cli) stageSetCmd() *cobra.Command {
	var reason string
	var force bool
	cmd := &cobra.Command{
		Use:   "set MIGRATION STAGE --reason TEXT [--force]",
		Short: "Move every key of the migration to STAGE (one step forward, or back)",
		Long: `Move every key of the migration to STAGE.

Forward: one step at a time, after every guard passes. Back: any earlier
stage before complete. Leaving complete needs proof that old was reconciled,
or --force with a reason. --force overrides failed guards too (never a
skipped stage); it is written to the audit log.

Valid stages: ` + flags.ValidStages,
		Args: exactArgs(2, "MIGRATION STAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := argName(args[0]); err != nil {
				return err
			}
			to, err := argStage(args[1])
			if err != nil {
				return err
			}
			if reason == "" {
				return usagef("--reason is required: say why, it goes to the audit log")
			}
			reason, err := c.reasonArg(reason)
			if err != nil {
				return err
			}
			_, ctrl, err := c.openController(cmd.Context())
			if err != nil {
				return err
			}
			st, err := ctrl.Set(cmd.Context(), flags.Request{Migration: args[0], Stage: to, Actor: c.actor, Reason: reason, Force: force})
			if err != nil {
				return err
			}
			fmt.Fprintf(c.out, "%s: %s (revision %d)\n", st.Migration, st, st.Revision)
			return nil
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why the change is made (required; audited)")
	cmd.Flags().BoolVar(&force, "force", false, "override failed guards and the leaving-complete rule (audited)")
	return cmd
}

func (c *cli) rolloutCmd() *cobra.Command {
	var reason string
	var force bool
	cmd := &cobra.Command{
		Use:   "rollout MIGRATION STAGE PERCENT [--reason TEXT]",
		Short: "Serve STAGE to PERCENT % of keys and the current stage to the rest (guarded like an advance)",
		Long: `Serve STAGE to PERCENT % of keys, chosen by the sticky hash of
(migration, entity key), and the current base stage to the rest. Growing the
percentage keeps the keys already moved. 0 ends the rollout; 100 moves every
key. Guarded like an advance.

Valid stages: ` + flags.ValidStages,
		Args: exactArgs(3, "MIGRATION STAGE PERCENT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := argName(args[0]); err != nil {
				return err
			}
			to, err := argStage(args[1])
			if err != nil {
				return err
			}
			pct, err := strconv.ParseFloat(strings.TrimSuffix(args[2], "%"), 64)
			if err != nil || math.IsNaN(pct) || pct < 0 || pct > 100 {
				return usagef("PERCENT %q: want a number from 0 to 100", args[2])
			}
			if reason == "" {
				reason = fmt.Sprintf("rollout %s to %s%%", to, args[2])
			}
			if reason, err = c.reasonArg(reason); err != nil {
				return err
			}
			_, ctrl, err := c.openController(cmd.Context())
			if err != nil {
				return err
			}
			req, err := ctrl.RolloutRequest(cmd.Context(), args[0], to, pct, c.actor, reason)
			if err != nil {
				return err
			}
			req.Force = force
			st, err := ctrl.Set(cmd.Context(), req)
			if err != nil {
				return err
			}
			fmt.Fprintf(c.out, "%s: %s (revision %d)\n", st.Migration, st, st.Revision)
			return nil
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why (audited; default describes the rollout)")
	cmd.Flags().BoolVar(&force, "force", false, "override failed guards (audited; never a skipped stage)")
	return cmd
}

func (c *cli) statusCmd() *cobra.Command {
	var watch time.Duration
	cmd := &cobra.Command{
		Use:   "status [MIGRATION] [--watch 2s]",
		Short: "Show the go/no-go checklist for the next step of one migration, or a line per migration",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usagef("expected at most one MIGRATION, got %d arguments", len(args))
			}
			return nil
		},
		RunE: watchable(&watch, c, func(cmd *cobra.Command, args []string) error {
			c.readOnly = true
			be, ctrl, err := c.openController(cmd.Context())
			if err != nil {
				return err
			}
			if len(args) == 1 {
				if err := argName(args[0]); err != nil {
					return err
				}
				st, err := ctrl.Status(cmd.Context(), args[0], be.fleet)
				if err != nil {
					return err
				}
				printStatus(c.out, st, time.Now())
				return nil
			}
			all, err := be.store.Migrations(cmd.Context())
			corrupt, err := flags.SplitCorrupt(err)
			if err != nil {
				return err
			}
			insts, ferr := be.fleet.Instances(cmd.Context())
			printFleetSummary(c.out, insts, ferr)
			if len(all)+len(corrupt) == 0 {
				fmt.Fprintln(c.out, "no migration has been set yet")
				return nil
			}
			rows := make([]statusRow, 0, len(all)+len(corrupt))
			for _, m := range all {
				rows = append(rows, statusRow{name: m.Migration})
			}
			for _, ce := range corrupt {
				rows = append(rows, statusRow{name: ce.Migration, corrupt: ce})
			}
			sort.Slice(rows, func(i, j int) bool { return rows[i].name < rows[j].name })
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MIGRATION\tSTAGE\tREVISION\tNEXT\tVERDICT")
			for _, row := range rows {
				if ce := row.corrupt; ce != nil {
					fmt.Fprintf(tw, "%s\tCORRUPT\t%d\t-\t%s\n", ce.Migration, ce.Revision, oneLine(ce.Err.Error(), 120))
					continue
				}
				st, err := ctrl.Status(cmd.Context(), row.name, be.fleet)
				if err != nil {
					return err
				}
				verdict := "GO"
				if !st.Ready {
					verdict = fmt.Sprintf("NO-GO (%d failing)", failing(st.Checks))
				}
				next := st.Next.String()
				if st.State.Stage == flags.Complete {
					next, verdict = "-", "complete"
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", row.name, st.State, st.State.Revision, next, verdict)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if len(corrupt) > 0 {
				// Listed, and the exit code says something needs a hand.
				names := make([]string, len(corrupt))
				for i, ce := range corrupt {
					names[i] = ce.Migration
				}
				return fmt.Errorf("%d corrupt flag(s): %s: see 'dimmer stage get MIGRATION', then overwrite with 'dimmer stage set MIGRATION STAGE --force --reason ...'",
					len(corrupt), strings.Join(names, ", "))
			}
			return nil
		}),
	}
	cmd.Flags().DurationVar(&watch, "watch", 0, "redraw the checklist in place every interval until interrupted (e.g. 2s)")
	return cmd
}

type statusRow struct {
	name    string
	corrupt *flags.CorruptFlagError
}

func failing(checks []flags.CheckResult) int {
	n := 0
	for _, c := range checks {
		if !c.Passed {
			n++
		}
	}
	return n
}

func printFleetSummary(w io.Writer, insts []flags.Instance, err error) {
	switch {
	case err != nil:
		fmt.Fprintf(w, "fleet: registry unreachable: %v\n", err)
	case len(insts) == 0:
		fmt.Fprintln(w, "fleet: no live instance is registered")
	default:
		fmt.Fprintf(w, "fleet: %d live instance(s)\n", len(insts))
	}
}

func printStatus(w io.Writer, st flags.Status, now time.Time) {
	s := st.State
	fmt.Fprintf(w, "migration %s: %s  revision %d  epoch %d", s.Migration, s, s.Revision, s.Epoch)
	if s.Revision == 0 {
		fmt.Fprint(w, "  (never set)")
	} else {
		fmt.Fprintf(w, "  updated %s by %s", s.UpdatedAt.Format(time.RFC3339), s.UpdatedBy)
	}
	fmt.Fprintln(w)
	printFleetSummary(w, st.Instances, st.FleetErr)
	sort.Slice(st.Instances, func(i, j int) bool { return st.Instances[i].ID < st.Instances[j].ID })
	for _, in := range st.Instances {
		rev, ok := in.Applied[s.Migration]
		ack := "acknowledged"
		switch {
		case !ok:
			ack = "has not seen this migration"
		case rev < s.Revision:
			ack = fmt.Sprintf("behind (revision %d)", rev)
		}
		fmt.Fprintf(w, "  %s  build %s  revision %d  %s  seen %s ago\n", in.ID, in.Build, rev, ack, now.Sub(in.SeenAt).Round(time.Millisecond))
	}
	if s.Stage == flags.Complete {
		fmt.Fprintln(w, "complete: nothing left to advance")
		return
	}
	fmt.Fprintf(w, "next step: %s -> %s\n", s.Stage, st.Next)
	for _, ch := range st.Checks {
		mark := "PASS"
		if !ch.Passed {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "  [%s] %s: %s\n", mark, ch.Name, ch.Detail)
	}
	if st.Ready {
		fmt.Fprintln(w, "verdict: GO")
	} else {
		fmt.Fprintf(w, "verdict: NO-GO (%d check(s) failing)\n", failing(st.Checks))
	}
}

func (c *cli) auditCmd() *cobra.Command {
	var limit int
	cmd := &cobra.Command{
		Use:   "audit MIGRATION [--limit N]",
		Short: "Print the migration's audit log, newest first",
		Args:  exactArgs(1, "MIGRATION"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := argName(args[0]); err != nil {
				return err
			}
			if limit < 0 {
				return usagef("--limit %d: must not be negative", limit)
			}
			c.readOnly = true
			be, err := c.open(cmd.Context())
			if err != nil {
				return err
			}
			entries, err := be.store.Audit(cmd.Context(), args[0], limit)
			if err != nil {
				return err
			}
			if len(entries) == 0 {
				fmt.Fprintf(c.out, "%s: no audit entries\n", args[0])
				return nil
			}
			for _, e := range entries {
				printAudit(c.out, e)
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&limit, "limit", 0, "newest N entries (0: all)")
	return cmd
}

func printAudit(w io.Writer, e flags.AuditEntry) {
	forced := ""
	if e.Forced {
		forced = " FORCED"
	}
	fmt.Fprintf(w, "%s  %-7s%s  %s -> %s  by %s: %s\n", e.At.Format(time.RFC3339), e.Outcome, forced, e.From, e.To, escapeControls(e.Actor), escapeControls(e.Reason))
	for _, ch := range e.Checks {
		if !ch.Passed {
			fmt.Fprintf(w, "    failed %s: %s\n", ch.Name, escapeControls(ch.Detail))
		}
	}
}

// escapeControls shows stored text on one line with its control
// characters escaped (\n, \x1b), so a reason, an actor or a message key
// cannot forge a line below its own, break a table or drive the terminal.
func escapeControls(s string) string {
	if !strings.ContainsFunc(s, unicode.IsControl) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if unicode.IsControl(r) {
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}
