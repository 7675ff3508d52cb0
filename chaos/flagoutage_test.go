package chaos_test

import (
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/open-feature/go-sdk/openfeature"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/chaos"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/flags/redisflags"
)

const outageResync = 200 * time.Millisecond

// snapshotProvider is what both dimmer providers expose besides OpenFeature.
type snapshotProvider interface {
	openfeature.FeatureProvider
	Status() openfeature.State
	Revisions() map[string]int64
}

// flagSide is a flag store written directly (the operator's side) and a
// provider reading it through a link (the service's side).
type flagSide struct {
	store    flags.Store
	provider snapshotProvider
	link     *chaos.Link
}

func pgFlagSide(t *testing.T) flagSide {
	pool, schema := dimmertest.Schema(t)
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, store.Install(flagstest.Context(t)))

	up, err := chaos.UpstreamOf(dimmertest.PostgresURL())
	require.NoError(t, err)
	link := newLink(t, up)
	u, err := chaos.ThroughLink(dimmertest.PostgresURL(), link)
	require.NoError(t, err)
	cfg, err := pgxpool.ParseConfig(u)
	require.NoError(t, err)
	cfg.ConnConfig.ConnectTimeout = time.Second
	ppool, err := pgxpool.NewWithConfig(flagstest.Context(t), cfg)
	require.NoError(t, err)
	t.Cleanup(ppool.Close)
	p, err := pgflags.NewProvider(ppool, pgflags.WithSchema(schema), pgflags.WithResyncInterval(outageResync))
	require.NoError(t, err)
	return flagSide{store: store, provider: p, link: link}
}

func redisFlagSide(t *testing.T) flagSide {
	client, prefix := dimmertest.Redis(t)
	store, err := redisflags.NewStore(client, redisflags.WithPrefix(prefix))
	require.NoError(t, err)

	up, err := chaos.UpstreamOf(dimmertest.RedisURL())
	require.NoError(t, err)
	link := newLink(t, up)
	opts, err := redis.ParseURL(dimmertest.RedisURL())
	require.NoError(t, err)
	opts.Dialer = link.Dial
	// A blackholed server is noticed when a read times out: keep it short
	// so the test is quick (go-redis's default is 3s).
	opts.ReadTimeout = 300 * time.Millisecond
	opts.DialTimeout = time.Second
	pc := redis.NewClient(opts)
	t.Cleanup(func() { _ = pc.Close() })
	p, err := redisflags.NewProvider(pc, redisflags.WithPrefix(prefix), redisflags.WithResyncInterval(outageResync))
	require.NoError(t, err)
	return flagSide{store: store, provider: p, link: link}
}

// A flag-store outage: the instance keeps serving its last known stage, says
// it is STALE (status and event), flags.Source evaluations do not fail; when
// the store is back it resyncs and serves a change made during the outage.
func TestFlagStoreOutage(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		side func(*testing.T) flagSide
		cut  func(*chaos.Link) error
	}{
		{"postgres/down", pgFlagSide, func(l *chaos.Link) error { return l.Refuse(true) }},
		{"redis/down", redisFlagSide, func(l *chaos.Link) error { return l.Refuse(true) }},
		{"redis/blackhole", redisFlagSide, func(l *chaos.Link) error { return l.Blackhole(true) }},
		{"redis/reset-peer", redisFlagSide, func(l *chaos.Link) error {
			if err := l.ResetPeer(true); err != nil {
				return err
			}
			return l.Reset()
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := flagstest.Context(t)
			fs := tc.side(t)
			flagstest.Set(t, fs.store, "accounts", flags.DualWrite, nil)

			api, client := flagstest.Client(t, fs.provider)
			var mu sync.Mutex
			var stale []string
			cb := func(d openfeature.EventDetails) {
				mu.Lock()
				stale = append(stale, d.Message)
				mu.Unlock()
			}
			api.AddHandler(openfeature.ProviderStale, &cb)
			source, err := flags.NewSource(client, flags.Off)
			require.NoError(t, err)
			got, err := source.Stage(ctx, "accounts", "acct-1")
			require.NoError(t, err)
			require.Equal(t, flags.DualWrite, got)

			require.NoError(t, tc.cut(fs.link))
			require.Eventually(t, func() bool { return fs.provider.Status() == openfeature.StaleState },
				5*time.Second, 10*time.Millisecond, "the provider did not notice the outage")
			require.Eventually(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(stale) > 0 },
				5*time.Second, 10*time.Millisecond, "no PROVIDER_STALE event")
			mu.Lock()
			t.Logf("stale: %q", stale[0])
			mu.Unlock()

			// Changed while the instance cannot see the store.
			flagstest.Set(t, fs.store, "accounts", flags.Shadow, nil)
			deadline := time.Now().Add(3 * outageResync)
			for n := 0; time.Now().Before(deadline); n++ {
				start := time.Now()
				got, err := source.Stage(ctx, "accounts", "acct-1")
				require.NoError(t, err, "evaluation must not fail during the outage")
				require.Equal(t, flags.DualWrite, got, "the last known stage is served")
				require.Less(t, time.Since(start), 50*time.Millisecond, "evaluation never waits on the store")
				time.Sleep(10 * time.Millisecond)
			}
			assert.Equal(t, openfeature.StaleState, fs.provider.Status(), "still STALE while the link is cut")
			assert.Zero(t, source.Errors())

			require.NoError(t, fs.link.Heal())
			require.Eventually(t, func() bool {
				got, err := source.Stage(ctx, "accounts", "acct-1")
				return err == nil && got == flags.Shadow
			}, 10*time.Second, 20*time.Millisecond, "the change made during the outage was not picked up")
			require.Eventually(t, func() bool { return fs.provider.Status() == openfeature.ReadyState },
				10*time.Second, 10*time.Millisecond, "the provider did not return to READY")
			// Pushes flow again, not only resyncs.
			flagstest.Set(t, fs.store, "accounts", flags.Live, nil)
			require.Eventually(t, func() bool { return fs.provider.Revisions()["accounts"] == 3 },
				5*time.Second, 10*time.Millisecond)
			assert.Zero(t, source.Errors())
		})
	}
}
