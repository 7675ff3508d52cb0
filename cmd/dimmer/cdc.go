package main

import (
	"context"
	"fmt"
	"os"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/cobra"

	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/flags"
)

func init() {
	commandGroups = append(commandGroups, func(c *cli) *cobra.Command { return c.cdcCmd() })
}

func (c *cli) cdcCmd() *cobra.Command {
	var db string
	cmd := &cobra.Command{
		Use:   "cdc",
		Short: "Inspect and drop the replication slots of change data capture",
		Long: `Operate the logical replication slots package cdc created (its log-mode
outbox relays and table syncs), as registered in <schema>.cdc_slots of the
source database --db (default: --store when it is a postgres:// URL).

A slot keeps WAL on the server until its reader confirms it: a reader that
stopped for good keeps it forever. "status" shows what each slot holds back
(and each migration's write fence: whether a fenced cutover stopped writes to
the old side) and fails past --max-retained; "drop" removes a slot with its
publication.

"cutover" moves a migration whose table is synced by CDC to a stage that no
longer writes the old side, holding the old side's writers at the
migration's fence while the sync catches up.

Exit codes: 0 done (status: every slot within bounds); 1 a slot over its
bound, lost or missing, a sync that did not catch up in time (nothing
flipped), or an unreachable database; 2 bad usage; 3 the step refused by
the controller's rules or guards.`,
	}
	cmd.PersistentFlags().StringVar(&db, "db", os.Getenv("DIMMER_CDC_DB"), "Postgres URL of the source database (env DIMMER_CDC_DB; default --store)")
	open := func(cmd *cobra.Command) (*pgxpool.Pool, error) {
		url := db
		if url == "" && isPostgres(c.storeURL) {
			url = c.storeURL
		}
		if url == "" {
			return nil, usagef("no database: pass --db postgres://... (or a postgres --store), or set DIMMER_CDC_DB")
		}
		// Connecting and each statement within --timeout, as every
		// other command: a mute server or a locked registry costs seconds.
		return c.openPool(cmd.Context(), "source database --db", url, true)
	}
	var maxRetained int64
	status := &cobra.Command{
		Use:   "status",
		Short: "List the slots: reader, confirmed position, lag and retained WAL",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if maxRetained < 0 {
				return usagef("--max-retained %d: must be 0 (no bound) or a number of bytes", maxRetained)
			}
			pool, err := open(cmd)
			if err != nil {
				return err
			}
			defer pool.Close()
			st, err := cdc.Slots(cmd.Context(), pool, c.schema)
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "SLOT\tPURPOSE\tPUBLICATION\tREADER\tCONFIRMED\tLAG\tRETAINED\tWAL")
			for _, s := range st {
				reader := "-"
				if s.Active {
					reader = fmt.Sprint("pid ", s.ActivePID)
				}
				wal := s.WALStatus
				if !s.Exists {
					wal = "missing"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Slot, s.Purpose, s.Publication, reader, s.ConfirmedLSN,
					bytesText(s.LagBytes), bytesText(s.RetainedBytes), wal)
			}
			if err := w.Flush(); err != nil {
				return err
			}
			fences, err := cdc.Fences(cmd.Context(), pool, c.schema)
			if err != nil {
				return err
			}
			if len(fences) > 0 {
				fmt.Fprintln(c.out)
				fmt.Fprintln(w, "FENCE\tOLD SIDE\tSINCE")
				for _, f := range fences {
					state := "written"
					if f.Cut {
						state = "cut over"
					}
					fmt.Fprintf(w, "%s\t%s\t%s\n", f.Migration, state, f.ChangedAt.UTC().Format(time.RFC3339))
				}
				if err := w.Flush(); err != nil {
					return err
				}
			}
			return cdc.CheckSlots(cmd.Context(), pool, c.schema, maxRetained)
		},
	}
	status.Flags().Int64Var(&maxRetained, "max-retained", 1<<30, "fail when a slot retains more WAL than this many bytes (0: no bound)")
	var force bool
	drop := &cobra.Command{
		Use:   "drop SLOT",
		Short: "Drop a slot dimmer created, with its publication",
		Long: `Drop a registered slot, its publication and its registry row. A slot with
a connected reader is refused unless --force, which disconnects the reader
first. A slot dimmer did not create is never dropped.`,
		Args: exactArgs(1, "the slot's name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			pool, err := open(cmd)
			if err != nil {
				return err
			}
			defer pool.Close()
			if err := cdc.DropSlot(cmd.Context(), pool, c.schema, args[0], force); err != nil {
				return err
			}
			fmt.Fprintf(c.out, "%s: dropped\n", args[0])
			return nil
		},
	}
	drop.Flags().BoolVar(&force, "force", false, "disconnect the slot's reader first")
	cmd.AddCommand(status, drop, c.cdcCutoverCmd(&db))
	return cmd
}

func bytesText(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fGiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fKiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}

