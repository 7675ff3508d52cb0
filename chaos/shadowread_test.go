package chaos_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/chaos"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/shadowread"
)

// Redis, the new side, disappears while reads are shadowed: the caller's
// results and latency do not change, the shadow errors are counted, nothing
// panics, and comparisons come back once the link heals.
func TestShadowReadWithRedisDown(t *testing.T) {
	t.Parallel()
	for _, cut := range []string{"blackhole", "refuse"} {
		t.Run(cut, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			oldDB, _ := dimmertest.Schema(t)
			_, err := oldDB.Exec(ctx, `CREATE TABLE profiles (id text PRIMARY KEY, name text NOT NULL)`)
			require.NoError(t, err)
			seed, prefix := dimmertest.Redis(t)
			const keys = 20
			for i := range keys {
				id, name := fmt.Sprintf("p%d", i), fmt.Sprintf("name-%d", i)
				_, err := oldDB.Exec(ctx, `INSERT INTO profiles VALUES ($1, $2)`, id, name)
				require.NoError(t, err)
				require.NoError(t, seed.Set(ctx, prefix+id, name, 0).Err())
			}

			up, err := chaos.UpstreamOf(dimmertest.RedisURL())
			require.NoError(t, err)
			link := newLink(t, up)
			opts, err := redis.ParseURL(dimmertest.RedisURL())
			require.NoError(t, err)
			opts.Dialer = link.Dial
			opts.ContextTimeoutEnabled = true // the shadow deadline bounds each command
			opts.DialTimeout = 200 * time.Millisecond
			opts.MaxRetries = -1
			newDB := redis.NewClient(opts)
			defer newDB.Close()

			readOld := func(ctx context.Context, id string) (string, error) {
				var name string
				err := oldDB.QueryRow(ctx, `SELECT name FROM profiles WHERE id = $1`, id).Scan(&name)
				return name, err
			}
			readNew := func(ctx context.Context, id string) (string, error) {
				return newDB.Get(ctx, prefix+id).Result()
			}
			var compared, shadowErrs, mismatches atomic.Int64
			obs := flags.ObserverFunc(func(o flags.Observation) {
				if o.Side != flags.New {
					return
				}
				switch {
				case o.Err:
					shadowErrs.Add(1)
				case o.Mismatch:
					mismatches.Add(1)
				case o.Compared:
					compared.Add(1)
				}
			})
			const shadowTimeout = 300 * time.Millisecond
			quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
			r, err := shadowread.New("profiles", shadowread.StageFunc(func(context.Context, string, string) (flags.Stage, error) {
				return flags.Shadow, nil
			}), readOld, readNew, func(id string) string { return id },
				shadowread.WithShadowTimeout(shadowTimeout), shadowread.WithObserver(obs),
				shadowread.WithPool(4, 16), shadowread.WithLogger(quiet))
			require.NoError(t, err)
			defer r.Close()

			// reads runs n reads and returns the slowest.
			reads := func(n int) time.Duration {
				var slowest time.Duration
				for i := range n {
					id := fmt.Sprintf("p%d", i%keys)
					start := time.Now()
					name, err := r.Read(ctx, id)
					took := time.Since(start)
					require.NoError(t, err, "the caller never sees the shadow's failure")
					require.Equal(t, fmt.Sprintf("name-%d", i%keys), name)
					slowest = max(slowest, took)
					time.Sleep(2 * time.Millisecond)
				}
				return slowest
			}

			healthy := reads(60)
			require.Eventually(t, func() bool { return compared.Load() > 0 }, 5*time.Second, 10*time.Millisecond)
			require.Zero(t, shadowErrs.Load())
			require.Zero(t, mismatches.Load())

			switch cut {
			case "blackhole":
				require.NoError(t, link.Blackhole(true))
			case "refuse":
				require.NoError(t, link.Refuse(true))
			}
			cutSlowest := reads(150)
			t.Logf("slowest caller read: healthy %v, with Redis %s %v (shadow timeout %v)", healthy, cut, cutSlowest, shadowTimeout)
			assert.Less(t, cutSlowest, shadowTimeout/2, "the caller waited on the shadow")
			require.Eventually(t, func() bool { return shadowErrs.Load() > 0 }, 5*time.Second, 10*time.Millisecond,
				"shadow failures were not counted")
			assert.Zero(t, mismatches.Load(), "a failed shadow is not a mismatch")

			require.NoError(t, link.Heal())
			before := compared.Load()
			require.Eventually(t, func() bool {
				reads(5)
				return compared.Load() > before+5
			}, 10*time.Second, 10*time.Millisecond, "comparisons did not resume after healing")
			assert.Zero(t, mismatches.Load())
		})
	}
}
