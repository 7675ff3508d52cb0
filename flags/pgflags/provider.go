package pgflags

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/open-feature/go-sdk/openfeature"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/internal/snapshot"
)

// ProviderName is the provider's name in OpenFeature metadata and events.
const ProviderName = "dimmer-pgflags"

// ListenerApplicationName is the application_name of the connection a
// provider listens on, so operators (and tests) can find it in
// pg_stat_activity. PostgreSQL truncates it to 63 bytes.
func ListenerApplicationName(schema string) string { return "dimmer-flags:" + schema }

// Provider is an OpenFeature provider serving the stage flags of a [Store]'s
// tables from a local snapshot. Evaluation does no I/O; the snapshot follows
// LISTEN notifications and is reloaded every resync interval and after every
// reconnect.
//
// Register it with an OpenFeature API (SetProviderAndWait), which calls Init
// and later Shutdown. A flag whose stored document stops decoding (an
// unknown stage, invalid JSON) keeps serving its last good stage until the
// document is fixed; the problem is logged once per change and counted
// ([WithMeterProvider]), and [Provider.Corrupt] lists it. A flag never read
// good is served as an error naming the flag and the problem (the caller
// gets its fallback). Other flags are unaffected.
type Provider struct {
	engine *snapshot.Engine
	be     *backend
}

var (
	_ openfeature.FeatureProvider          = (*Provider)(nil)
	_ openfeature.ContextAwareStateHandler = (*Provider)(nil)
	_ openfeature.EventHandler             = (*Provider)(nil)
)

// NewProvider returns a provider over the tables in pool's database. It does no
// I/O until the OpenFeature API initialises it. Options: [WithSchema],
// [WithResyncInterval], [WithLogger].
func NewProvider(pool *pgxpool.Pool, opts ...Option) (*Provider, error) {
	if pool == nil {
		return nil, errors.New("pgflags.NewProvider: pool is nil")
	}
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	be := &backend{pool: pool, t: newTables(cfg.schema), appName: ListenerApplicationName(cfg.schema), resync: cfg.resync}
	eng, err := snapshot.New(be, snapshot.Config{Name: ProviderName, ResyncInterval: cfg.resync, Logger: cfg.logger, MeterProvider: cfg.meter})
	if err != nil {
		return nil, fmt.Errorf("pgflags.NewProvider: %w", err)
	}
	return &Provider{engine: eng, be: be}, nil
}

// Metadata implements [openfeature.FeatureProvider].
func (p *Provider) Metadata() openfeature.Metadata { return p.engine.Metadata() }

// Hooks implements [openfeature.FeatureProvider].
func (p *Provider) Hooks() []openfeature.Hook { return nil }

// Init implements [openfeature.StateHandler]: it loads the snapshot and starts
// listening.
func (p *Provider) Init(ec openfeature.EvaluationContext) error { return p.engine.Init(ec) }

// InitWithContext implements [openfeature.ContextAwareStateHandler].
func (p *Provider) InitWithContext(ctx context.Context, ec openfeature.EvaluationContext) error {
	return p.engine.InitWithContext(ctx, ec)
}

// Shutdown implements [openfeature.StateHandler]: it stops listening and
// waits for the background work to end.
func (p *Provider) Shutdown() { p.engine.Shutdown() }

// ShutdownWithContext implements [openfeature.ContextAwareStateHandler].
func (p *Provider) ShutdownWithContext(ctx context.Context) error {
	return p.engine.ShutdownWithContext(ctx)
}

// EventChannel implements [openfeature.EventHandler].
func (p *Provider) EventChannel() <-chan openfeature.Event { return p.engine.EventChannel() }

// Status is READY after a sync, STALE while the subscription is broken (the
// last known stages are served), ERROR while no load ever succeeded.
func (p *Provider) Status() openfeature.State { return p.engine.Status() }

// Revisions maps each flag to the revision being evaluated; the fleet
// heartbeat reports it.
func (p *Provider) Revisions() map[string]int64 { return p.engine.Revisions() }

// Corrupt maps each flag whose stored document does not decode to what is
// wrong with it. Such a flag keeps serving its last good stage (read before
// it went bad); one never read good is served as a parse error, so the
// caller gets its fallback.
func (p *Provider) Corrupt() map[string]error { return p.engine.Corrupt() }

// LastSync is when the snapshot was last fully reloaded.
func (p *Provider) LastSync() time.Time { return p.engine.LastSync() }

// Snapshot returns the state of a migration as the provider currently serves
// it.
func (p *Provider) Snapshot(migration string) (flags.State, bool) {
	return p.engine.Snapshot(migration)
}