func (c *cli) cdcCutoverCmd(db *string) *cobra.Command {
	var slot, reason, stage string
	var maxPause, wait time.Duration
	cmd := &cobra.Command{
		Use:   "cutover MIGRATION --slot SLOT --reason TEXT [--stage complete] [--max-pause 2s] [--wait 1m]",
		Short: "Fenced cutover: hold the old side's writers, wait for the sync's lag 0, flip the stage, release",
		Long: `Move MIGRATION to --stage (complete by default; a stage that no longer
writes the old side) with no write lost or applied twice, the sequence of
cdc.Cutover run from the command line while the sync runs in its service:

  1. the step is planned with the controller of --store (its rules and
     guards; a refused step holds nothing, exit 3);
  2. the migration's fence in the source database --db closes: the old
     side's writers (which enter it in each write transaction,
     cdc.InstallFence) wait, writes already inside commit;
  3. the sync's slot --slot must report every change committed before as
     applied (its lag reaches 0) within --max-pause; otherwise the fence
     opens again, nothing is flipped (exit 1). Before the fence closes the
     command waits, writers not held, up to --wait for the slot to catch up
     with the log as it was (exit 1, nothing held, if it does not), so the
     held wait is only the tail;
  4. the stage flips (audited) and the fence is released as cut: the held
     writers ask the flag again and write the new side.

The pause the writers saw is printed. Keep --max-pause at most the writers'
fence wait (cdc.FenceConfig.MaxWait), so they wait rather than fail.`,
		Args: exactArgs(1, "MIGRATION"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := argName(args[0]); err != nil {
				return err
			}
			to, err := argStage(stage)
			if err != nil {
				return err
			}
			switch {
			case to.Writes(flags.Old):
				return usagef("--stage %s still writes the old side: a cutover moves to a stage that does not (complete)", to)
			case slot == "":
				return usagef("--slot is required: the replication slot of the sync that carries the old side's changes (see 'dimmer cdc status')")
			case reason == "":
				return usagef("--reason is required: say why, it goes to the audit log")
			case maxPause < time.Millisecond:
				return usagef("--max-pause %v: must be at least 1ms", maxPause)
			case wait <= 0:
				return usagef("--wait %v: must be positive", wait)
			}
			if reason, err = c.reasonArg(reason); err != nil {
				return err
			}
			url := *db
			if url == "" && isPostgres(c.storeURL) {
				url = c.storeURL
			}
			if url == "" {
				return usagef("no database: pass --db postgres://... (the source database, which holds the fence and the slot), or set DIMMER_CDC_DB")
			}
			pool, err := c.openPool(cmd.Context(), "source database --db", url, true)
			if err != nil {
				return err
			}
			defer pool.Close()
			fence, err := cdc.OpenFence(cmd.Context(), pool, cdc.FenceConfig{Migration: args[0], Schema: c.schema})
			if err != nil {
				return err
			}
			_, ctrl, err := c.openController(cmd.Context())
			if err != nil {
				return err
			}
			slots, err := cdc.Slots(cmd.Context(), pool, c.schema)
			if err != nil {
				return err
			}
			if !slices.ContainsFunc(slots, func(s cdc.SlotStatus) bool { return s.Slot == slot }) {
				return fmt.Errorf("%w: %s is not registered in %s.cdc_slots of --db (see 'dimmer cdc status')", cdc.ErrNoSlot, slot, c.schema)
			}
			// Catch up first, writers not held, so that the fenced wait is
			// only what was written meanwhile.
			wctx, cancel := context.WithTimeout(cmd.Context(), wait)
			err = cdc.WaitSlot(wctx, pool, slot)
			cancel()
			if err != nil {
				return fmt.Errorf("slot %s did not catch up within --wait %v (nothing held, nothing flipped; see 'dimmer cdc status'): %w", slot, wait, err)
			}
			res, err := cdc.Cutover(cmd.Context(), fence, cdc.CutoverConfig{Controller: ctrl, Stage: to, Slot: slot,
				Actor: c.actor, Reason: reason, MaxPause: maxPause})
			if err != nil {
				if st, lerr := ctrl.Store().Load(context.WithoutCancel(cmd.Context()), args[0]); lerr == nil && st.Stage.Writes(flags.Old) {
					return fmt.Errorf("%w\nnothing flipped: %s is still %s and its old side is written", err, args[0], st)
				}
				return err
			}
			fmt.Fprintf(c.out, "%s: %s (revision %d)\nwrites to the old side held %v (drain %v, catch-up %v, flip %v); the fence is cut\n",
				res.State.Migration, res.State, res.State.Revision, round(res.Pause), round(res.Drain), round(res.CatchUp), round(res.Flip))
			return nil
		},
	}
	cmd.Flags().StringVar(&slot, "slot", "", "replication slot of the sync carrying the old side's changes (required)")
	cmd.Flags().StringVar(&reason, "reason", "", "why the cutover is made (required; audited)")
	cmd.Flags().StringVar(&stage, "stage", flags.Complete.String(), "stage cut over to; it must not write the old side")
	cmd.Flags().DurationVar(&maxPause, "max-pause", 2*time.Second, "longest the writers are held; past it nothing is flipped")
	cmd.Flags().DurationVar(&wait, "wait", time.Minute, "longest to wait, writers not held, for the sync to catch up before holding them")
	return cmd
}

// round keeps a pause readable: microseconds below a millisecond.
func round(d time.Duration) time.Duration {
	if d < time.Millisecond {
		return d.Round(time.Microsecond)
	}
	return d.Round(100 * time.Microsecond)
}
