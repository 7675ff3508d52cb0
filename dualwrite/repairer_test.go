package dualwrite_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
)

func newRepairer(t *testing.T, s *stores, src dualwrite.StageSource) *dualwrite.Repairer[account] {
	t.Helper()
	load := func(ctx context.Context, side flags.Side, key string) (account, bool, error) {
		if side == flags.Old {
			return s.loadOld(ctx, key)
		}
		return s.loadNew(ctx, key)
	}
	store := func(ctx context.Context, side flags.Side, key string, a account) error {
		var err error
		if side == flags.Old {
			_, err = s.writeOld(ctx, a)
		} else {
			_, err = s.writeNew(ctx, a)
		}
		return err
	}
	del := func(ctx context.Context, side flags.Side, key string) error {
		if side == flags.Old {
			_, err := s.pg.Exec(ctx, `DELETE FROM accounts WHERE id = $1`, key)
			return err
		}
		return s.rdb.Del(ctx, s.key(key)).Err()
	}
	r, err := dualwrite.NewRepairer("accounts_to_redis", src, load, store, dualwrite.WithDelete(del))
	require.NoError(t, err)
	return r
}

// TestRepairerReplaysCurrentStateNotTheStaleOperation: a write fails on the
// secondary, the key is written again later (also failing), and the repairs
// are replayed oldest first: the secondary ends with the current state.
func TestRepairerReplaysCurrentStateNotTheStaleOperation(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	src := stageOf(flags.DualWrite)
	log := newRepairs()
	w := newWriter(t, s, src, log, dualwrite.WithSync())

	s.poison(t, "x")
	for v := int64(1); v <= 3; v++ {
		_, err := w.Write(ctx(t), account{ID: "x", Name: "v" + strconv.FormatInt(v, 10), Version: v})
		require.NoError(t, err)
	}
	// A second key that fails, then a key that was deleted from the
	// authoritative side since.
	s.poison(t, "y")
	_, err := w.Write(ctx(t), account{ID: "y", Name: "y1", Version: 1})
	require.NoError(t, err)
	s.poison(t, "gone")
	_, err = w.Write(ctx(t), account{ID: "gone", Name: "g", Version: 1})
	require.NoError(t, err)
	_, err = s.pg.Exec(ctx(t), `DELETE FROM accounts WHERE id = 'gone'`)
	require.NoError(t, err)
	reps := log.all()
	require.Len(t, reps, 5)

	// Unpoison: the store works again.
	require.NoError(t, s.rdb.Del(ctx(t), s.key("x"), s.key("y")).Err())
	require.NoError(t, s.rdb.Del(ctx(t), s.key("gone")).Err())
	require.NoError(t, s.rdb.HSet(ctx(t), s.key("gone"), "name", "stale", "version", 0).Err())

	r := newRepairer(t, s, src)
	rep := r.RepairAll(ctx(t), reps)
	assert.Equal(t, 5, rep.Repaired)
	assert.Empty(t, rep.Failed)
	got, ok := s.readNew(t, "x")
	require.True(t, ok)
	assert.Equal(t, account{ID: "x", Name: "v3", Version: 3}, got, "the first repair already wrote the current state")
	got, _ = s.readNew(t, "y")
	assert.Equal(t, "y1", got.Name)
	_, ok = s.readNew(t, "gone")
	assert.False(t, ok, "a key gone from the authoritative side is removed from the secondary")

	// Idempotent: replaying again changes nothing and fails nothing.
	rep = r.RepairAll(ctx(t), reps)
	assert.Equal(t, 5, rep.Repaired)
	got, _ = s.readNew(t, "x")
	assert.Equal(t, int64(3), got.Version)
}

func TestRepairerFollowsTheStageInForceNow(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	src := stageOf(flags.Live)
	r := newRepairer(t, s, src)
	// New is authoritative in live: the repair copies new to old, whatever
	// the repair's own stage said.
	require.NoError(t, s.rdb.HSet(ctx(t), s.key("k"), "name", "from-new", "version", 7).Err())
	out, err := r.Repair(ctx(t), dualwrite.Repair{Migration: "accounts_to_redis", Key: "k", Stage: flags.DualWrite, Side: flags.New})
	require.NoError(t, err)
	assert.Equal(t, dualwrite.Repaired, out)
	got, ok := s.readOld(t, "k")
	require.True(t, ok)
	assert.Equal(t, "from-new", got.Name)

	src.set(flags.Complete)
	out, err = r.Repair(ctx(t), dualwrite.Repair{Migration: "accounts_to_redis", Key: "k2", Side: flags.Old})
	require.NoError(t, err)
	assert.Equal(t, dualwrite.Skipped, out, "complete writes one side only")
}

