package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/cobra"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
	"github.com/dimmer-dev/dimmer/outbox/redissink"
)

func init() {
	commandGroups = append(commandGroups, func(c *cli) *cobra.Command { return c.outboxCmd() })
}

type outboxOpts struct {
	db         string
	table      string
	buckets    int
	partitions int
}

func (c *cli) outboxCmd() *cobra.Command {
	o := &outboxOpts{}
	cmd := &cobra.Command{
		Use:   "outbox",
		Short: "Run an outbox relay, inspect the backlog, handle dead letters",
		Long: `Operate a transactional outbox (package outbox) a service installed.

The database is --db (default: --store when it is a postgres:// URL); the
outbox is the table --table in --schema (defaults "outbox" in "dimmer"),
with the bucket count it was installed with.

Exit codes: 0 done; 2 bad usage; 1 other (an unknown dead letter, an
unreachable database or broker).`,
	}
	cmd.PersistentFlags().StringVar(&o.db, "db", os.Getenv("DIMMER_OUTBOX_DB"), "Postgres URL of the outbox's database (env DIMMER_OUTBOX_DB; default --store)")
	cmd.PersistentFlags().StringVar(&o.table, "table", outbox.DefaultTable, "outbox table name (in --schema)")
	cmd.PersistentFlags().IntVar(&o.buckets, "buckets", 0, "install the outbox with this many buckets if it is missing (default: use the installed outbox, never install)")
	cmd.PersistentFlags().IntVar(&o.partitions, "partitions", 0, "with --buckets: split the table into this many partitions, one per relay expected (default 1: one table)")
	dead := &cobra.Command{Use: "dead", Short: "List, retry or skip dead letters (messages that failed every attempt)"}
	dead.AddCommand(c.outboxDeadListCmd(o), c.outboxDeadRetryCmd(o), c.outboxDeadSkipCmd(o))
	cmd.AddCommand(c.outboxRelayCmd(o), c.outboxStatusCmd(o), dead)
	return cmd
}

// openOutbox connects to the outbox's database and returns a handle on the
// installed outbox (installing it first when --buckets is given).
func (c *cli) openOutbox(ctx context.Context, o *outboxOpts) (*pgxpool.Pool, *outbox.Outbox, error) {
	url := o.db
	if url == "" && isPostgres(c.storeURL) {
		url = c.storeURL
	}
	if url == "" {
		return nil, nil, usagef("no database: pass --db postgres://... (or a postgres --store), or set DIMMER_OUTBOX_DB")
	}
	if strings.TrimSpace(o.table) == "" {
		return nil, nil, usagef("--table is empty: name the outbox table (default %s)", outbox.DefaultTable)
	}
	if o.buckets < 0 || o.buckets > outbox.MaxBuckets {
		return nil, nil, usagef("--buckets %d: must be 1..%d", o.buckets, outbox.MaxBuckets)
	}
	if o.partitions != 0 && o.buckets == 0 {
		return nil, nil, usagef("--partitions %d without --buckets: the layout is chosen when the outbox is installed", o.partitions)
	}
	pool, err := c.openPool(ctx, "outbox database --db", url, true)
	if err != nil {
		return nil, nil, err
	}
	ob, err := c.installedOutbox(ctx, pool, o)
	if err != nil {
		pool.Close()
		return nil, nil, err
	}
	return pool, ob, nil
}

func (c *cli) installedOutbox(ctx context.Context, pool *pgxpool.Pool, o *outboxOpts) (*outbox.Outbox, error) {
	if o.buckets > 0 {
		partitions := o.partitions
		if partitions == 0 {
			// Not asked: the installed layout, if any (--buckets only
			// installs what is missing).
			if cfg, err := outbox.Installed(ctx, pool, c.schema, o.table); err == nil {
				partitions = cfg.Partitions
			}
		}
		ob, err := outbox.New(outbox.Config{Schema: c.schema, Table: o.table, Buckets: o.buckets, Partitions: partitions})
		if err != nil {
			return nil, usageError{err}
		}
		if err := ob.Install(ctx, pool); err != nil {
			if installed, ierr := outbox.Installed(ctx, pool, c.schema, o.table); errors.Is(err, outbox.ErrSchemaMismatch) && ierr == nil {
				// The flags asked for another layout than the one
				// installed: bad usage, in the flags' words.
				given := fmt.Sprintf("--buckets %d", o.buckets)
				if o.partitions != 0 {
					given += fmt.Sprintf(" --partitions %d", o.partitions)
				}
				return nil, usagef("%s: %s.%s is installed with --buckets %d --partitions %d, and a layout cannot change (leave out --buckets and --partitions to use it as it is)",
					given, c.schema, o.table, installed.Buckets, installed.Partitions)
			}
			return nil, err
		}
		return ob, nil
	}
	cfg, err := outbox.Installed(ctx, pool, c.schema, o.table)
	if errors.Is(err, outbox.ErrNotInstalled) {
		return nil, usagef("%v (the service installs it at start-up; or pass --buckets N to install it here)", err)
	}
	if err != nil {
		if errors.Is(err, outbox.ErrInvalidConfig) {
			return nil, usageError{err}
		}
		return nil, err
	}
	return outbox.New(cfg)
}

