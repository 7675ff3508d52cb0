package workpool_test

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dimmer-dev/dimmer/internal/workpool"
	"github.com/stretchr/testify/require"
)

func TestNewValidates(t *testing.T) {
	t.Parallel()
	_, err := workpool.New(0, 1)
	require.ErrorContains(t, err, "workers")
	_, err = workpool.New(1, -1)
	require.ErrorContains(t, err, "queue")
	_, err = workpool.NewBatched(1, 1, 0)
	require.ErrorContains(t, err, "interval")
	_, err = workpool.NewBatched(0, 1, time.Millisecond)
	require.ErrorContains(t, err, "workers")
}

// constructors runs a test against both hand-offs.
var constructors = map[string]func(workers, queue int) (*workpool.Pool, error){
	"direct":  workpool.New,
	"batched": func(w, q int) (*workpool.Pool, error) { return workpool.NewBatched(w, q, time.Millisecond) },
}

func TestShedsWhenFullAndDrainsOnShutdown(t *testing.T) {
	t.Parallel()
	for name, newPool := range constructors {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			shedsWhenFullAndDrainsOnShutdown(t, newPool)
		})
	}
}

func shedsWhenFullAndDrainsOnShutdown(t *testing.T, newPool func(int, int) (*workpool.Pool, error)) {
	p, err := newPool(1, 2)
	require.NoError(t, err)
	release := make(chan struct{})
	started := make(chan struct{})
	var ran atomic.Int64
	ok, err := p.TrySubmit(func() { close(started); <-release; ran.Add(1) })
	require.NoError(t, err)
	require.True(t, ok)
	<-started
	for range 2 {
		ok, err := p.TrySubmit(func() { ran.Add(1) })
		require.NoError(t, err)
		require.True(t, ok)
	}
	ok, err = p.TrySubmit(func() { ran.Add(1) })
	require.NoError(t, err)
	require.False(t, ok, "a full queue must shed")

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, p.Shutdown(ctx), context.DeadlineExceeded, "a blocked worker keeps shutdown waiting")
	_, err = p.TrySubmit(func() {})
	require.ErrorIs(t, err, workpool.ErrClosed)

	close(release)
	require.NoError(t, p.Shutdown(context.Background()))
	require.EqualValues(t, 3, ran.Load(), "queued tasks run before shutdown returns")
}

func TestConcurrentSubmitAndShutdown(t *testing.T) {
	t.Parallel()
	for name, newPool := range constructors {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			concurrentSubmitAndShutdown(t, newPool)
		})
	}
}

func concurrentSubmitAndShutdown(t *testing.T, newPool func(int, int) (*workpool.Pool, error)) {
	p, err := newPool(4, 16)
	require.NoError(t, err)
	var submitted, ran atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	for range 8 {
		go func() {
			defer func() { done <- struct{}{} }()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if ok, err := p.TrySubmit(func() { ran.Add(1) }); ok {
					submitted.Add(1)
				} else if err != nil {
					return
				}
			}
		}()
	}
	time.Sleep(10 * time.Millisecond)
	require.NoError(t, p.Shutdown(context.Background()))
	close(stop)
	for range 8 {
		<-done
	}
	require.Equal(t, submitted.Load(), ran.Load(), "every accepted task runs")
}

// TestBatchedStartsWithinTheInterval: tasks submitted to an idle batched
// pool start within a few intervals, including after it went idle and
// disarmed.
func TestBatchedStartsWithinTheInterval(t *testing.T) {
	t.Parallel()
	p, err := workpool.NewBatched(2, 8, 2*time.Millisecond)
	require.NoError(t, err)
	defer p.Shutdown(context.Background())
	for range 3 {
		ran := make(chan struct{})
		ok, err := p.TrySubmit(func() { close(ran) })
		require.NoError(t, err)
		require.True(t, ok)
		select {
		case <-ran:
		case <-time.After(5 * time.Second):
			t.Fatal("task never started")
		}
		time.Sleep(10 * time.Millisecond) // idle: the dispatcher disarms
	}
	require.Zero(t, p.Len())
}

func TestKeyedRunsOneKeyInOrder(t *testing.T) {
	t.Parallel()
	_, err := workpool.NewKeyed(0, 1)
	require.ErrorContains(t, err, "workers")
	_, err = workpool.NewKeyed(1, -1)
	require.ErrorContains(t, err, "queue")

	k, err := workpool.NewKeyed(8, 8*200)
	require.NoError(t, err)
	var mu sync.Mutex
	seen := map[string][]int{}
	for i := range 50 {
		for _, key := range []string{"a", "b", "c"} {
			ok, err := k.TrySubmit(key, func() {
				time.Sleep(time.Duration(i%3) * 100 * time.Microsecond)
				mu.Lock()
				seen[key] = append(seen[key], i)
				mu.Unlock()
			})
			require.NoError(t, err)
			require.True(t, ok)
		}
	}
	require.NoError(t, k.Shutdown(context.Background()))
	for _, key := range []string{"a", "b", "c"} {
		require.Len(t, seen[key], 50)
		require.True(t, slices.IsSorted(seen[key]), "key %s ran out of order: %v", key, seen[key])
	}
	_, err = k.TrySubmit("a", func() {})
	require.ErrorIs(t, err, workpool.ErrClosed)
}

func TestKeyedShedsWhenItsQueueIsFull(t *testing.T) {
	t.Parallel()
	k, err := workpool.NewKeyed(1, 1)
	require.NoError(t, err)
	release, started := make(chan struct{}), make(chan struct{})
	ok, _ := k.TrySubmit("x", func() { close(started); <-release })
	require.True(t, ok)
	<-started
	ok, _ = k.TrySubmit("x", func() {})
	require.True(t, ok, "one waits in the queue")
	ok, err = k.TrySubmit("y", func() {})
	require.NoError(t, err)
	require.False(t, ok, "the full queue sheds")
	close(release)
	require.NoError(t, k.Shutdown(context.Background()))
}

// TestBatchedWithoutQueueTakesWhatIdleWorkersCan: queue 0 means, as for New,
// a task is accepted only while a worker is idle.
func TestBatchedWithoutQueueTakesWhatIdleWorkersCan(t *testing.T) {
	t.Parallel()
	p, err := workpool.NewBatched(1, 0, time.Millisecond)
	require.NoError(t, err)
	release, started := make(chan struct{}), make(chan struct{})
	ok, err := p.TrySubmit(func() { close(started); <-release })
	require.NoError(t, err)
	require.True(t, ok, "the idle worker takes it")
	<-started
	ok, err = p.TrySubmit(func() {})
	require.NoError(t, err)
	require.False(t, ok, "no idle worker, no queue: shed")
	close(release)
	require.NoError(t, p.Shutdown(context.Background()))
}
