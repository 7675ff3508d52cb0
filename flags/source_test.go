package flags_test

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/open-feature/go-sdk/openfeature"
	"github.com/open-feature/go-sdk/openfeature/isolated"
	"github.com/open-feature/go-sdk/openfeature/memprovider"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/dimmer-dev/dimmer/flags"
)

func memClient(t *testing.T, fl map[string]memprovider.InMemoryFlag) *openfeature.Client {
	t.Helper()
	api := isolated.NewAPI()
	t.Cleanup(func() { _ = api.Shutdown(context.Background()) })
	require.NoError(t, api.SetProviderAndWait(context.Background(), memprovider.NewInMemoryProvider(fl)))
	return api.NewClient()
}

func variantFlag(key string, value any) memprovider.InMemoryFlag {
	return memprovider.InMemoryFlag{Key: key, State: memprovider.Enabled, DefaultVariant: "v", Variants: map[string]any{"v": value}}
}

func TestSourceFallsBackAndCounts(t *testing.T) {
	t.Parallel()
	client := memClient(t, map[string]memprovider.InMemoryFlag{
		"orders":   variantFlag("orders", "live"),
		"typed":    variantFlag("typed", true),
		"sideways": variantFlag("sideways", "sideways"),
		"legacy":   variantFlag("legacy", "not-a-stage"),
	})
	reader := sdkmetric.NewManualReader()
	source, err := flags.NewSource(client, flags.DualWrite,
		flags.WithMigrationFallback("legacy", flags.Complete),
		flags.WithSourceMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))))
	require.NoError(t, err)

	st, err := source.Stage(context.Background(), "orders", "k1")
	require.NoError(t, err)
	assert.Equal(t, flags.Live, st)

	// A flag never set reads as off: no error, nothing counted.
	st, err = source.Stage(context.Background(), "missing", "k1")
	require.NoError(t, err)
	assert.Equal(t, flags.Off, st)

	for flag, want := range map[string]flags.Stage{
		"typed":    flags.DualWrite, // wrong type
		"sideways": flags.DualWrite, // unknown stage value
		"legacy":   flags.Complete,  // per-migration fallback
	} {
		st, err := source.Stage(context.Background(), flag, "k1")
		require.ErrorIs(t, err, flags.ErrFlagUnavailable, flag)
		assert.Contains(t, err.Error(), flag)
		assert.Equal(t, want, st, flag)
	}
	assert.Equal(t, int64(3), source.Errors())

	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(context.Background(), &rm))
	var total int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == "dimmer.flags.evaluation_errors" {
				for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
					total += dp.Value
				}
			}
		}
	}
	assert.Equal(t, int64(3), total)
}

func TestSourceConcurrentUse(t *testing.T) {
	t.Parallel()
	client := memClient(t, map[string]memprovider.InMemoryFlag{"orders": variantFlag("orders", "shadow"), "typed": variantFlag("typed", 7)})
	var logs bytes.Buffer
	var logMu sync.Mutex
	source, err := flags.NewSource(client, flags.Off, flags.WithSourceLogger(slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &logMu}, nil))))
	require.NoError(t, err)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 500 {
				st, err := source.Stage(context.Background(), "orders", "k")
				if err != nil || st != flags.Shadow {
					t.Errorf("got %v, %v", st, err)
					return
				}
				_, _ = source.Stage(context.Background(), "typed", "k")
				if st, err := source.Stage(context.Background(), "missing", "k"); err != nil || st != flags.Off {
					t.Errorf("never set: got %v, %v", st, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	assert.Equal(t, int64(8*500), source.Errors())
	logMu.Lock()
	defer logMu.Unlock()
	assert.Equal(t, 1, strings.Count(logs.String(), "stage flag unavailable"),
		"4000 failures of one migration log one line a minute: %s", logs.String())
	assert.NotContains(t, logs.String(), "missing", "a flag never set logs nothing")
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func TestNewSourceValidates(t *testing.T) {
	_, err := flags.NewSource(nil, flags.Off)
	require.ErrorContains(t, err, "client is nil")
	client := memClient(t, nil)
	_, err = flags.NewSource(client, flags.Stage(42))
	require.ErrorIs(t, err, flags.ErrUnknownStage)
	_, err = flags.NewSource(client, flags.Off, flags.WithMigrationFallback("Bad!", flags.Off))
	require.ErrorIs(t, err, flags.ErrInvalidName)
}
