package main

import (
	"context"
	"database/sql/driver"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/dimmer-dev/dimmer/backfill"
)

func init() {
	commandGroups = append(commandGroups, func(c *cli) *cobra.Command { return (&backfillCLI{cli: c}).cmd() })
}

// backfillCLI operates the jobs stored in the backfill tables: the ones a
// service registered by running them, and table copies defined here.
type backfillCLI struct {
	*cli
	db       string
	schema   string
	workerID string
}

func (b *backfillCLI) cmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "backfill",
		Short: "Run, watch, verify, pause and resume backfill jobs",
		Long: `Operate the backfill jobs stored in the backfill tables (package backfill).

Any stored job can be watched (status), paused and resumed, from any
machine: workers of every process read the pause flag before each chunk.
Jobs copying a table into a table of the same database (with SQL
transforms only) can also be run and verified from here; jobs with a Go
transform or another sink are run and verified by the service that defines
them.

--db is the database holding the backfill tables (default: --store when it
is a postgres:// URL).`,
	}
	cmd.PersistentFlags().StringVar(&b.db, "db", envOr("DIMMER_BACKFILL_DB", ""), "Postgres URL of the backfill tables (env DIMMER_BACKFILL_DB; default --store)")
	cmd.PersistentFlags().StringVar(&b.schema, "backfill-schema", envOr("DIMMER_BACKFILL_SCHEMA", backfill.DefaultSchema), "schema of the backfill tables (env DIMMER_BACKFILL_SCHEMA)")
	cmd.AddCommand(b.runCmd(), b.statusCmd(), b.verifyCmd(), b.pauseCmd(true), b.pauseCmd(false))
	return cmd
}

// backfiller opens the backfill tables; with a flag store it reads stages and
// epochs (needed to run and verify).
// backfiller opens the backfill's database. The commands that only read or
// flip a job's state (bounded) give each statement --timeout and check the
// tables rather than install them; a run and a verification install them,
// and wait for the service's locks as long as their chunks and repairs do
// (their retries bound them).
func (b *backfillCLI) backfiller(ctx context.Context, needFlags, bounded bool) (*backfill.Backfiller, error) {
	url := b.db
	if url == "" && isPostgres(b.storeURL) {
		url = b.storeURL
	}
	if url == "" {
		return nil, usagef("no database for the backfill tables: pass --db postgres://... (or a postgres:// --store)")
	}
	pool, err := b.openPool(ctx, "backfill database --db", url, bounded)
	if err != nil {
		return nil, err
	}
	prev := func() {}
	if b.be != nil {
		prev = b.be.close
	}
	opts := []backfill.Option{backfill.WithSchema(b.schema), backfill.WithLogger(b.logger)}
	if b.workerID != "" {
		opts = append(opts, backfill.WithWorkerID(b.workerID))
	}
	if needFlags && b.storeURL == "" {
		pool.Close()
		return nil, usagef("no store: a backfill reads its migration's stage and epoch from the flag store (it runs from dualwrite on, and stops when the epoch changes); pass --store postgres://... or redis://..., or set DIMMER_STORE")
	}
	if needFlags || b.storeURL != "" {
		be, err := b.open(ctx)
		if err != nil {
			pool.Close()
			return nil, err
		}
		prev = be.close
		opts = append(opts, backfill.WithFlagStore(be.store))
		be.close = func() { pool.Close(); prev() }
	} else {
		b.be = &backend{close: pool.Close}
	}
	bf, err := backfill.New(pool, opts...)
	if err != nil {
		return nil, err
	}
	// Reading or flipping a job's state needs the tables to be there:
	// installing them would answer a misspelt --backfill-schema with an
	// empty one.
	prepare := bf.Install
	if bounded {
		prepare = bf.Check
	}
	if err := prepare(ctx); err != nil {
		if errors.Is(err, backfill.ErrNotInstalled) {
			return nil, fmt.Errorf("backfill tables at %s: %w: no job has run there yet, or --backfill-schema names another schema", maskDSN(url), err)
		}
		return nil, fmt.Errorf("backfill tables at %s: %w", maskDSN(url), err)
	}
	return bf, nil
}

// runFlags are the Config fields backfill run's flags set.
var runFlags = fieldFlags{"Config.Workers": "workers", "Config.RowsPerSecond": "rows-per-second",
	"Config.TargetChunkTime": "chunk-time", "Config.LeaseTTL": "lease-ttl"}