// TestRepairerDefersWhileTheStageIsUnavailable: with the flag unavailable
// the source serves its fallback (off) with an error; acting on it would
// skip, and so drop, a repair that is still needed. The repair fails (the
// loop retries it) and nothing is written.
func TestRepairerDefersWhileTheStageIsUnavailable(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	down := dualwrite.StageFunc(func(context.Context, string, string) (flags.Stage, error) {
		return flags.Off, fmt.Errorf("%w: provider not ready", flags.ErrFlagUnavailable)
	})
	r := newRepairer(t, s, down)
	_, err := s.writeOld(ctx(t), account{ID: "k", Name: "x", Version: 1})
	require.NoError(t, err)
	out, err := r.Repair(ctx(t), dualwrite.Repair{Migration: "accounts_to_redis", Key: "k", Stage: flags.DualWrite, Side: flags.New})
	assert.Equal(t, dualwrite.Failed, out)
	require.ErrorIs(t, err, flags.ErrFlagUnavailable)
	assert.ErrorContains(t, err, "stage unavailable")
	_, ok := s.readNew(t, "k")
	assert.False(t, ok)
}

func TestRepairerReportsWhatItCouldNotRepair(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	r := newRepairer(t, s, stageOf(flags.DualWrite))
	_, err := s.writeOld(ctx(t), account{ID: "ok", Name: "a", Version: 1})
	require.NoError(t, err)
	_, err = s.writeOld(ctx(t), account{ID: "stuck", Name: "a", Version: 1})
	require.NoError(t, err)
	s.poison(t, "stuck")
	reps := []dualwrite.Repair{
		{Migration: "accounts_to_redis", Key: "ok", Side: flags.New},
		{Migration: "accounts_to_redis", Key: "stuck", Side: flags.New},
		{Migration: "another", Key: "ok", Side: flags.New},
	}
	rep := r.RepairAll(ctx(t), reps)
	assert.Equal(t, 1, rep.Repaired)
	require.Len(t, rep.Failed, 2)
	assert.Equal(t, "stuck", rep.Failed[0].Repair.Key)
	assert.Contains(t, rep.Failed[0].Error(), "WRONGTYPE")
	assert.Contains(t, rep.Failed[1].Error(), `migration "another"`)

	cctx, cancel := context.WithCancel(ctx(t))
	cancel()
	rep = r.RepairAll(cctx, reps[:1])
	require.Len(t, rep.Failed, 1, "repairs not attempted are reported, not dropped")
	assert.ErrorIs(t, rep.Failed[0], context.Canceled)
}

func TestRepairJSONRoundTrip(t *testing.T) {
	t.Parallel()
	in := dualwrite.Repair{Migration: "m", Key: "k", Stage: flags.Shadow, Side: flags.New, Reason: dualwrite.ReasonShed, Err: "e"}
	b, err := json.Marshal(in)
	require.NoError(t, err)
	assert.Contains(t, string(b), `"stage":"shadow"`)
	assert.Contains(t, string(b), `"side":"new"`)
	var out dualwrite.Repair
	require.NoError(t, json.Unmarshal(b, &out))
	assert.Equal(t, in, out)

	err = json.Unmarshal([]byte(`{"migration":"m","key":"k","stage":"sideways","side":"new"}`), &out)
	assert.ErrorIs(t, err, flags.ErrUnknownStage)
	err = json.Unmarshal([]byte(`{"migration":"m","key":"k","stage":"off","side":"left"}`), &out)
	assert.ErrorContains(t, err, `side "left"`)
}

// TestWriteRoutedByFallbackLeavesARepair: while the flag is unavailable the
// writer routes by the fallback stage (off: old only) and records a repair
// for new, because the real stage may write both; once the flag is back the
// repairer brings new in line (or skips, if the stage is off indeed).
func TestWriteRoutedByFallbackLeavesARepair(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	var up atomic.Bool
	src := dualwrite.StageFunc(func(context.Context, string, string) (flags.Stage, error) {
		if up.Load() {
			return flags.DualWrite, nil
		}
		return flags.Off, fmt.Errorf("%w: provider not ready", flags.ErrFlagUnavailable)
	})
	log := newRepairs()
	w := newWriter(t, s, src, log, dualwrite.WithSync())
	_, err := w.Write(ctx(t), account{ID: "f1", Name: "x", Version: 1})
	require.NoError(t, err)
	rep := log.next(t)
	assert.Equal(t, dualwrite.ReasonStageUnavailable, rep.Reason)
	assert.Equal(t, flags.New, rep.Side)
	_, ok := s.readNew(t, "f1")
	require.False(t, ok, "the fallback wrote old only")

	// A flag that answers without error routes normally: no repair.
	up.Store(true)
	_, err = w.Write(ctx(t), account{ID: "f2", Name: "x", Version: 1})
	require.NoError(t, err)
	assert.Len(t, log.all(), 1)

	out, err := newRepairer(t, s, src).Repair(ctx(t), rep)
	require.NoError(t, err)
	assert.Equal(t, dualwrite.Repaired, out)
	got, ok := s.readNew(t, "f1")
	require.True(t, ok)
	assert.Equal(t, account{ID: "f1", Name: "x", Version: 1}, got)
}
