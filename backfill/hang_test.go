package backfill_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// TestRunReturnsWhenDatabaseHangs: the database stops answering mid-copy
// (a loopback proxy that forwards nothing more); once Run's ctx ends, Run
// returns within its bounded clean-up, not never.
func TestRunReturnsWhenDatabaseHangs(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount, note) SELECT g, g, 'n' || g FROM generate_series(1, 5000) g`)
	p, pool := dimmertest.HangingPool(t, e.schema)
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(e.schema))
	require.NoError(t, err)
	bf, err := backfill.New(pool, backfill.WithSchema(e.schema), backfill.WithFlagStore(store))
	require.NoError(t, err)

	j := ordersJob("hang")
	j.Config.RowsPerSecond = 1000 // five seconds of copying
	copying := make(chan struct{}, 1)
	j.Config.Progress = func(backfill.Progress) {
		select {
		case copying <- struct{}{}:
		default:
		}
	}
	ctx, cancel := context.WithCancel(tctx(t))
	defer cancel()
	ran := make(chan error, 1)
	go func() {
		_, err := bf.Run(ctx, j)
		ran <- err
	}()
	select {
	case <-copying:
	case <-time.After(20 * time.Second):
		t.Fatal("no chunk copied")
	}
	p.Hang()
	time.Sleep(200 * time.Millisecond) // the next statements go unanswered
	cancel()
	start := time.Now()
	select {
	case err := <-ran:
		t.Logf("Run returned %v after its ctx ended: %v", time.Since(start), err)
		assert.ErrorIs(t, err, context.Canceled)
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return after its ctx ended on a hanging database")
	}
}