type relayOpts struct {
	publisher    string
	brokers      string
	redisURL     string
	streamPrefix string
	maxLen       int64
	auth         kafkaAuth
	cfg          outbox.RelayConfig
	drain        time.Duration
}

func (c *cli) outboxRelayCmd(o *outboxOpts) *cobra.Command {
	ro := &relayOpts{}
	cmd := &cobra.Command{
		Use:   "relay",
		Short: "Run a relay as a standalone process until SIGTERM or SIGINT",
		Long: `Run an outbox relay: publish the outbox's messages to Kafka or Redis
Streams, sharing the key buckets with every other relay of the outbox (in
services or in other sidecars) and keeping each key's commit order.

On SIGTERM or SIGINT the batch in flight completes, the bucket leases are
handed back at once (the other relays take over without waiting for them to
expire) and the command exits 0; past --drain-timeout it cuts the batch in
flight short (its messages may be published again) and still hands the
leases back.

Kafka: --brokers (env DIMMER_KAFKA_BROKERS), idempotent producer, acks from
all in-sync replicas; --tls, --tls-ca and --sasl* reach a secured cluster,
with the SASL password in --sasl-password-file or DIMMER_KAFKA_SASL_PASSWORD
(never on the command line). Redis: --redis URL (env DIMMER_REDIS_URL), one stream
per topic named --stream-prefix + topic, trimmed to about --maxlen entries.`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			return c.runRelay(cmd, o, ro)
		},
	}
	f := cmd.Flags()
	f.StringVar(&ro.publisher, "publisher", "kafka", "where to publish: kafka or redis")
	f.StringVar(&ro.brokers, "brokers", os.Getenv("DIMMER_KAFKA_BROKERS"), "Kafka seed brokers, comma-separated (env DIMMER_KAFKA_BROKERS)")
	ro.auth.register(f, c.red, "", "", "Kafka cluster")
	f.StringVar(&ro.redisURL, "redis", os.Getenv("DIMMER_REDIS_URL"), "Redis URL for --publisher redis (env DIMMER_REDIS_URL)")
	f.StringVar(&ro.streamPrefix, "stream-prefix", "", "prefix of the Redis stream names")
	f.Int64Var(&ro.maxLen, "maxlen", 0, "trim each Redis stream to about this many entries (0: no trim)")
	f.StringVar(&ro.cfg.ID, "id", "", "relay ID in the leases and logs (default host-pid-random)")
	f.IntVar(&ro.cfg.BatchSize, "batch-size", 0, "messages per batch, one per key (default 1000)")
	f.DurationVar(&ro.cfg.PollInterval, "poll", 0, "fallback poll interval when no NOTIFY arrives (default 1s)")
	f.DurationVar(&ro.cfg.LeaseTTL, "lease-ttl", 0, "bucket lease lifetime without renewal (default 10s)")
	f.IntVar(&ro.cfg.MaxAttempts, "max-attempts", 0, "failed attempts before a message becomes a dead letter (default 10)")
	f.DurationVar(&ro.drain, "drain-timeout", 30*time.Second, "how long a graceful stop may take")
	return cmd
}

// relayFlags are the RelayConfig fields outbox relay's flags set.
var relayFlags = fieldFlags{"BatchSize": "batch-size", "PollInterval": "poll", "LeaseTTL": "lease-ttl", "MaxAttempts": "max-attempts", "ID": "id"}

func (c *cli) runRelay(cmd *cobra.Command, o *outboxOpts, ro *relayOpts) error {
	ctx := cmd.Context()
	if ro.drain <= 0 {
		return usagef("--drain-timeout %v: must be positive", ro.drain)
	}
	if err := noZero(cmd, "batch-size", "poll", "lease-ttl", "max-attempts"); err != nil {
		return err
	}
	pub, closePub, err := ro.open(ctx, c)
	if err != nil {
		return err
	}
	defer closePub()
	pool, ob, err := c.openOutbox(ctx, o)
	if err != nil {
		return err
	}
	defer pool.Close()
	cfg := ro.cfg
	cfg.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: slog.LevelInfo}))
	relay, err := ob.NewRelay(pool, pub, cfg)
	if err != nil {
		if errors.Is(err, outbox.ErrInvalidConfig) {
			return relayFlags.explain(usageError{err})
		}
		return err
	}
	// The relay runs on a context of its own: the signal (ctx) asks for a
	// graceful stop, which cancelling Run's context would not be.
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- relay.Run(runCtx) }()
	fmt.Fprintf(c.out, "relay %s publishing %s.%s to %s\n", relay.ID(), c.schema, o.table, ro.publisher)
	select {
	case err := <-done:
		return fmt.Errorf("relay stopped: %w", err)
	case <-ctx.Done():
	}
	sctx, scancel := context.WithTimeout(context.WithoutCancel(ctx), ro.drain)
	defer scancel()
	serr := relay.Shutdown(sctx)
	if err := <-done; err != nil && serr == nil {
		serr = err
	}
	if serr != nil {
		return fmt.Errorf("relay stopped abruptly (the batch in flight may be published again): %w", serr)
	}
	fmt.Fprintf(c.out, "relay %s stopped; leases released\n", relay.ID())
	return nil
}

