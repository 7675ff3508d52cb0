package workpool_test

import (
	"context"
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
}

func TestShedsWhenFullAndDrainsOnShutdown(t *testing.T) {
	t.Parallel()
	p, err := workpool.New(1, 2)
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
	p, err := workpool.New(4, 16)
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