func (b *backfillCLI) runCmd() *cobra.Command {
	var spec backfill.Spec
	var source, target, key, migration string
	var cfg backfill.Config
	var dry bool
	cmd := &cobra.Command{
		Use:   "run JOB [--migration M --source TABLE --target TABLE --key COLS --version-column COL]",
		Short: "Run (or resume) a job to completion with a live progress display",
		Long: `Run JOB to completion, resuming from its checkpoints. A stored job is
resumed as it was defined; --source/--target/--key/--version-column define a
new table copy (in the database of --db) the first time. Several runs of
the same job, on any machines, share its ranges. Interrupt to stop: the
next run resumes. --dry-run shows what would be copied and writes nothing.`,
		Args: exactArgs(1, "JOB"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if err := noZero(cmd, "workers", "chunk-time", "lease-ttl"); err != nil {
				return err
			}
			if err := runFlags.explain(cfg.Validate()); err != nil {
				return err
			}
			bf, err := b.backfiller(ctx, true, false)
			if err != nil {
				return err
			}
			defined := source != "" || target != "" || key != "" || spec.VersionColumn != "" || migration != ""
			if defined && (source == "" || target == "" || key == "" || spec.VersionColumn == "" || migration == "") {
				return usagef("a definition needs all of --migration, --source, --target, --key and --version-column")
			}
			given := backfill.Job{Name: args[0], Migration: migration, Spec: spec}
			if defined {
				if given.Spec.Source, err = parseTable("--source", source); err != nil {
					return err
				}
				if given.Spec.Target, err = parseTable("--target", target); err != nil {
					return err
				}
				given.Spec.Key = strings.Split(key, ",")
			}
			j, err := bf.StoredJob(ctx, args[0])
			switch {
			case errors.Is(err, backfill.ErrUnknownJob):
				if !defined {
					return usagef("job %s is not stored: define it with --migration, --source, --target, --key and --version-column", args[0])
				}
				j = given
			case err != nil:
				return err
			case defined:
				// The same command run again (after a crash, by a
				// restart-on-failure wrapper) resumes the job; another
				// definition under the same name is refused.
				if diff := definitionDiff(j, given); diff != "" {
					return usagef("job %s is stored with another definition (%s): run it with the stored definition or none, or give the new definition another JOB name", args[0], diff)
				}
			}
			j.Config = cfg
			if dry {
				p, err := bf.DryRun(ctx, j)
				if err != nil {
					return err
				}
				fmt.Fprintf(b.out, "job %s (%s), definition %s, stored: %v\n", p.Job, p.Migration, p.Fingerprint, p.Stored)
				resumes := ""
				if p.RowsDone > 0 {
					resumes = fmt.Sprintf(", %d of them copied already (a run resumes after them)", p.RowsDone)
				}
				fmt.Fprintf(b.out, "would copy ~%d rows up to key %v in %d ranges%s\n%s\n", p.EstimatedRows, p.UpperBound, len(p.Ranges), resumes, p.CopySQL)
				if p.Refused != "" {
					fmt.Fprintf(b.out, "a run would be refused now: %s\n", p.Refused)
				}
				for _, r := range p.Sample {
					fmt.Fprintf(b.out, "  sample: %s\n", formatRow(r))
				}
				return nil
			}
			pr := &progressLine{out: b.out}
			j.Config.Progress = pr.update
			res, err := bf.Run(ctx, j)
			pr.flush()
			if err != nil && ctx.Err() != nil {
				// Interrupted: what a user needs is that nothing is lost.
				return fmt.Errorf("%s: interrupted%s; run the same command again to resume from its checkpoints", j.Name, pr.done())
			}
			if err != nil {
				return err
			}
			if res.AlreadyDone {
				fmt.Fprintf(b.out, "%s: already done at epoch %d\n", j.Name, res.Epoch)
				return nil
			}
			fmt.Fprintf(b.out, "%s: done, %d rows in %d chunks in %s\n", j.Name, res.Rows, res.Chunks, res.Elapsed.Round(time.Millisecond))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&migration, "migration", "", "the migration (stage flag) the job belongs to")
	f.StringVar(&source, "source", "", "source table ([schema.]name)")
	f.StringVar(&target, "target", "", "target table ([schema.]name)")
	f.StringVar(&key, "key", "", "key columns, comma separated")
	f.StringVar(&spec.VersionColumn, "version-column", "", "version or timestamp column compared in the upsert")
	f.IntVar(&cfg.Workers, "workers", 1, "workers in this process")
	f.Float64Var(&cfg.RowsPerSecond, "rows-per-second", 0, "rate limit of this process (0: none)")
	f.DurationVar(&cfg.TargetChunkTime, "chunk-time", 500*time.Millisecond, "target time of a chunk")
	f.BoolVar(&cfg.LockSourceRows, "lock-source-rows", false, "lock each chunk's source rows (FOR KEY SHARE) so a row deleted during the copy is not brought back (without it, verify --repair removes such rows)")
	f.DurationVar(&cfg.LeaseTTL, "lease-ttl", 30*time.Second, "how long a range stays with a worker that stopped renewing it and whose database session is still open (at least 1s and two --chunk-time)")
	f.StringVar(&b.workerID, "worker-id", envOr("DIMMER_BACKFILL_WORKER_ID", ""), "this process's name in range leases (env DIMMER_BACKFILL_WORKER_ID; default host-pid-random)")
	f.BoolVar(&dry, "dry-run", false, "show what would be copied; write nothing")
	return cmd
}

// definitionDiff names what the given definition changes of the stored
// job's ("" when nothing).
func definitionDiff(stored, given backfill.Job) string {
	var d []string
	diff := func(flag string, s, g any) {
		if fmt.Sprint(s) != fmt.Sprint(g) {
			d = append(d, fmt.Sprintf("--%s %v, stored %v", flag, g, s))
		}
	}
	diff("migration", stored.Migration, given.Migration)
	diff("source", stored.Spec.Source, given.Spec.Source)
	diff("target", stored.Spec.Target, given.Spec.Target)
	diff("key", strings.Join(stored.Spec.Key, ","), strings.Join(given.Spec.Key, ","))
	diff("version-column", stored.Spec.VersionColumn, given.Spec.VersionColumn)
	if len(stored.Spec.Columns) > 0 || len(stored.Spec.Exprs) > 0 || len(stored.Spec.VerifyIgnore) > 0 {
		d = append(d, "the stored job also has columns, expressions or verify-ignore lists these flags cannot give")
	}
	return strings.Join(d, "; ")
}

// parseTable reads [schema.]table as SQL writes it: a part in double quotes
// is taken as quoted ("" for a quote, a dot inside it kept), a part without
// them as given.
func parseTable(flag, s string) (backfill.Table, error) {
	var parts []string
	var cur strings.Builder
	quoted, inQuotes := false, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case inQuotes && c == '"' && i+1 < len(s) && s[i+1] == '"':
			cur.WriteByte('"')
			i++
		case c == '"' && (inQuotes || cur.Len() == 0 && !quoted):
			inQuotes = !inQuotes
			quoted = true
		case !inQuotes && c == '.':
			parts = append(parts, cur.String())
			cur.Reset()
			quoted = false
		case !inQuotes && quoted:
			return backfill.Table{}, usagef("%s %q: text after a quoted name", flag, s)
		default:
			cur.WriteByte(c)
		}
	}
	if inQuotes {
		return backfill.Table{}, usagef("%s %q: a quote is not closed", flag, s)
	}
	parts = append(parts, cur.String())
	for _, p := range parts {
		if p == "" {
			return backfill.Table{}, usagef("%s %q: want table or schema.table", flag, s)
		}
	}
	switch len(parts) {
	case 1:
		return backfill.Table{Name: parts[0]}, nil
	case 2:
		return backfill.Table{Schema: parts[0], Name: parts[1]}, nil
	}
	return backfill.Table{}, usagef("%s %q: want table or schema.table", flag, s)
}

