package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/open-feature/go-sdk/openfeature"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/flags/redisflags"
	"github.com/dimmer-dev/dimmer/outbox"
)

func init() { commandGroups = append(commandGroups, (*cli).uiCmd) }

func (c *cli) uiCmd() *cobra.Command {
	var listen string
	var actions, allowRemote bool
	var refresh time.Duration
	var maxRetained int64
	cmd := &cobra.Command{
		Use:   "ui [--listen 127.0.0.1:8080] [--actions]",
		Short: "Serve the operator console: every migration's stage, go/no-go checks, fleet and timeline in the browser",
		Long: `Serve the operator console (package console): an overview of every
migration and a page per migration with its stage, the next step's checks,
the fleet, the watchdog windows and the audit timeline, refreshed in place.

Every request needs the token in DIMMER_UI_TOKEN (at least 16 characters),
sent as Authorization: Bearer, or typed into the login form. The console is
read-only unless --actions is given: then advance, roll back and rollout
go through the same guarded controller as the CLI; backfill jobs can be
paused and resumed and dead letters of the repair log retried or skipped;
each with a reason, audited under the operator's name. It listens on loopback unless
--allow-remote is given.

GET /metrics serves the same figures for Prometheus (OpenTelemetry's
Prometheus exporter), behind the same token.

Where the replication slot registry of package cdc exists (in DIMMER_CDC_DB,
else the store's database), both pages show every slot's reader, lag and
retained WAL, with an alert past --max-retained-wal.

The pages also listen to the store's change notifications (Postgres
LISTEN/NOTIFY or Redis pub/sub, as server-sent events at GET /api/events)
and show a new stage at once; they poll every --refresh either way. The
charts' samples are kept in the store (table console_samples of the
store's schema, or a sorted set under the Redis prefix; the last hour), so
a console started mid-migration draws what came before.`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			token := os.Getenv("DIMMER_UI_TOKEN")
			if token == "" {
				return usagef("DIMMER_UI_TOKEN is not set: every console request must carry it (use at least %d random characters)", console.MinTokenLength)
			}
			host, port, err := net.SplitHostPort(listen)
			if err != nil {
				return usagef("--listen %q: %v", listen, err)
			}
			if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
				return usagef("--listen %q: the port must be a number from 0 to 65535", listen)
			}
			if ip := net.ParseIP(host); !allowRemote && (ip == nil || !ip.IsLoopback()) && host != "localhost" {
				return usagef("--listen %q is not a loopback address: pass --allow-remote to serve other hosts (put TLS in front)", listen)
			}
			be, err := c.open(cmd.Context())
			if err != nil {
				return err
			}
			// The console's data request and the guards it runs for the
			// next step then read the fleet registry once, not once each.
			be.fleet = console.ShareFleet(be.fleet)
			ctrl, err := c.controller(be)
			if err != nil {
				return err
			}
			metrics, mp := prometheusMetrics()
			defer func() { _ = mp.Shutdown(context.Background()) }()
			opts := []console.Option{console.WithLogger(c.logger), console.WithRefresh(refresh), console.WithMetrics(metrics)}
			if actions {
				opts = append(opts, console.WithActions())
			}
			if be.pool != nil {
				// The backfill tables beside the data guards, as dimmer
				// backfill reads them.
				bf, err := backfill.New(be.pool, backfill.WithSchema(envOr("DIMMER_BACKFILL_SCHEMA", backfill.DefaultSchema)),
					backfill.WithFlagStore(be.store), backfill.WithLogger(c.logger))
				if err != nil {
					return err
				}
				// Shown when its tables exist: the console reads, it never
				// creates what a team does not use.
				if _, err := bf.Jobs(cmd.Context()); err == nil {
					opts = append(opts, console.WithBackfills(bf))
				} else {
					c.logger.Warn("console: no backfill jobs shown", "err", err)
				}
				// The repair log the no-pending-repairs guard reads, when
				// its table exists.
				ob, err := outbox.New(outbox.Config{Schema: be.schema, Table: envOr("DIMMER_OUTBOX_TABLE", outbox.DefaultTable)})
				if err != nil {
					return fmt.Errorf("repair log: %w", err)
				}
				if _, err := ob.Stats(cmd.Context(), be.pool, ""); err == nil {
					opts = append(opts, console.WithRepairs(console.OutboxRepairs(ob, be.pool)))
				} else {
					c.logger.Warn("console: no repair log shown", "err", err)
				}
				// The schema plans of dimmer schema, when its registry exists.
				reg, err := expandcontract.NewRegistry(be.pool, expandcontract.WithSchema(c.schema), expandcontract.WithLogger(c.logger))
				if err != nil {
					return fmt.Errorf("schema registry: %w", err)
				}
				if _, err := reg.Plans(cmd.Context()); err == nil {
					opts = append(opts, console.WithSchemaPlans(reg))
				} else {
					c.logger.Warn("console: no schema plans shown", "err", err)
				}
			}
			// The replication slots of change data capture, as dimmer cdc
			// status reads them (DIMMER_CDC_DB, else the store's database),
			// when their registry exists.
			slotPool := be.pool
			if url := os.Getenv("DIMMER_CDC_DB"); url != "" {
				p, err := pgxpool.New(cmd.Context(), url)
				if err != nil {
					return usagef("DIMMER_CDC_DB: %v", err)
				}
				defer p.Close()
				slotPool = p
			}
			if slotPool != nil {
				var reg *string
				err := slotPool.QueryRow(cmd.Context(), `SELECT to_regclass($1)::text`, pgx.Identifier{c.schema, "cdc_slots"}.Sanitize()).Scan(&reg)
				switch {
				case err != nil:
					c.logger.Warn("console: no replication slots shown", "err", err)
				case reg == nil:
					c.logger.Info("console: no replication slot registry", "schema", c.schema)
				default:
					opts = append(opts, console.WithSlots(console.CDCSlots(slotPool, c.schema), maxRetained))
					stop, err := cdc.ObserveSlots(slotPool, c.schema, mp)
					if err != nil {
						return err
					}
					defer func() { _ = stop() }()
				}
			}
			// The store notifies its changes (Postgres LISTEN/NOTIFY, Redis
			// pub/sub): pages then show a new stage at once instead of at
			// their next poll. The chart samples are kept beside the flags,
			// so a console started later draws the last hour too.
			var changes interface {
				openfeature.FeatureProvider
				openfeature.EventHandler
				InitWithContext(context.Context, openfeature.EvaluationContext) error
				Shutdown()
			}
			var samples console.SampleStore
			switch st := be.store.(type) {
			case *pgflags.Store:
				prov, err := pgflags.NewProvider(be.pool, pgflags.WithSchema(st.Schema()), pgflags.WithLogger(c.logger))
				if err != nil {
					return err
				}
				changes = prov
				pgs, err := console.PostgresSamples(be.pool, st.Schema())
				if err != nil {
					return err
				}
				if err := pgs.Install(cmd.Context()); err != nil {
					c.logger.Warn("console: chart samples kept in memory only", "err", err)
				} else {
					samples = pgs
				}
			case *redisflags.Store:
				prov, err := redisflags.NewProvider(be.redis, redisflags.WithPrefix(st.Prefix()), redisflags.WithLogger(c.logger))
				if err != nil {
					return err
				}
				changes = prov
				if samples, err = console.RedisSamples(be.redis, st.Prefix()); err != nil {
					return err
				}
			}
			if changes != nil {
				if err := changes.InitWithContext(cmd.Context(), openfeature.EvaluationContext{}); err != nil {
					return fmt.Errorf("flag store notifications: %w", err)
				}
				defer changes.Shutdown()
				opts = append(opts, console.WithChanges(changes.EventChannel()))
			}
			if samples != nil {
				opts = append(opts, console.WithSampleStore(samples))
			}
			srv, err := console.New(ctrl, be.fleet, token, opts...)
			if err != nil {
				return usageError{err}
			}
			if _, err := srv.RegisterMetrics(mp.Meter("github.com/dimmer-dev/dimmer/console")); err != nil {
				return err
			}
			ln, err := net.Listen("tcp", listen)
			if err != nil {
				return fmt.Errorf("--listen %s: %w", listen, err)
			}
			mode := "read-only"
			if actions {
				mode = "actions enabled"
			}
			fmt.Fprintf(c.out, "dimmer console on http://%s/ (%s; log in with DIMMER_UI_TOKEN)\n", ln.Addr(), mode)
			// The sampler fills the charts while nobody looks; it stops
			// with the server.
			sampleCtx, stopSampling := context.WithCancel(cmd.Context())
			sampled := make(chan error, 1)
			go func() { sampled <- srv.Run(sampleCtx) }()
			err = serveUntilDone(cmd.Context(), ln, srv)
			stopSampling()
			<-sampled
			return err
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:8080", "address to listen on")
	cmd.Flags().BoolVar(&actions, "actions", false, "enable advance, roll back and rollout (guarded, audited)")
	cmd.Flags().BoolVar(&allowRemote, "allow-remote", false, "allow a --listen address other than loopback")
	cmd.Flags().Int64Var(&maxRetained, "max-retained-wal", 1<<30, "alert when a replication slot retains more WAL than this many bytes (0: no bound), as dimmer cdc status --max-retained")
	cmd.Flags().DurationVar(&refresh, "refresh", 2*time.Second, "how often the pages refresh themselves")
	return cmd
}

// prometheusMetrics returns a Prometheus handler over a registry of its own
// and the OpenTelemetry meter provider whose figures it exposes.
func prometheusMetrics() (http.Handler, *sdkmetric.MeterProvider) {
	reg := prometheus.NewRegistry()
	exp, err := otelprom.New(otelprom.WithRegisterer(reg))
	if err != nil {
		// Only a registry refusing the exporter's collector fails, and this
		// registry is new and empty.
		panic("prometheus exporter: " + err.Error())
	}
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{}), sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp))
}

// serveUntilDone serves h on ln until ctx ends, then shuts down gracefully.
func serveUntilDone(ctx context.Context, ln net.Listener, h http.Handler) error {
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := hs.Shutdown(shut); err != nil {
		return err
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
