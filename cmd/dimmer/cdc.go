package main

import (
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/cobra"

	"github.com/dimmer-dev/dimmer/cdc"
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

Exit codes: 0 done (status: every slot within bounds); 1 a slot over its
bound, lost or missing, or an unreachable database; 2 bad usage.`,
	}
	cmd.PersistentFlags().StringVar(&db, "db", os.Getenv("DIMMER_CDC_DB"), "Postgres URL of the source database (env DIMMER_CDC_DB; default --store)")
	open := func(cmd *cobra.Command) (*pgxpool.Pool, error) {
		url := db
		if url == "" && (strings.HasPrefix(c.storeURL, "postgres://") || strings.HasPrefix(c.storeURL, "postgresql://")) {
			url = c.storeURL
		}
		if url == "" {
			return nil, usagef("no database: pass --db postgres://... (or a postgres --store), or set DIMMER_CDC_DB")
		}
		pool, err := pgxpool.New(cmd.Context(), url)
		if err != nil {
			return nil, usagef("--db: %v", err)
		}
		return pool, nil
	}
	var maxRetained int64
	status := &cobra.Command{
		Use:   "status",
		Short: "List the slots: reader, confirmed position, lag and retained WAL",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
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
	cmd.AddCommand(status, drop)
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