// progressLine prints at most one progress line a second.
type progressLine struct {
	mu   sync.Mutex
	out  interface{ Write([]byte) (int, error) }
	last time.Time
	p    *backfill.Progress
}

func (l *progressLine) update(p backfill.Progress) {
	l.mu.Lock()
	defer l.mu.Unlock()
	// A hold (a pause, a signal) and its end are shown at once: a line a
	// second later would come after the rate had already said it.
	heldChanged := l.p != nil && l.p.Held != p.Held || l.p == nil && p.Held != ""
	l.p = &p
	if heldChanged || time.Since(l.last) >= time.Second {
		l.print()
	}
}

// done describes how far the job got, as this process last saw it.
func (l *progressLine) done() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.p == nil {
		return ""
	}
	return fmt.Sprintf(" at %d of ~%d rows", l.p.RowsDone, l.p.RowsTotal)
}

func (l *progressLine) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.p != nil {
		l.print()
	}
}

func (l *progressLine) print() {
	p := l.p
	l.last = time.Now()
	pct := 0.0
	if p.RowsTotal > 0 {
		pct = 100 * float64(p.RowsDone) / float64(p.RowsTotal)
	}
	line := fmt.Sprintf("%s: %d/~%d rows (%.1f%%), %.0f rows/s, ranges %d/%d", p.Job, p.RowsDone, p.RowsTotal, min(pct, 100), p.RowsPerSecond, p.RangesDone, p.Ranges)
	if p.ETA > 0 {
		line += ", ETA " + p.ETA.Round(time.Second).String()
	}
	for _, w := range p.Workers {
		line += fmt.Sprintf(" [%s range %d chunk %d]", w.ID, w.Range, w.ChunkSize)
	}
	if p.Held != "" {
		line += " held: " + p.Held
	}
	fmt.Fprintln(l.out, line)
}