// open builds the publisher the flags ask for.
func (ro *relayOpts) open(ctx context.Context, c *cli) (outbox.Publisher, func(), error) {
	switch ro.publisher {
	case "kafka":
		seeds, err := brokerList("--brokers", ro.brokers)
		if err != nil {
			return nil, nil, err
		}
		if len(seeds) == 0 {
			return nil, nil, usagef("--publisher kafka needs --brokers host:port[,...] or DIMMER_KAFKA_BROKERS")
		}
		// The cluster must answer within --timeout before the relay starts;
		// the relay's own client keeps the producer's timeouts, which ride
		// out a broker's restart.
		auth, err := ro.auth.opts()
		if err != nil {
			return nil, nil, err
		}
		probe, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(seeds...), kgo.DialTimeout(c.timeout),
			kgo.RequestTimeoutOverhead(c.timeout), kgo.RetryTimeout(c.timeout)}, auth...)...)
		if err != nil {
			return nil, nil, usagef("--brokers: %v", err)
		}
		err = pingKafka(ctx, probe, c.timeout, "kafka "+strings.Join(seeds, ","), &ro.auth)
		probe.Close()
		if err != nil {
			return nil, nil, err
		}
		cl, err := kgo.NewClient(append(kafkasink.ClientOptions(seeds...), auth...)...)
		if err != nil {
			return nil, nil, usagef("--brokers: %v", err)
		}
		p, err := kafkasink.New(cl)
		if err != nil {
			cl.Close()
			return nil, nil, err
		}
		return p, cl.Close, nil
	case "redis":
		if ro.redisURL == "" {
			return nil, nil, usagef("--publisher redis needs --redis redis://... or DIMMER_REDIS_URL")
		}
		rdb, err := c.openRedis(ctx, "redis --redis", ro.redisURL)
		if err != nil {
			return nil, nil, err
		}
		var sinkOpts []redissink.Option
		if ro.streamPrefix != "" {
			sinkOpts = append(sinkOpts, redissink.WithStreamPrefix(ro.streamPrefix))
		}
		if ro.maxLen < 0 {
			rdb.Close()
			return nil, nil, usagef("--maxlen %d: must not be negative", ro.maxLen)
		}
		if ro.maxLen > 0 {
			sinkOpts = append(sinkOpts, redissink.WithMaxLen(ro.maxLen))
		}
		p, err := redissink.New(rdb, sinkOpts...)
		if err != nil {
			rdb.Close()
			return nil, nil, usageError{err}
		}
		return p, func() { rdb.Close() }, nil
	}
	return nil, nil, usagef("--publisher %q: want kafka or redis", ro.publisher)
}

func (c *cli) outboxStatusCmd(o *outboxOpts) *cobra.Command {
	var topic string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Print the backlog: undelivered messages (dead letters included), dead letters, age of the oldest",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			pool, ob, err := c.openOutbox(cmd.Context(), o)
			if err != nil {
				return err
			}
			defer pool.Close()
			s, err := ob.Stats(cmd.Context(), pool, topic)
			if err != nil {
				return err
			}
			// Pending counts every undelivered message, dead letters too.
			fmt.Fprintf(c.out, "pending %d (dead letters included)\ndead %d\noldest %s\n", s.Pending, s.Dead, s.Oldest.Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().StringVar(&topic, "topic-prefix", "", "count only topics starting with this")
	return cmd
}

func (c *cli) outboxDeadListCmd(o *outboxOpts) *cobra.Command {
	var topic string
	var limit int
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List dead letters, oldest first, with how many later messages of their key wait",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if limit < 1 {
				return usagef("--limit %d: must be positive", limit)
			}
			pool, ob, err := c.openOutbox(cmd.Context(), o)
			if err != nil {
				return err
			}
			defer pool.Close()
			dead, err := ob.DeadLetters(cmd.Context(), pool, topic, limit)
			if err != nil {
				return err
			}
			if len(dead) == 0 {
				fmt.Fprintln(c.out, "no dead letters")
				return nil
			}
			w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "ID\tTOPIC\tKEY\tATTEMPTS\tDEAD AT\tWAITING\tLAST ERROR")
			for _, d := range dead {
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%d\t%s\n", d.ID, d.Topic, escapeControls(d.Key), d.Attempts,
					d.DeadAt.UTC().Format(time.RFC3339), d.Waiting, escapeControls(oneLine(d.LastError, 120)))
			}
			return w.Flush()
		},
	}
	cmd.Flags().StringVar(&topic, "topic", "", "only this topic")
	cmd.Flags().IntVar(&limit, "limit", 100, "at most this many")
	return cmd
}

