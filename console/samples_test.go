package console_test

import (
	"net/http/httptest"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
)

// A console started later draws the points the consoles before it took:
// the sampler keeps them in the flag store's database, bounded.
func TestSecondConsoleShowsEarlierSamples(t *testing.T) {
	t.Parallel()
	for _, backend := range []string{"postgres", "redis"} {
		t.Run(backend, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			var st console.SampleStore
			if backend == "postgres" {
				pgs, err := console.PostgresSamples(e.pool, e.store.Schema())
				require.NoError(t, err)
				require.NoError(t, pgs.Install(ctx(t)))
				st = pgs
			} else {
				client, prefix := dimmertest.Redis(t)
				var err error
				st, err = console.RedisSamples(client, prefix)
				require.NoError(t, err)
			}
			const every, keep = 20 * time.Millisecond, 4
			first, err := console.New(e.ctrl, e.store, token, console.WithLogger(quiet),
				console.WithHistory(every, keep), console.WithSampleStore(st))
			require.NoError(t, err)
			walk(t, e)
			for _, lasting := range []int64{1, 2, 3, 4, 5} {
				e.beat(t, "api-1", "orders", 2, health("orders", flags.Shadow, flags.Health{Ops: 100, Compared: 100, Mismatches: lasting, Lasting: lasting}))
				require.NoError(t, first.SampleOnce(ctx(t)))
				// The store keeps one sample per interval: let this one pass.
				time.Sleep(every)
			}
			stored, err := st.Samples(ctx(t), "orders", 100)
			require.NoError(t, err)
			require.Len(t, stored, keep, "only the newest %d are kept", keep)

			// The first console is gone; a new one starts (sampling less
			// often, so the page request below adds no sample of its own).
			second, err := console.New(e.ctrl, e.store, token, console.WithLogger(quiet),
				console.WithHistory(time.Hour, keep), console.WithSampleStore(st))
			require.NoError(t, err)
			e.beat(t, "api-1", "orders", 2, health("orders", flags.Shadow, flags.Health{Ops: 100, Compared: 100, Mismatches: 9, Lasting: 9}))
			require.NoError(t, second.SampleOnce(ctx(t)))
			e2 := *e
			e2.http = httptest.NewServer(second)
			t.Cleanup(e2.http.Close)
			m := migrationData(t, &e2)
			var lasting []int64
			for i, s := range m.History {
				require.Len(t, s.Stages, 1)
				lasting = append(lasting, s.Stages[0].Lasting)
				if i > 0 {
					assert.True(t, s.At.After(m.History[i-1].At), "oldest first")
				}
			}
			assert.Equal(t, []int64{3, 4, 5, 9}, lasting, "the first console's newest samples, then the second's own")
		})
	}
}

func TestSampleStoresValidate(t *testing.T) {
	t.Parallel()
	_, err := console.PostgresSamples(nil, "dimmer")
	assert.ErrorContains(t, err, "db is nil")
	_, err = console.RedisSamples(nil, "dimmer:")
	assert.ErrorContains(t, err, "client is nil")
	e := newEnv(t)
	_, err = console.New(e.ctrl, e.store, token, console.WithSampleStore(nil))
	assert.ErrorContains(t, err, "WithSampleStore: nil")
}
