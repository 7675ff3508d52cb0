package streams_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/streams"
)

// TestProduceReturnsWhenClusterHangs: the authoritative cluster stops
// answering after the producer reached it; Produce returns at its ctx,
// not when (if ever) the broker answers.
func TestProduceReturnsWhenClusterHangs(t *testing.T) {
	t.Parallel()
	old, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "orders"))
	require.NoError(t, err)
	t.Cleanup(old.Close)
	_, newSeeds := clusters(t)
	p, err := streams.NewProducer("events", "orders", newStage(flags.Off),
		[]kgo.Opt{kgo.SeedBrokers(old.ListenAddrs()...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}, streams.WithRepairLog(nilLog{}))
	require.NoError(t, err)
	defer func() { // after the cluster answers again (deferred below)
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		assert.NoError(t, p.Close(c))
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = p.Produce(ctx, &kgo.Record{Value: []byte("first")})
	require.NoError(t, err)

	release := make(chan struct{})
	defer close(release)
	old.Control(func(kmsg.Request) (kmsg.Response, error, bool) {
		old.KeepControl()
		old.SleepControl(func() { <-release })
		return nil, nil, false
	})
	pctx, pcancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer pcancel()
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		_, err := p.Produce(pctx, &kgo.Record{Value: []byte("second")})
		done <- err
	}()
	select {
	case err := <-done:
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Less(t, time.Since(start), 2*time.Second)
	case <-time.After(10 * time.Second):
		t.Fatal("Produce waited past its ctx on a cluster that does not answer")
	}
}
