package outbox_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
)

// TestShutdownBoundedOnMuteDatabase: Shutdown returns about when its ctx
// ends although the database stopped answering, whether it hung from the
// start (Run still checking the layout) or mid-run (the relay's next
// statement, and the release of its leases, get no answer).
func TestShutdownBoundedOnMuteDatabase(t *testing.T) {
	t.Parallel()
	_, o := setup(t, outbox.Config{Buckets: 4})
	pub := outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error { return make([]error, len(b)) })

	for _, muteFromStart := range []bool{true, false} {
		p, pool := dimmertest.HangingPool(t, "")
		if muteFromStart {
			p.Hang()
		}
		r, err := o.NewRelay(pool, pub, outbox.RelayConfig{PollInterval: 20 * time.Millisecond, Logger: quiet(t)})
		require.NoError(t, err)
		ran := make(chan error, 1)
		go func() { ran <- r.Run(context.Background()) }()
		if muteFromStart {
			time.Sleep(100 * time.Millisecond) // Run waits on its first statement
		} else {
			require.Eventually(t, func() bool { return len(r.Buckets()) == 4 }, 10*time.Second, 5*time.Millisecond)
			p.Hang()
			time.Sleep(100 * time.Millisecond) // the relay's next statements go unanswered
		}
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		start := time.Now()
		shut := make(chan error, 1)
		go func() { shut <- r.Shutdown(ctx) }()
		select {
		case err = <-shut:
		case <-time.After(10 * time.Second):
			t.Fatalf("Shutdown blocked past its ctx (mute from start: %v)", muteFromStart)
		}
		took := time.Since(start)
		cancel()
		t.Logf("mute from start %v: Shutdown took %v (%v)", muteFromStart, took, err)
		if !muteFromStart {
			assert.ErrorIs(t, err, context.DeadlineExceeded, "the batch in flight never completed")
		}
		// ctx (0.5s), pgx's cut of a cancelled statement (1s), the release's grace (1s).
		assert.Less(t, took, 3500*time.Millisecond, "mute from start: %v", muteFromStart)
		select {
		case <-ran:
		case <-time.After(5 * time.Second):
			t.Fatalf("Run did not return after Shutdown (mute from start: %v)", muteFromStart)
		}
	}

	// Shutdown before Run got going: Run stops at once rather than wait
	// on the database for ever.
	p, pool := dimmertest.HangingPool(t, "")
	p.Hang()
	r, err := o.NewRelay(pool, pub, outbox.RelayConfig{Logger: quiet(t)})
	require.NoError(t, err)
	require.NoError(t, r.Shutdown(context.Background()))
	ran := make(chan error, 1)
	go func() { ran <- r.Run(context.Background()) }()
	select {
	case err := <-ran:
		assert.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Run after Shutdown waited on a mute database")
	}
}
