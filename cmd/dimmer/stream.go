package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/streams"
)

func init() {
	commandGroups = append(commandGroups, func(c *cli) *cobra.Command { return c.streamCmd() })
}

type streamOpts struct {
	oldBrokers, newBrokers string
	auth                   [3]kafkaAuth // by flags.Side
}

func (c *cli) streamCmd() *cobra.Command {
	o := &streamOpts{}
	cmd := &cobra.Command{
		Use:   "stream",
		Short: "Move a Kafka topic between clusters: status, lag, mirror, translate, replay",
		Long: `Operate a topic moving from one Kafka cluster (old) to another (new)
with package streams.

The clusters are --old-brokers (env DIMMER_KAFKA_BROKERS) and --new-brokers
(env DIMMER_KAFKA_BROKERS_NEW); administration goes through kadm. A secured
cluster takes --old-tls, --old-tls-ca and --old-sasl* (env DIMMER_KAFKA_TLS,
DIMMER_KAFKA_SASL, ...), and --new-* likewise (env DIMMER_KAFKA_*_NEW); a
SASL password is read from --old-sasl-password-file or
DIMMER_KAFKA_SASL_PASSWORD (DIMMER_KAFKA_SASL_PASSWORD_NEW for the new
cluster), never from the command line. status, lag, translate and replay
first ask the clusters they use for an answer, all at once, so clusters
that do not answer cost one --timeout.

Exit codes: 0 done; 2 bad usage (an unknown topic or group, partition counts
that differ, a range outside retention, a missing cluster); 1 other (a lag
over --max-lag, an unreachable cluster, a group still running).`,
	}
	cmd.PersistentFlags().StringVar(&o.oldBrokers, "old-brokers", os.Getenv("DIMMER_KAFKA_BROKERS"), "old cluster's seed brokers, comma-separated (env DIMMER_KAFKA_BROKERS)")
	cmd.PersistentFlags().StringVar(&o.newBrokers, "new-brokers", os.Getenv("DIMMER_KAFKA_BROKERS_NEW"), "new cluster's seed brokers, comma-separated (env DIMMER_KAFKA_BROKERS_NEW)")
	o.auth[flags.Old].register(cmd.PersistentFlags(), c.red, "old-", "", "old cluster")
	o.auth[flags.New].register(cmd.PersistentFlags(), c.red, "new-", "_NEW", "new cluster")
	cmd.AddCommand(c.streamStatusCmd(o), c.streamLagCmd(o), c.streamMirrorCmd(o), c.streamTranslateCmd(o), c.streamReplayCmd(o))
	return cmd
}

// opts returns each cluster's client options; a missing one is bad usage.
// Dialling and each request give up after timeout; oneShot commands also
// stop retrying a request after it, where the mirror rides out an outage.
func (o *streamOpts) opts(timeout time.Duration, oneShot bool) ([3][]kgo.Opt, error) {
	var out [3][]kgo.Opt
	for _, side := range []flags.Side{flags.Old, flags.New} {
		b := map[flags.Side]string{flags.Old: o.oldBrokers, flags.New: o.newBrokers}[side]
		flag := "--" + side.String() + "-brokers"
		seeds, err := brokerList(flag, b)
		if err != nil {
			return out, err
		}
		if len(seeds) == 0 {
			return out, usagef("no %s cluster: pass %s or set %s", side, flag, map[flags.Side]string{flags.Old: "DIMMER_KAFKA_BROKERS", flags.New: "DIMMER_KAFKA_BROKERS_NEW"}[side])
		}
		auth, err := o.auth[side].opts()
		if err != nil {
			return out, err
		}
		out[side] = append([]kgo.Opt{kgo.SeedBrokers(seeds...), kgo.DialTimeout(timeout), kgo.RequestTimeoutOverhead(timeout)}, auth...)
		if oneShot {
			out[side] = append(out[side], kgo.RetryTimeout(timeout))
		}
	}
	return out, nil
}