func (b *backfillCLI) statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status [JOB]",
		Short: "Show one job's progress, leases and last verification, or a line per job",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usagef("expected at most one JOB, got %d arguments", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			bf, err := b.backfiller(cmd.Context(), false, true)
			if err != nil {
				return err
			}
			if len(args) == 0 {
				jobs, err := bf.Jobs(cmd.Context())
				if err != nil {
					return err
				}
				if len(jobs) == 0 {
					fmt.Fprintln(b.out, "no backfill jobs")
				}
				for _, s := range jobs {
					fmt.Fprintf(b.out, "%s\t%s\t%s\t%d/~%d rows\tverified: %s\n", s.Name, s.Migration, state(s), s.RowsDone, s.EstimatedRows, verified(s))
				}
				return nil
			}
			s, err := bf.Status(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(b.out, "job %s (migration %s, epoch %d): %s\n", s.Name, s.Migration, s.Epoch, state(s))
			fmt.Fprintf(b.out, "  %s -> %s, key %s, version %s\n", s.Spec.Source, s.Spec.Target, strings.Join(s.Spec.Key, ","), s.Spec.VersionColumn)
			fmt.Fprintf(b.out, "  rows %d of ~%d, ranges %d/%d done, %.0f rows/s", s.RowsDone, s.EstimatedRows, s.RangesDone, s.Ranges, s.RowsPerSecond)
			if s.ETA > 0 {
				fmt.Fprintf(b.out, ", ETA %s", s.ETA.Round(time.Second))
			}
			fmt.Fprintln(b.out)
			for _, l := range s.Leases {
				fmt.Fprintf(b.out, "  range %d: %s until %s, %d rows, at key %v\n", l.Range, l.Owner, l.Until.Format(time.RFC3339), l.RowsDone, l.Cursor)
			}
			fmt.Fprintf(b.out, "  verified: %s\n", verified(s))
			return nil
		},
	}
}

func state(s backfill.JobStatus) string {
	switch {
	case s.Done:
		return "done"
	case s.Paused:
		return "paused (" + s.PauseReason + ")"
	case len(s.Leases) > 0:
		return fmt.Sprintf("running (%d workers)", len(s.Leases))
	}
	return "stopped"
}

func verified(s backfill.JobStatus) string {
	v := s.LastVerification
	switch {
	case v == nil:
		return "never"
	case v.OK:
		return fmt.Sprintf("ok at epoch %d (%s)", v.Epoch, v.FinishedAt.Format(time.RFC3339))
	}
	return fmt.Sprintf("FAILED at epoch %d: %s", v.Epoch, strings.Join(v.Problems, "; "))
}

