package flagstest

import (
	"context"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/open-feature/go-sdk/openfeature"
	"github.com/open-feature/go-sdk/openfeature/isolated"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
)

// Provider is what the provider suite needs of a stage flag provider besides
// the OpenFeature contract.
type Provider interface {
	openfeature.FeatureProvider
	// Revisions maps each flag to the revision being evaluated.
	Revisions() map[string]int64
	// Status is the provider's own state.
	Status() openfeature.State
	// Corrupt lists the flags whose stored document does not decode.
	Corrupt() map[string]error
}

// ProviderEnv is one test's store and the means to reach behind the
// provider's back.
type ProviderEnv struct {
	// Store is an empty store; providers made by NewProvider read it.
	Store flags.Store
	// NewProvider returns a new, not yet initialised provider over Store
	// with the given resync interval. The suite initialises and shuts it
	// down through an OpenFeature API.
	NewProvider func(t *testing.T, resync time.Duration) (Provider, error)
	// WriteSilently stores st (with st.Revision as given) without notifying
	// any provider: a lost notification.
	WriteSilently func(ctx context.Context, st flags.State) error
	// WriteRaw stores doc as the migration's document without validation
	// and without notifying.
	WriteRaw func(ctx context.Context, migration string, doc []byte) error
	// KillSubscription kills, server-side, the connections the providers of
	// this env listen on, returning how many it killed.
	KillSubscription func(ctx context.Context) (int, error)
}

// Client registers p with a fresh, isolated OpenFeature API, waits until it is
// initialised, and returns the API and a client of it. The API is shut down
// (and with it the provider) when the test ends.
func Client(t testing.TB, p openfeature.FeatureProvider) (*openfeature.EvaluationAPI, *openfeature.Client) {
	t.Helper()
	api := isolated.NewAPI()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = api.Shutdown(ctx)
	})
	require.NoError(t, api.SetProviderAndWait(Context(t), p))
	return api, api.NewClient()
}

// instance is one provider as a service would run it: its own OpenFeature API,
// client and flags.Source.
type instance struct {
	p      Provider
	api    *openfeature.EvaluationAPI
	source *flags.Source

	mu     sync.Mutex
	events []event
}

type event struct {
	at      time.Time
	typ     openfeature.EventType
	changes []string
}

func newInstance(t *testing.T, env ProviderEnv, resync time.Duration, fallback flags.Stage) *instance {
	t.Helper()
	p, err := env.NewProvider(t, resync)
	require.NoError(t, err)
	in := &instance{p: p}
	in.api, _ = Client(t, p)
	src, err := flags.NewSource(in.api.NewClient(), fallback)
	require.NoError(t, err)
	in.source = src
	record := func(d openfeature.EventDetails) {
		in.mu.Lock()
		defer in.mu.Unlock()
		in.events = append(in.events, event{at: time.Now(), changes: slices.Clone(d.FlagChanges)})
	}
	for _, typ := range []openfeature.EventType{openfeature.ProviderConfigChange, openfeature.ProviderStale, openfeature.ProviderReady} {
		cb := func(d openfeature.EventDetails) {
			record(d)
			in.mu.Lock()
			in.events[len(in.events)-1].typ = typ
			in.mu.Unlock()
		}
		in.api.AddHandler(typ, &cb)
	}
	return in
}

// sawEvent reports whether an event of typ (naming flag, when not empty) was
// delivered after since.
func (in *instance) sawEvent(typ openfeature.EventType, flag string, since time.Time) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, e := range in.events {
		if e.typ == typ && !e.at.Before(since) && (flag == "" || slices.Contains(e.changes, flag)) {
			return true
		}
	}
	return false
}

func (in *instance) stage(t *testing.T, migration, key string) flags.Stage {
	st, err := in.source.Stage(context.Background(), migration, key)
	if err != nil {
		t.Logf("evaluate %s: %v", migration, err)
	}
	return st
}