func (o *streamOpts) admins(ctx context.Context, timeout time.Duration) (old, new *kadm.Client, closeAll func(), err error) {
	opts, err := o.opts(timeout, true)
	if err != nil {
		return nil, nil, nil, err
	}
	if err := o.reach(ctx, timeout, opts, flags.Old, flags.New); err != nil {
		return nil, nil, nil, err
	}
	ocl, err := kgo.NewClient(opts[flags.Old]...)
	if err != nil {
		return nil, nil, nil, usagef("--old-brokers: %v", err)
	}
	ncl, err := kgo.NewClient(opts[flags.New]...)
	if err != nil {
		ocl.Close()
		return nil, nil, nil, usagef("--new-brokers: %v", err)
	}
	return kadm.NewClient(ocl), kadm.NewClient(ncl), func() { ocl.Close(); ncl.Close() }, nil
}

// reach asks each cluster for an answer, all at once and within timeout,
// before a one-shot command starts: its requests then go to clusters that
// answer, and two mute clusters cost one timeout, not one each.
func (o *streamOpts) reach(ctx context.Context, timeout time.Duration, opts [3][]kgo.Opt, sides ...flags.Side) error {
	errs := make([]error, len(sides))
	var wg sync.WaitGroup
	for i, side := range sides {
		wg.Go(func() {
			cl, err := kgo.NewClient(opts[side]...)
			if err != nil {
				errs[i] = usagef("--%s-brokers: %v", side, err)
				return
			}
			defer cl.Close()
			brokers := map[flags.Side]string{flags.Old: o.oldBrokers, flags.New: o.newBrokers}[side]
			errs[i] = pingKafka(ctx, cl, timeout, fmt.Sprintf("%s cluster %s", side, brokers), &o.auth[side])
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// streamErr marks bad input as bad usage (exit 2), and says which
// credentials to check when a cluster ended the connection.
func (o *streamOpts) streamErr(err error) error {
	if ce := (*streams.ClusterError)(nil); errors.As(err, &ce) {
		err = saslHint(err, &o.auth[ce.Side])
	} else {
		err = saslHint(err, &o.auth[flags.Old], &o.auth[flags.New])
	}
	for _, e := range []error{streams.ErrUnknownTopic, streams.ErrUnknownGroup, streams.ErrPartitionMismatch,
		streams.ErrOutOfRetention, streams.ErrMissingCluster} {
		if errors.Is(err, e) {
			return usageError{err}
		}
	}
	return err
}

func (c *cli) streamStatusCmd(o *streamOpts) *cobra.Command {
	var group, mirrorGroup string
	cmd := &cobra.Command{
		Use:   "status TOPIC",
		Short: "Per partition: both clusters' ends, the mirror's position and the group's state",
		Args:  topicArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			oldAdm, newAdm, closeAll, err := o.admins(cmd.Context(), c.timeout)
			if err != nil {
				return err
			}
			defer closeAll()
			if mirrorGroup == "" {
				mirrorGroup = "dimmer-mirror." + args[0]
			}
			st, err := streams.GroupStatus(cmd.Context(), oldAdm, newAdm, args[0], group, mirrorGroup)
			if err != nil {
				return o.streamErr(err)
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PARTITION\tOLD END\tNEW END\tMIRROR FROM\tMIRROR AT\tMIRROR LAG\tGROUP ON\tEPOCH\tAT\tLAG\tHOLES")
			for _, p := range st.Partitions {
				fmt.Fprintf(tw, "%d\t%d\t%d\t%s\t%d\t%d\t%s\t%d\t%d\t%d\t%d\n", p.Partition, p.OldEnd, p.NewEnd, p.MirrorOn, p.MirrorAt, p.MirrorLag,
					p.GroupOn, p.Epoch, p.At, p.Lag, p.Holes)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&group, "group", "", "consumer group to show (default: none)")
	cmd.Flags().StringVar(&mirrorGroup, "mirror-group", "", "the mirror's group, looked for on both clusters: old, or new for a mirror back (default dimmer-mirror.TOPIC)")
	return cmd
}

func (c *cli) streamLagCmd(o *streamOpts) *cobra.Command {
	var group, mirrorGroup string
	var maxLag int64
	cmd := &cobra.Command{
		Use:   "lag TOPIC --group GROUP",
		Short: "The group's lag on the cluster it reads and the mirror's lag; fails past --max-lag",
		Args:  topicArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			if group == "" {
				return usagef("--group is required")
			}
			oldAdm, newAdm, closeAll, err := o.admins(cmd.Context(), c.timeout)
			if err != nil {
				return err
			}
			defer closeAll()
			if mirrorGroup == "" {
				mirrorGroup = "dimmer-mirror." + args[0]
			}
			st, err := streams.GroupStatus(cmd.Context(), oldAdm, newAdm, args[0], group, mirrorGroup)
			if err != nil {
				return o.streamErr(err)
			}
			mirrorFrom := flags.Old
			if len(st.Partitions) > 0 {
				mirrorFrom = st.Partitions[0].MirrorOn
			}
			fmt.Fprintf(c.out, "group %s lag %d\nmirror %s from %s lag %d\n", group, st.MaxGroupLag(), mirrorGroup, mirrorFrom, st.MaxMirrorLag())
			if maxLag >= 0 && (st.MaxGroupLag() > maxLag || st.MaxMirrorLag() > maxLag) {
				return fmt.Errorf("lag over --max-lag %d", maxLag)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&group, "group", "", "consumer group (required)")
	cmd.Flags().StringVar(&mirrorGroup, "mirror-group", "", "the mirror's group, looked for on both clusters: old, or new for a mirror back (default dimmer-mirror.TOPIC)")
	cmd.Flags().Int64Var(&maxLag, "max-lag", -1, "exit 1 when a partition lags more than this (default: never)")
	return cmd
}

func (c *cli) streamMirrorCmd(o *streamOpts) *cobra.Command {
	cfg := streams.MirrorConfig{}
	from := "old"
	cmd := &cobra.Command{
		Use:   "mirror TOPIC",
		Short: "Copy the topic from old to new (or --from new: back) until SIGTERM or SIGINT, resuming where it stopped",
		Args:  topicArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			side, err := parseSide(from)
			if err != nil {
				return usagef("--from %q: want old or new", from)
			}
			if cfg.MaxBatch < 0 {
				return usagef("--batch %d: must be positive", cfg.MaxBatch)
			}
			if err := noZero(cmd, "batch"); err != nil {
				return err
			}
			opts, err := o.opts(c.timeout, false)
			if err != nil {
				return err
			}
			cfg.Topic, cfg.Old, cfg.New, cfg.From = args[0], opts[flags.Old], opts[flags.New], side
			m, err := streams.NewMirror(cfg)
			if err != nil {
				return usageError{err}
			}
			// Logged, not printed: the one line on stdout is the outcome,
			// and a mirror that fails at once (an unknown topic) did not
			// mirror anything.
			c.logger.Info("mirror starting", "topic", args[0], "from", side.String(), "to", side.Other().String())
			if err := m.Run(cmd.Context()); err != nil {
				return o.streamErr(err)
			}
			s := m.Stats()
			fmt.Fprintf(c.out, "mirror stopped: %d copied, %d copies not copied back\n", s.Copied, s.Skipped)
			return nil
		},
	}
	cmd.Flags().StringVar(&from, "from", from, "the cluster copied from: old, or new after complete so consumers can roll back")
	cmd.Flags().StringVar(&cfg.TargetTopic, "target", "", "topic on the cluster copied to (default: TOPIC)")
	cmd.Flags().StringVar(&cfg.Group, "group", "", "the mirror's position group on the cluster copied from (default dimmer-mirror.TOPIC)")
	cmd.Flags().IntVar(&cfg.MaxBatch, "batch", 0, "records per round (default 10000)")
	return cmd
}

func parseSide(s string) (flags.Side, error) {
	switch s {
	case "old":
		return flags.Old, nil
	case "new":
		return flags.New, nil
	}
	return flags.NoSide, usagef("side %q: want old or new", s)
}

func (c *cli) streamTranslateCmd(o *streamOpts) *cobra.Command {
	var group, to string
	cmd := &cobra.Command{
		Use:   "translate TOPIC --group GROUP --to old|new",
		Short: "Print where the group would resume on a cluster: the first record it has not processed",
		Args:  topicArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			if group == "" {
				return usagef("--group is required")
			}
			side, err := parseSide(to)
			if err != nil {
				return err
			}
			opts, err := o.opts(c.timeout, true)
			if err != nil {
				return err
			}
			if err := o.reach(cmd.Context(), c.timeout, opts, flags.Old, flags.New); err != nil {
				return err
			}
			trs, err := streams.Translate(cmd.Context(), opts, args[0], group, side)
			if err != nil {
				return o.streamErr(err)
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "PARTITION\tSTATE ON\tAT\tNEXT ON %s\tSCANNED\n", strings.ToUpper(side.String()))
			for _, t := range trs {
				fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%d\n", t.Partition, t.From, t.At, t.Next, t.Scanned)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&group, "group", "", "consumer group (required)")
	cmd.Flags().StringVar(&to, "to", "new", "cluster to translate to: old or new")
	return cmd
}

func (c *cli) streamReplayCmd(o *streamOpts) *cobra.Command {
	var group, side, fromTime string
	var fromOffset int64
	cmd := &cobra.Command{
		Use:   "replay TOPIC --group GROUP --side old|new (--from-offset N | --from-time RFC3339)",
		Short: "Rewind a stopped group so its consumers process a range again, once",
		Long: `Rewind a consumer group on the cluster it reads: its position goes back to
--from-offset (every partition) or --from-time, and the records in between
are marked unprocessed in its state, so that when its consumers start they
redo those records' effects once. The group must be stopped.`,
		Args: topicArg,
		RunE: func(cmd *cobra.Command, args []string) error {
			if group == "" {
				return usagef("--group is required")
			}
			if side == "" {
				return usagef("--side is required: old or new, the cluster the group reads")
			}
			s, err := parseSide(side)
			if err != nil {
				return err
			}
			if fromOffset < 0 {
				return usagef("--from-offset %d: must not be negative", fromOffset)
			}
			cfg := streams.RewindConfig{Topic: args[0], Group: group, Side: s, FromOffset: fromOffset}
			switch {
			case fromTime != "" && cmd.Flags().Changed("from-offset"):
				return usagef("give --from-offset or --from-time, not both")
			case fromTime != "":
				if cfg.FromTime, err = time.Parse(time.RFC3339, fromTime); err != nil {
					return usagef("--from-time %q: %v", fromTime, err)
				}
			case !cmd.Flags().Changed("from-offset"):
				return usagef("give --from-offset or --from-time")
			}
			opts, err := o.opts(c.timeout, true)
			if err != nil {
				return err
			}
			if err := o.reach(cmd.Context(), c.timeout, opts, s); err != nil {
				return err
			}
			cfg.Opts = opts[s]
			res, err := streams.Rewind(cmd.Context(), cfg)
			if err != nil {
				return o.streamErr(err)
			}
			if len(res) == 0 {
				fmt.Fprintln(c.out, "nothing to replay: the group is not past that point")
				return nil
			}
			tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "PARTITION\tFROM\tTO\tRECORDS TO REDO")
			for _, r := range res {
				fmt.Fprintf(tw, "%d\t%d\t%d\t%d\n", r.Partition, r.From, r.To, r.Undone)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&group, "group", "", "consumer group (required)")
	cmd.Flags().StringVar(&side, "side", "", "cluster the group reads: old or new (required)")
	cmd.Flags().Int64Var(&fromOffset, "from-offset", 0, "replay from this offset in every partition")
	cmd.Flags().StringVar(&fromTime, "from-time", "", "replay from the first record at or after this time (RFC 3339)")
	return cmd
}

// topicArg takes exactly one TOPIC, not empty.
func topicArg(cmd *cobra.Command, args []string) error {
	if err := exactArgs(1, "TOPIC")(cmd, args); err != nil {
		return err
	}
	if strings.TrimSpace(args[0]) == "" {
		return usagef("TOPIC is empty")
	}
	return nil
}
