package dualwrite_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
)

// TestAsyncSecondaryKeepsPerKeyOrder: async secondary writes of one key are
// applied in the order of their authoritative writes, even by a blind
// write (no version check) with jittery latency on a pool of many workers.
// Out of order, the secondary would silently end with an older value and
// no repair would say so.
func TestAsyncSecondaryKeepsPerKeyOrder(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	log := newRepairs()
	var mu sync.Mutex
	applied := map[string][]int64{} // per key, the versions in the order they ran
	jittery := func(ctx context.Context, a account) (int64, error) {
		time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond)
		mu.Lock()
		applied[a.ID] = append(applied[a.ID], a.Version)
		mu.Unlock()
		return s.writeNew(ctx, a) // HSET: last write wins
	}
	w, err := dualwrite.New("order", stageOf(flags.DualWrite), s.writeOld, jittery, accountKey,
		dualwrite.WithRepairLog(log), dualwrite.WithAsync(8, 4096))
	require.NoError(t, err)
	const keys, versions = 2, 100
	for v := int64(1); v <= versions; v++ {
		for k := range keys {
			_, err := w.Write(ctx(t), account{ID: fmt.Sprintf("o%d", k), Name: fmt.Sprintf("v%d", v), Version: v})
			require.NoError(t, err)
		}
	}
	require.NoError(t, w.Shutdown(ctx(t)))
	require.Empty(t, log.all(), "no secondary write failed")
	for k := range keys {
		id := fmt.Sprintf("o%d", k)
		got, ok := s.readNew(t, id)
		require.True(t, ok, id)
		assert.Equal(t, int64(versions), got.Version, "%s: the last write is the one that stays", id)
		assert.True(t, slices.IsSorted(applied[id]), "%s: secondary writes ran out of order: %v", id, applied[id])
		assert.Len(t, applied[id], versions)
	}
}
