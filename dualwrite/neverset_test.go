package dualwrite_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// TestNeverSetFlagWritesOldWithoutRepairs: a fresh service whose migration
// was never set reads it as off through a real provider: writes go to old
// only, with no stage_unavailable repair and no warning.
func TestNeverSetFlagWritesOldWithoutRepairs(t *testing.T) {
	t.Parallel()
	p := newPgPair(t)
	store, err := pgflags.NewStore(p.old, pgflags.WithSchema(p.schema))
	require.NoError(t, err)
	require.NoError(t, store.Install(ctx(t)))
	flagstest.Set(t, store, "another_migration", flags.Live, nil)
	provider, err := pgflags.NewProvider(p.old, pgflags.WithSchema(p.schema))
	require.NoError(t, err)
	_, client := flagstest.Client(t, provider)
	var logs syncBuffer
	source, err := flags.NewSource(client, flags.DualWrite, flags.WithSourceLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	require.NoError(t, err)

	log, err := dualwrite.NewOutboxRepairLog(p.ob, p.old, dualwrite.RepairTopic(pairMigration))
	require.NoError(t, err)
	w, err := dualwrite.New(pairMigration, source, p.writeOld, p.writeNew, accountKey, dualwrite.WithRepairLog(log), dualwrite.WithSync())
	require.NoError(t, err)
	const n = 50
	for i := range n {
		_, err := w.Write(ctx(t), account{ID: fmt.Sprintf("n%d", i), Name: "x", Version: 1})
		require.NoError(t, err)
	}
	st, err := p.ob.Stats(ctx(t), p.old, dualwrite.RepairTopic(pairMigration))
	require.NoError(t, err)
	assert.Zero(t, st.Pending, "a migration never set needs no repair")
	var onNew int
	require.NoError(t, p.new.QueryRow(ctx(t), `SELECT count(*) FROM accounts_new`).Scan(&onNew))
	assert.Zero(t, onNew, "off writes old only (not the dualwrite fallback)")
	var onOld int
	require.NoError(t, p.old.QueryRow(ctx(t), `SELECT count(*) FROM accounts_old`).Scan(&onOld))
	assert.Equal(t, n, onOld)
	assert.Zero(t, source.Errors())
	assert.Empty(t, logs.String())
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestRepairerLogsUnavailableStageOnceAMinute: while the flag store cannot
// answer, every repair fails the same way; that is logged once, not per
// repair.
func TestRepairerLogsUnavailableStageOnceAMinute(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	down := dualwrite.StageFunc(func(context.Context, string, string) (flags.Stage, error) {
		return flags.Off, fmt.Errorf("%w: provider not ready", flags.ErrFlagUnavailable)
	})
	var logs syncBuffer
	r, err := dualwrite.NewRepairer("accounts_to_redis", down,
		func(ctx context.Context, side flags.Side, key string) (account, bool, error) {
			return s.loadOld(ctx, key)
		},
		func(ctx context.Context, side flags.Side, key string, a account) error {
			_, err := s.writeOld(ctx, a)
			return err
		},
		dualwrite.WithRepairerLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	require.NoError(t, err)
	for i := range 100 {
		out, err := r.Repair(ctx(t), dualwrite.Repair{Migration: "accounts_to_redis", Key: fmt.Sprint("k", i), Stage: flags.DualWrite, Side: flags.New})
		assert.Equal(t, dualwrite.Failed, out)
		require.ErrorIs(t, err, flags.ErrFlagUnavailable)
	}
	assert.Equal(t, 1, strings.Count(logs.String(), "level=WARN"), logs.String())
	assert.Contains(t, logs.String(), "wait for the stage flag")
}