// StringEvaluation serves the stage of a flag for the evaluation's targeting
// key, per [flags.State.StageFor].
func (p *Provider) StringEvaluation(ctx context.Context, flag string, defaultValue string, flatCtx openfeature.FlattenedContext) openfeature.StringResolutionDetail {
	return p.engine.StringEvaluation(ctx, flag, defaultValue, flatCtx)
}

// ObjectEvaluation returns the whole [flags.State] of a flag.
func (p *Provider) ObjectEvaluation(ctx context.Context, flag string, defaultValue any, flatCtx openfeature.FlattenedContext) openfeature.InterfaceResolutionDetail {
	return p.engine.ObjectEvaluation(ctx, flag, defaultValue, flatCtx)
}

// BooleanEvaluation implements [openfeature.FeatureProvider]; stage flags are
// strings, so it is a type mismatch.
func (p *Provider) BooleanEvaluation(ctx context.Context, flag string, defaultValue bool, flatCtx openfeature.FlattenedContext) openfeature.BoolResolutionDetail {
	return p.engine.BooleanEvaluation(ctx, flag, defaultValue, flatCtx)
}

// FloatEvaluation implements [openfeature.FeatureProvider] (type mismatch).
func (p *Provider) FloatEvaluation(ctx context.Context, flag string, defaultValue float64, flatCtx openfeature.FlattenedContext) openfeature.FloatResolutionDetail {
	return p.engine.FloatEvaluation(ctx, flag, defaultValue, flatCtx)
}

// IntEvaluation implements [openfeature.FeatureProvider] (type mismatch).
func (p *Provider) IntEvaluation(ctx context.Context, flag string, defaultValue int64, flatCtx openfeature.FlattenedContext) openfeature.IntResolutionDetail {
	return p.engine.IntEvaluation(ctx, flag, defaultValue, flatCtx)
}

// backend is the snapshot.Backend over the store's tables.
type backend struct {
	pool    *pgxpool.Pool
	t       tables
	appName string
	resync  time.Duration
}

var _ snapshot.Backend = (*backend)(nil)

func (b *backend) LoadAll(ctx context.Context) ([]snapshot.Doc, error) {
	rows, err := b.pool.Query(ctx, `SELECT migration, doc FROM `+b.t.flags)
	if err != nil {
		return nil, fmt.Errorf("pgflags: load flags: %w", hint(err))
	}
	var out []snapshot.Doc
	for rows.Next() {
		var d snapshot.Doc
		if err := rows.Scan(&d.Migration, &d.Raw); err != nil {
			return nil, fmt.Errorf("pgflags: load flags: %w", err)
		}
		out = append(out, d)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("pgflags: load flags: %w", hint(err))
	}
	return out, nil
}

func (b *backend) Load(ctx context.Context, migration string) ([]byte, bool, error) {
	var doc []byte
	err := b.pool.QueryRow(ctx, `SELECT doc FROM `+b.t.flags+` WHERE migration = $1`, migration).Scan(&doc)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("pgflags: load %s: %w", migration, hint(err))
	}
	return doc, true, nil
}

// Listen holds a dedicated connection, taken out of the pool for good, and
// waits for notifications on it. The connection is closed (never returned to
// the pool, where it would keep listening) when Listen ends.
func (b *backend) Listen(ctx context.Context, subscribed func(), changed func(string, []byte)) error {
	pc, err := b.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("pgflags: listen: %w", err)
	}
	conn := pc.Hijack()
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = conn.Close(cctx)
	}()
	if _, err := conn.Exec(ctx, `SELECT set_config('application_name', $1, false)`, b.appName); err != nil {
		return fmt.Errorf("pgflags: listen: %w", err)
	}
	if _, err := conn.Exec(ctx, `LISTEN `+pgx.Identifier{b.t.channel}.Sanitize()); err != nil {
		return fmt.Errorf("pgflags: listen on %s: %w", b.t.channel, err)
	}
	subscribed()
	idle := snapshot.IdleCheck(b.resync)
	for {
		wctx, cancel := context.WithTimeout(ctx, idle)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			// Silent for a while: make sure the connection still
			// answers, or give it up so the engine reconnects (and goes
			// STALE meanwhile).
			pctx, cancel := context.WithTimeout(ctx, idle)
			err = conn.Ping(pctx)
			cancel()
			if err == nil {
				continue
			}
			return fmt.Errorf("pgflags: listen on %s: connection silent for %v and not answering: %w", b.t.channel, idle, err)
		}
		if err != nil {
			return fmt.Errorf("pgflags: listen on %s: %w", b.t.channel, err)
		}
		m, doc := parsePayload(n.Payload)
		changed(m, doc)
	}
}

// hint adds what to do when the tables are missing.
func hint(err error) error {
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "42P01" {
		return fmt.Errorf("%w (run Store.Install to create the flag tables)", err)
	}
	return err
}
