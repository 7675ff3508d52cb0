package streams_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
	"github.com/dimmer-dev/dimmer/streams"
)

// TestCloseReturnsWhenRepairLogHangs: copies fail and become repairs, but
// the repair log's database has stopped answering; Close returns about
// when its ctx ends (the repairs it could not record are logged whole),
// not when the database answers.
func TestCloseReturnsWhenRepairLogHangs(t *testing.T) {
	t.Parallel()
	old, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "orders"))
	require.NoError(t, err)
	t.Cleanup(old.Close)
	gone, err := kfake.NewCluster(kfake.NumBrokers(1))
	require.NoError(t, err)
	goneSeeds := gone.ListenAddrs()
	gone.Close() // copies to it fail: each becomes a repair

	_, schema := dimmertest.Schema(t)
	proxy, pool := dimmertest.HangingPool(t, "")
	ob, err := outbox.New(outbox.Config{Schema: schema, Buckets: 4})
	require.NoError(t, err)
	require.NoError(t, ob.Install(context.Background(), pool))
	log, err := streams.NewOutboxRepairLog(ob, pool, "events")
	require.NoError(t, err)
	proxy.Hang()

	p, err := streams.NewProducer("events", "orders", newStage(flags.DualWrite),
		[]kgo.Opt{kgo.SeedBrokers(old.ListenAddrs()...)}, []kgo.Opt{kgo.SeedBrokers(goneSeeds...)},
		streams.WithRepairLog(log), streams.WithCopyTimeout(time.Second), streams.WithProducerLogger(slog.New(slog.DiscardHandler)))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range 3 {
		_, err := p.Produce(ctx, &kgo.Record{Value: []byte("v")})
		require.NoError(t, err)
	}
	time.Sleep(1500 * time.Millisecond) // the copies expire into repairs

	cctx, ccancel := context.WithTimeout(context.Background(), time.Second)
	defer ccancel()
	start := time.Now()
	closed := make(chan error, 1)
	go func() { closed <- p.Close(cctx) }()
	select {
	case err := <-closed:
		t.Logf("Close returned after %v: %v", time.Since(start), err)
		require.Less(t, time.Since(start), 4*time.Second)
	case <-time.After(20 * time.Second):
		t.Fatal("Close waited past its ctx on a repair log that does not answer")
	}
	require.NotZero(t, p.Stats().RecordFailed, "the repairs it could not record are counted (and logged)")
}
