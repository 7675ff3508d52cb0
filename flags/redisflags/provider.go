package redisflags

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/open-feature/go-sdk/openfeature"
	"github.com/redis/go-redis/v9"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/internal/snapshot"
)

// ProviderName is the provider's name in OpenFeature metadata and events.
const ProviderName = "dimmer-redisflags"

// Provider is an OpenFeature provider serving the stage flags of a [Store]
// (same client, same prefix) from a local snapshot. Evaluation does no I/O;
// the snapshot follows pub/sub messages and is reloaded every resync interval
// and after every resubscribe.
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

// NewProvider returns a provider over the flags client holds. It does no I/O
// until the OpenFeature API initialises it. Options: [WithPrefix],
// [WithResyncInterval], [WithLogger].
//
// The subscription uses a connection of its own; to find it in CLIENT LIST,
// give the client a name (redis.Options.ClientName).
func NewProvider(client redis.UniversalClient, opts ...Option) (*Provider, error) {
	if client == nil {
		return nil, errors.New("redisflags.NewProvider: client is nil")
	}
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	be := &backend{client: client, k: newKeys(cfg.prefix), resync: cfg.resync}
	eng, err := snapshot.New(be, snapshot.Config{Name: ProviderName, ResyncInterval: cfg.resync, Logger: cfg.logger, MeterProvider: cfg.meter})
	if err != nil {
		return nil, fmt.Errorf("redisflags.NewProvider: %w", err)
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

// backend is the snapshot.Backend over the store's keys.
type backend struct {
	client redis.UniversalClient
	k      keys
	resync time.Duration
}

var _ snapshot.Backend = (*backend)(nil)

func (b *backend) LoadAll(ctx context.Context) ([]snapshot.Doc, error) {
	all, err := b.client.HGetAll(ctx, b.k.flags).Result()
	if err != nil {
		return nil, fmt.Errorf("redisflags: load flags: %w", err)
	}
	out := make([]snapshot.Doc, 0, len(all))
	for m, doc := range all {
		out = append(out, snapshot.Doc{Migration: m, Raw: []byte(doc)})
	}
	return out, nil
}

func (b *backend) Load(ctx context.Context, migration string) ([]byte, bool, error) {
	doc, err := b.client.HGet(ctx, b.k.flags, migration).Result()
	if errors.Is(err, redis.Nil) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("redisflags: load %s: %w", migration, err)
	}
	return []byte(doc), true, nil
}

// Listen subscribes to the channel and delivers messages until ctx ends or
// the connection breaks. go-redis would quietly resubscribe after a broken
// connection; returning instead lets the engine resync, so whatever was
// published while disconnected is not lost.
func (b *backend) Listen(ctx context.Context, subscribed func(), changed func(string, []byte)) error {
	ps := b.client.Subscribe(ctx, b.k.channel)
	defer ps.Close()
	// A blocked read does not watch ctx: closing the PubSub ends it.
	stop := context.AfterFunc(ctx, func() { _ = ps.Close() })
	defer stop()
	msg, err := ps.Receive(ctx)
	if err != nil {
		return fmt.Errorf("redisflags: subscribe %s: %w", b.k.channel, err)
	}
	if _, ok := msg.(*redis.Subscription); !ok {
		return fmt.Errorf("redisflags: subscribe %s: unexpected reply %T", b.k.channel, msg)
	}
	subscribed()
	idle := snapshot.IdleCheck(b.resync)
	pinged := false
	for {
		msg, err := ps.ReceiveTimeout(ctx, idle)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var nerr net.Error
			if errors.As(err, &nerr) && nerr.Timeout() && !pinged {
				// Silent for a while: a PING must come back within the
				// next idle period, or the link is dead (the engine
				// reconnects and goes STALE meanwhile).
				if err := ps.Ping(ctx); err != nil {
					return fmt.Errorf("redisflags: subscription %s: ping: %w", b.k.channel, err)
				}
				pinged = true
				continue
			}
			return fmt.Errorf("redisflags: subscription %s: %w", b.k.channel, err)
		}
		pinged = false
		if m, ok := msg.(*redis.Message); ok {
			name, doc := parsePayload(m.Payload)
			changed(name, doc)
		}
	}
}