// eventually waits until every instance serves want for key.
func eventually(t *testing.T, ins []*instance, migration string, want flags.Stage, within time.Duration, msg string) {
	t.Helper()
	require.Eventually(t, func() bool {
		for _, in := range ins {
			if st, err := in.source.Stage(context.Background(), migration, "k"); err != nil || st != want {
				return false
			}
		}
		return true
	}, within, 5*time.Millisecond, msg)
}

// never is a resync interval long enough that only pushes and reconnects can
// explain a change a test observes.
const never = time.Hour

// RunProvider runs the provider conformance suite. newEnv is called once per
// subtest and must return an empty store of its own.
func RunProvider(t *testing.T, newEnv func(t *testing.T) ProviderEnv) {
	t.Run("FlipPropagatesToEightInstances", func(t *testing.T) {
		t.Parallel()
		env := newEnv(t)
		Set(t, env.Store, "orders", flags.Shadow, nil)
		ins := make([]*instance, 8)
		for i := range ins {
			ins[i] = newInstance(t, env, never, flags.Off)
		}
		eventually(t, ins, "orders", flags.Shadow, 5*time.Second, "initial stage")

		flip := time.Now()
		st := Set(t, env.Store, "orders", flags.Live, nil)
		eventually(t, ins, "orders", flags.Live, 5*time.Second, "flip did not reach all 8 instances")
		for i, in := range ins {
			assert.Equal(t, st.Revision, in.p.Revisions()["orders"], "instance %d revision", i)
			assert.Eventually(t, func() bool { return in.sawEvent(openfeature.ProviderConfigChange, "orders", flip) },
				5*time.Second, 5*time.Millisecond, "instance %d: no CONFIGURATION_CHANGED event naming the flag", i)
		}
		// And back: a rollback is just another flip.
		Set(t, env.Store, "orders", flags.DualWrite, nil)
		eventually(t, ins, "orders", flags.DualWrite, 5*time.Second, "rollback did not reach all 8 instances")
	})

	t.Run("SplitWithinOnePercentAndSticky", func(t *testing.T) {
		t.Parallel()
		env := newEnv(t)
		Set(t, env.Store, "accounts", flags.Shadow, &flags.Rollout{Stage: flags.Live, Percent: 5})
		in := newInstance(t, env, never, flags.Off)
		st, ok := stateOf(t, env, "accounts")
		require.True(t, ok)
		const keys = 100_000
		live := make([]bool, keys)
		count := 0
		for i := range keys {
			key := "user-" + strconv.Itoa(i)
			got, err := in.source.Stage(context.Background(), "accounts", key)
			require.NoError(t, err)
			require.Equal(t, st.StageFor(key), got, "key %s: the provider must follow flags.Bucket", key)
			if got == flags.Live {
				live[i] = true
				count++
			} else {
				require.Equal(t, flags.Shadow, got)
			}
		}
		share := float64(count) * 100 / keys
		assert.InDelta(t, 5, share, 1, "live share %.2f%% over %d keys", share, keys)

		// Growing the share keeps every key that already had live.
		Set(t, env.Store, "accounts", flags.Shadow, &flags.Rollout{Stage: flags.Live, Percent: 10})
		require.Eventually(t, func() bool { return in.p.Revisions()["accounts"] == 2 }, 5*time.Second, 5*time.Millisecond)
		count = 0
		for i := range keys {
			got, err := in.source.Stage(context.Background(), "accounts", "user-"+strconv.Itoa(i))
			require.NoError(t, err)
			if live[i] {
				require.Equal(t, flags.Live, got, "key user-%d lost live when the share grew", i)
			}
			if got == flags.Live {
				count++
			}
		}
		share = float64(count) * 100 / keys
		assert.InDelta(t, 10, share, 1, "live share %.2f%% over %d keys", share, keys)
	})

	t.Run("MissedNotificationHealedByResync", func(t *testing.T) {
		t.Parallel()
		env := newEnv(t)
		st := Set(t, env.Store, "carts", flags.DualWrite, nil)
		const resync = 500 * time.Millisecond
		fast := newInstance(t, env, resync, flags.Off)
		slow := newInstance(t, env, never, flags.Off)
		eventually(t, []*instance{fast, slow}, "carts", flags.DualWrite, 5*time.Second, "initial stage")
		// The slow instance can only see this flip once it is subscribed
		// (by the push, or by the reload that follows subscribing), so
		// after it nothing but the periodic resync explains a change.
		st = Set(t, env.Store, "carts", flags.Shadow, nil)
		eventually(t, []*instance{fast, slow}, "carts", flags.Shadow, 5*time.Second, "notified flip")

		st.Stage, st.Revision = flags.Live, st.Revision+1
		written := time.Now()
		require.NoError(t, env.WriteSilently(Context(t), st))
		// The bound: one resync interval, plus slack for a loaded machine.
		eventually(t, []*instance{fast}, "carts", flags.Live, resync+time.Second,
			"a change written without notification must be picked up within the resync interval")
		t.Logf("missed notification healed after %v (resync interval %v)", time.Since(written), resync)
		assert.Equal(t, flags.Shadow, slow.stage(t, "carts", "k"),
			"WriteSilently must not notify (the instance without resync saw it)")
	})

	t.Run("KilledSubscriptionHealed", func(t *testing.T) {
		t.Parallel()
		env := newEnv(t)
		Set(t, env.Store, "users", flags.DualWrite, nil)
		in := newInstance(t, env, never, flags.Off)
		eventually(t, []*instance{in}, "users", flags.DualWrite, 5*time.Second, "initial stage")

		// Wait for the subscription to exist, then kill it.
		before := time.Now()
		require.Eventually(t, func() bool {
			n, err := env.KillSubscription(Context(t))
			require.NoError(t, err)
			return n > 0
		}, 5*time.Second, 20*time.Millisecond, "no subscription connection to kill")
		require.Eventually(t, func() bool { return in.sawEvent(openfeature.ProviderStale, "", before) },
			5*time.Second, 5*time.Millisecond, "the provider did not notice its subscription was killed")

		// Written while the subscription may be down: the resubscribe
		// resync must pick it up even if the push is lost.
		Set(t, env.Store, "users", flags.Shadow, nil)
		eventually(t, []*instance{in}, "users", flags.Shadow, 10*time.Second, "not healed after the kill")
		require.Eventually(t, func() bool { return in.p.Status() == openfeature.ReadyState },
			10*time.Second, 5*time.Millisecond, "the provider did not return to READY")
		// Pushes flow again on the new subscription.
		Set(t, env.Store, "users", flags.Live, nil)
		eventually(t, []*instance{in}, "users", flags.Live, 5*time.Second, "no push after resubscribing")
	})

	t.Run("MalformedDocumentIsolated", func(t *testing.T) {
		t.Parallel()
		env := newEnv(t)
		ctx := Context(t)
		Set(t, env.Store, "good", flags.DualWrite, nil)
		require.NoError(t, env.WriteRaw(ctx, "broken", []byte(`{"migration":"broken","stage":"sideways","revision":1}`)))
		in := newInstance(t, env, 300*time.Millisecond, flags.Complete)
		require.Equal(t, openfeature.ReadyState, in.p.Status(), "a malformed flag must not fail the provider")
		assert.Equal(t, flags.DualWrite, in.stage(t, "good", "k"))

		st, err := in.source.Stage(ctx, "broken", "k")
		assert.Equal(t, flags.Complete, st, "the fallback is served for a malformed flag")
		require.ErrorIs(t, err, flags.ErrFlagUnavailable)
		assert.Contains(t, err.Error(), "broken")
		assert.Contains(t, err.Error(), "sideways", "the error must say what is wrong with the document")

		// One going bad later, found by the resync, and a healthy change
		// pushed alongside it.
		require.NoError(t, env.WriteRaw(ctx, "later", []byte(`{"migration":"later","stage":"live","rollout":{"stage":"live","percent":250},"revision":1}`)))
		Set(t, env.Store, "good", flags.Shadow, nil)
		eventually(t, []*instance{in}, "good", flags.Shadow, 5*time.Second, "a healthy flag stopped updating next to a malformed one")
		var lastErr error
		require.Eventually(t, func() bool {
			st, err := in.source.Stage(ctx, "later", "k")
			lastErr = err
			return st == flags.Complete && err != nil && strings.Contains(err.Error(), "later") && strings.Contains(err.Error(), "250")
		}, 5*time.Second, 20*time.Millisecond, "the resync must report the malformed document by name; last error: %v", lastErr)
		assert.Equal(t, openfeature.ReadyState, in.p.Status())
	})

	t.Run("CorruptFlagKeepsLastGoodStage", func(t *testing.T) {
		t.Parallel()
		env := newEnv(t)
		ctx := Context(t)
		Set(t, env.Store, "orders", flags.Live, nil)
		Set(t, env.Store, "other", flags.DualWrite, nil)
		in := newInstance(t, env, 200*time.Millisecond, flags.Off)
		eventually(t, []*instance{in}, "orders", flags.Live, 5*time.Second, "not live")
		for _, doc := range []string{
			`{"migration":"orders","stage":"sideways","revision":9}`,
			`["live"]`,
			`{"migration":"orders","stage":`,
		} {
			if err := env.WriteRaw(ctx, "orders", []byte(doc)); err != nil {
				// A jsonb column refuses text that is not JSON at all.
				t.Logf("the store refuses %s: %v", doc, err)
				continue
			}
			require.Eventually(t, func() bool { return in.p.Corrupt()["orders"] != nil }, 5*time.Second, 10*time.Millisecond,
				"the resync must find the corrupt document %s", doc)
			// A service in live must not silently read old again.
			st, err := in.source.Stage(ctx, "orders", "k")
			require.NoError(t, err)
			assert.Equal(t, flags.Live, st, "the last good stage is served while %s is stored", doc)
			assert.Equal(t, flags.DualWrite, in.stage(t, "other", "k"))
			// A notification of the corrupt document changes nothing either.
			Set(t, env.Store, "other", flags.Shadow, nil)
			eventually(t, []*instance{in}, "other", flags.Shadow, 5*time.Second, "a healthy flag stopped updating")
			Set(t, env.Store, "other", flags.DualWrite, nil)
			eventually(t, []*instance{in}, "other", flags.DualWrite, 5*time.Second, "a healthy flag stopped updating")
			assert.Equal(t, flags.Live, in.stage(t, "orders", "k"))
		}
		// Fixed: the stored state is served again.
		fixed := flags.State{Migration: "orders", Stage: flags.Shadow, Revision: 50}
		require.NoError(t, env.WriteSilently(ctx, fixed))
		eventually(t, []*instance{in}, "orders", flags.Shadow, 5*time.Second, "a fixed flag must heal")
		assert.Empty(t, in.p.Corrupt())
	})

	t.Run("MissingFlagReadsOff", func(t *testing.T) {
		t.Parallel()
		env := newEnv(t)
		Set(t, env.Store, "present", flags.Live, nil)
		in := newInstance(t, env, never, flags.Shadow)
		// A migration never set reads as off, as Store.Load says, not
		// as the fallback meant for a store that cannot answer: no
		// error (so no repair in dualwrite), nothing counted.
		st, err := in.source.Stage(Context(t), "absent", "k")
		assert.Equal(t, flags.Off, st)
		require.NoError(t, err)
		assert.Equal(t, int64(0), in.source.Errors())
		assert.Equal(t, flags.Live, in.stage(t, "present", "k"))

		// Stage flags are strings: asking for another type is an error,
		// not a guess.
		_, err = in.api.NewClient().BooleanValue(Context(t), "present", false, openfeature.EvaluationContext{})
		assert.Error(t, err)
	})
}

// stateOf loads a migration straight from the store.
func stateOf(t *testing.T, env ProviderEnv, migration string) (flags.State, bool) {
	st, err := env.Store.Load(Context(t), migration)
	require.NoError(t, err)
	return st, st.Revision > 0
}