func (b *backfillCLI) verifyCmd() *cobra.Command {
	var o backfill.VerifyOptions
	cmd := &cobra.Command{
		Use:   "verify JOB [--repair]",
		Short: "Compare old and new by chunk checksums; store the result for the backfill-verified guard",
		Long: `Compare the job's source and target chunk by chunk (row count and a
NULL-safe row hash on both sides) and store the result at the migration's
epoch, where the backfill-verified guard reads it before shadow. --repair
recopies differing ranges. A target row newer than its source (a higher
version while the source stays unchanged) is reported apart: the target
has a write the source lacks, which the version guard keeps. Replay the
dual writes' repair log so the source catches up and verify again, or,
when the source is right, add --overwrite-newer to --repair. Exit 1 when
they differ.`,
		Args: exactArgs(1, "JOB"),
		RunE: func(cmd *cobra.Command, args []string) error {
			bf, err := b.backfiller(cmd.Context(), true, false)
			if err != nil {
				return err
			}
			j, err := bf.StoredJob(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			v, err := bf.Verify(cmd.Context(), j, o)
			if err != nil {
				return err
			}
			fmt.Fprintf(b.out, "%s: %d chunks, %d source rows, %d target rows, differing: %d ranges / %d keys, repaired: %d, keys with a write in flight: %d, keys newer in the target: %d\n",
				j.Name, v.Chunks, v.RowsSource, v.RowsTarget, v.Differing, v.DifferingKeys, v.Repaired, v.InFlight, v.NewerInTarget)
			for _, r := range v.Ranges {
				newer := ""
				if r.NewerInTarget > 0 {
					newer = fmt.Sprintf(", newer in the target: %d %v", r.NewerInTarget, r.NewerKeys)
				}
				fmt.Fprintf(b.out, "  range (%v, %v]: %d source rows, %d target rows, differing keys: %d %v, repaired: %v%s\n",
					r.Lo, r.Hi, r.SourceRows, r.TargetRows, r.DifferingKeys, r.Keys, r.Repaired, newer)
			}
			if !v.OK {
				return fmt.Errorf("%s differs: %s", j.Name, strings.Join(v.Problems, "; "))
			}
			fmt.Fprintf(b.out, "%s: verified at epoch %d\n", j.Name, v.Epoch)
			return nil
		},
	}
	cmd.Flags().BoolVar(&o.Repair, "repair", false, "recopy differing ranges and check them again")
	cmd.Flags().BoolVar(&o.OverwriteNewer, "overwrite-newer", false, "with --repair, copy the source's row over target rows newer than it")
	cmd.Flags().IntVar(&o.ChunkRows, "chunk-rows", 10000, "rows per checksum")
	return cmd
}

func (b *backfillCLI) pauseCmd(pause bool) *cobra.Command {
	var reason string
	use, short := "resume JOB", "Let a paused job's workers go on from their checkpoints"
	if pause {
		use, short = "pause JOB --reason TEXT", "Hold every worker of the job, in every process, before its next chunk"
	}
	cmd := &cobra.Command{
		Use: use, Short: short,
		Args: exactArgs(1, "JOB"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if pause && reason == "" {
				return usagef("--reason is required: say why the job is held")
			}
			reason, err := b.reasonArg(reason)
			if err != nil {
				return err
			}
			bf, err := b.backfiller(cmd.Context(), false, true)
			if err != nil {
				return err
			}
			if pause {
				err = bf.Pause(cmd.Context(), args[0], reason+" ("+b.actor+")")
			} else {
				err = bf.Resume(cmd.Context(), args[0])
			}
			if errors.Is(err, backfill.ErrUnknownJob) {
				return usageError{err}
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(b.out, "%s: %s\n", args[0], map[bool]string{true: "paused", false: "resumed"}[pause])
			return nil
		},
	}
	if pause {
		cmd.Flags().StringVar(&reason, "reason", "", "why the job is held (required)")
	}
	return cmd
}

// formatRow shows a row as SQL would: columns in name order, values in
// their text form (a numeric's digits, a bytea in hex, NULL).
func formatRow(r backfill.Row) string {
	var b strings.Builder
	for i, col := range slices.Sorted(maps.Keys(r)) {
		if i > 0 {
			b.WriteString(" ")
		}
		b.WriteString(col + "=" + formatValue(r[col]))
	}
	return b.String()
}

func formatValue(v any) string {
	if dv, ok := v.(driver.Valuer); ok {
		if x, err := dv.Value(); err == nil {
			if str, ok := x.(string); ok {
				return str // a numeric's digits, an interval, ...
			}
			v = x
		}
	}
	switch x := v.(type) {
	case nil:
		return "NULL"
	case []byte:
		return `\x` + hex.EncodeToString(x)
	case [16]byte: // a uuid, as pgx decodes one
		return uuid.UUID(x).String()
	case time.Time:
		return x.Format(time.RFC3339Nano)
	case string:
		return strconv.Quote(x)
	}
	return fmt.Sprint(v)
}