func parseIDs(args []string) ([]uuid.UUID, error) {
	ids := make([]uuid.UUID, len(args))
	for i, a := range args {
		id, err := uuid.Parse(a)
		if err != nil {
			return nil, usagef("%q is not a message ID (a UUID): %v", a, err)
		}
		ids[i] = id
	}
	return ids, nil
}

func (c *cli) outboxDeadRetryCmd(o *outboxOpts) *cobra.Command {
	var all bool
	var topic string
	cmd := &cobra.Command{
		Use:   "retry ID... | --all [--topic T]",
		Short: "Make dead letters pending again with a fresh attempt budget (then their key flows again)",
		Long: `Make the dead letters named by ID pending again, or with --all every dead
letter (of --topic only, if given): after a broker outage that outlasted
the relay's attempts, --all lets every held key flow again, each in its
order.`,
		Args: func(cmd *cobra.Command, args []string) error {
			switch {
			case all && len(args) > 0:
				return usagef("give IDs or --all, not both")
			case !all && len(args) == 0:
				return usagef("expected ID... or --all")
			case topic != "" && !all:
				return usagef("--topic goes with --all")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			ids, err := parseIDs(args)
			if err != nil {
				return err
			}
			pool, ob, err := c.openOutbox(cmd.Context(), o)
			if err != nil {
				return err
			}
			defer pool.Close()
			if all {
				n, err := ob.RetryAllDead(cmd.Context(), pool, topic)
				if err != nil {
					return err
				}
				fmt.Fprintf(c.out, "%d dead letter(s) pending again\n", n)
				return nil
			}
			var failed []error
			for _, id := range ids {
				if err := ob.RetryDead(cmd.Context(), pool, id); err != nil {
					failed = append(failed, err)
					continue
				}
				fmt.Fprintf(c.out, "%s: pending again\n", id)
			}
			return errors.Join(failed...)
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "every dead letter (of --topic, if given)")
	cmd.Flags().StringVar(&topic, "topic", "", "with --all, only this topic's dead letters")
	return cmd
}

// skipped is what dead skip prints of each message it drops, so the
// operator keeps a record of it (payload as base64).
type skipped struct {
	ID      uuid.UUID         `json:"id"`
	Topic   string            `json:"topic"`
	Key     string            `json:"key,omitempty"`
	Headers map[string]string `json:"headers,omitempty"`
	// HeadersStored: headers that are not an object of strings, as stored.
	HeadersStored string    `json:"headers_stored,omitempty"`
	Payload       []byte    `json:"payload"`
	Attempts      int       `json:"attempts"`
	CreatedAt     time.Time `json:"created_at"`
	LastError     string    `json:"last_error,omitempty"`
	DeadAt        time.Time `json:"dead_at"`
}

func (c *cli) outboxDeadSkipCmd(o *outboxOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "skip ID...",
		Short: "Drop dead letters without publishing them (prints each as JSON for the record)",
		Long: `Drop dead letters without publishing them: the later messages of their key
then flow. Each dropped message is printed to stdout as one JSON line (the
payload base64-encoded), so the operator keeps a record of what was skipped.`,
		Args: minArgs(1, "ID..."),
		RunE: func(cmd *cobra.Command, args []string) error {
			ids, err := parseIDs(args)
			if err != nil {
				return err
			}
			pool, ob, err := c.openOutbox(cmd.Context(), o)
			if err != nil {
				return err
			}
			defer pool.Close()
			enc := json.NewEncoder(c.out)
			var failed []error
			for _, id := range ids {
				r, err := ob.SkipDead(cmd.Context(), pool, id)
				if err != nil {
					failed = append(failed, err)
					continue
				}
				if err := enc.Encode(skipped{ID: r.ID, Topic: r.Topic, Key: r.Key, Headers: r.Headers, HeadersStored: r.RawHeaders,
					Payload: r.Payload, Attempts: r.Attempts, CreatedAt: r.CreatedAt, LastError: r.LastError, DeadAt: r.DeadAt}); err != nil {
					failed = append(failed, err)
				}
			}
			return errors.Join(failed...)
		},
	}
}

func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
