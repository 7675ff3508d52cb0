package chaos_test

import (
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/chaos"
)

func double(_ context.Context, n int) (int, error) { return 2 * n, nil }

func TestInjectorHealthyPassesThrough(t *testing.T) {
	t.Parallel()
	inj, err := chaos.NewInjector("store")
	require.NoError(t, err)
	f := chaos.Wrap(inj, double)
	for n := range 100 {
		got, err := f(context.Background(), n)
		require.NoError(t, err)
		require.Equal(t, 2*n, got)
	}
	assert.Equal(t, chaos.InjectorStats{Calls: 100, Passed: 100}, inj.Stats())
}

func TestInjectorFailRateIsSeededAndWrapsTheGivenError(t *testing.T) {
	t.Parallel()
	run := func() []bool {
		inj, err := chaos.NewInjector("orders-new", chaos.WithSeed(42))
		require.NoError(t, err)
		require.NoError(t, inj.FailRate(0.3, io.ErrUnexpectedEOF))
		f := chaos.Wrap(inj, double)
		var failed []bool
		for n := range 2000 {
			_, err := f(context.Background(), n)
			if err != nil {
				require.ErrorIs(t, err, chaos.ErrInjected)
				require.ErrorIs(t, err, io.ErrUnexpectedEOF, "the configured error is visible to errors.Is")
				var ie *chaos.InjectedError
				require.ErrorAs(t, err, &ie)
				require.Equal(t, "orders-new", ie.Target)
			}
			failed = append(failed, err != nil)
		}
		st := inj.Stats()
		assert.Equal(t, int64(2000), st.Calls)
		assert.Equal(t, st.Calls, st.Errors+st.Passed)
		assert.InDelta(t, 600, st.Errors, 80, "about 30%% fail")
		return failed
	}
	assert.Equal(t, run(), run(), "the same seed fails the same calls")
}

func TestInjectorLatencyHangAndPanic(t *testing.T) {
	t.Parallel()
	inj, err := chaos.NewInjector("redis")
	require.NoError(t, err)
	f := chaos.Wrap(inj, double)

	require.NoError(t, inj.SetLatency(80*time.Millisecond, 10*time.Millisecond))
	start := time.Now()
	got, err := f(context.Background(), 2)
	require.NoError(t, err)
	assert.Equal(t, 4, got)
	assert.GreaterOrEqual(t, time.Since(start), 70*time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	_, err = f(ctx, 1)
	cancel()
	require.ErrorIs(t, err, context.DeadlineExceeded, "latency ends with the caller's deadline")

	inj.Heal()
	require.NoError(t, inj.HangRate(1))
	ctx, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
	start = time.Now()
	_, err = f(ctx, 1)
	cancel()
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.GreaterOrEqual(t, time.Since(start), 45*time.Millisecond)

	inj.Heal()
	require.NoError(t, inj.PanicRate(1))
	assert.PanicsWithValue(t, chaos.InjectedPanic{Target: "redis"}, func() { _, _ = f(context.Background(), 1) })

	inj.Heal()
	inj.Down(true, nil)
	_, err = f(context.Background(), 1)
	require.ErrorIs(t, err, chaos.ErrInjected)
	require.EqualError(t, err, "chaos: injected fault in redis")
	inj.Down(false, nil)
	_, err = f(context.Background(), 1)
	require.NoError(t, err)

	st := inj.Stats()
	assert.Equal(t, chaos.InjectorStats{Calls: 6, Errors: 1, Hangs: 1, Panics: 1, Passed: 2}, st,
		"the call cut short during latency is counted as a call only")
}

func TestInjectorSwitchedUnderConcurrentCalls(t *testing.T) {
	t.Parallel()
	inj, err := chaos.NewInjector("store", chaos.WithSeed(1))
	require.NoError(t, err)
	f := chaos.Wrap(inj, double)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for n := range 500 {
				if got, err := f(context.Background(), n); err == nil && got != 2*n {
					t.Errorf("got %d for %d", got, n)
				} else if err != nil && !errors.Is(err, chaos.ErrInjected) {
					t.Errorf("unexpected error %v", err)
				}
			}
		})
	}
	for n := range 50 {
		if n%2 == 0 {
			require.NoError(t, inj.FailRate(0.5, nil))
		} else {
			inj.Heal()
		}
		time.Sleep(time.Millisecond)
	}
	wg.Wait()
	st := inj.Stats()
	assert.Equal(t, int64(4000), st.Calls)
	assert.Equal(t, st.Calls, st.Errors+st.Passed)
}

func TestInjectorValidates(t *testing.T) {
	t.Parallel()
	_, err := chaos.NewInjector("")
	require.ErrorContains(t, err, "name is empty")
	inj, err := chaos.NewInjector("x")
	require.NoError(t, err)
	require.ErrorContains(t, inj.FailRate(1.5, nil), "FailRate: rate 1.5 is not in [0, 1]")
	require.ErrorContains(t, inj.HangRate(-0.1), "HangRate: rate -0.1")
	require.ErrorContains(t, inj.PanicRate(2), "PanicRate: rate 2")
	require.ErrorContains(t, inj.SetLatency(time.Millisecond, time.Second), "jitter <= latency")
}
