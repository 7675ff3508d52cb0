package dualwrite_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
)

func outboxRepairs(t *testing.T, s *stores, schema string) []dualwrite.Repair {
	t.Helper()
	rows, err := s.pg.Query(ctx(t), `SELECT payload FROM `+pgx.Identifier{schema, "outbox"}.Sanitize()+` ORDER BY id`)
	require.NoError(t, err)
	payloads, err := pgx.CollectRows(rows, pgx.RowTo[[]byte])
	require.NoError(t, err)
	var out []dualwrite.Repair
	for _, p := range payloads {
		r, err := dualwrite.DecodeRepair(p)
		require.NoError(t, err)
		out = append(out, r)
	}
	return out
}

// TestOutboxRepairLog: repairs land durably in the real outbox; a WriteTx
// intent commits and rolls back with the authoritative write; the repairer
// replays what the outbox holds.
func TestOutboxRepairLog(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	var schema string
	require.NoError(t, s.pg.QueryRow(ctx(t), `SELECT current_schema()`).Scan(&schema))
	ob, err := outbox.New(outbox.Config{Schema: schema})
	require.NoError(t, err)
	require.NoError(t, ob.Install(ctx(t), s.pg))
	log, err := dualwrite.NewOutboxRepairLog(ob, s.pg, "dimmer.repair.accounts")
	require.NoError(t, err)
	_, err = dualwrite.NewOutboxRepairLog(ob, s.pg, "")
	require.ErrorContains(t, err, "topic")

	src := stageOf(flags.DualWrite)
	w := newWriter(t, s, src, log, dualwrite.WithSync())

	// A failed secondary write is in the outbox.
	s.poison(t, "o1")
	_, err = w.Write(ctx(t), account{ID: "o1", Name: "one", Version: 1})
	require.NoError(t, err)
	reps := outboxRepairs(t, s, schema)
	require.Len(t, reps, 1)
	assert.Equal(t, "o1", reps[0].Key)
	assert.Equal(t, dualwrite.ReasonError, reps[0].Reason)

	// WriteTx rolled back: neither the row nor the intent exist.
	tx, err := s.pg.Begin(ctx(t))
	require.NoError(t, err)
	_, err = w.WriteTx(ctx(t), tx, account{ID: "o2", Name: "two", Version: 1})
	require.NoError(t, err)
	require.NoError(t, tx.Rollback(ctx(t)))
	_, inOld := s.readOld(t, "o2")
	assert.False(t, inOld)
	assert.Len(t, outboxRepairs(t, s, schema), 1, "the intent rolled back with the write")

	// Committed: both exist, and the secondary was not written yet.
	tx, err = s.pg.Begin(ctx(t))
	require.NoError(t, err)
	_, err = w.WriteTx(ctx(t), tx, account{ID: "o2", Name: "two", Version: 1})
	require.NoError(t, err)
	require.NoError(t, tx.Commit(ctx(t)))
	_, inOld = s.readOld(t, "o2")
	assert.True(t, inOld)
	_, inNew := s.readNew(t, "o2")
	assert.False(t, inNew, "no secondary write before commit")
	reps = outboxRepairs(t, s, schema)
	require.Len(t, reps, 2)
	assert.Equal(t, dualwrite.ReasonTx, reps[1].Reason)

	// The repairer brings both keys in line from what the outbox holds.
	require.NoError(t, s.rdb.Del(ctx(t), s.key("o1")).Err())
	rep := newRepairer(t, s, src).RepairAll(ctx(t), reps)
	assert.Equal(t, 2, rep.Repaired)
	assert.Empty(t, rep.Failed)
	for _, id := range []string{"o1", "o2"} {
		got, ok := s.readNew(t, id)
		require.True(t, ok, id)
		want, _ := s.readOld(t, id)
		assert.Equal(t, want, got)
	}

	// Without a transactional log WriteTx refuses rather than lose the intent.
	plain := newWriter(t, s, src, dualwrite.RepairLogFunc(func(context.Context, dualwrite.Repair) error { return nil }))
	tx, err = s.pg.Begin(ctx(t))
	require.NoError(t, err)
	defer tx.Rollback(ctx(t))
	_, err = plain.WriteTx(ctx(t), tx, account{ID: "o3", Name: "x", Version: 1})
	assert.ErrorIs(t, err, dualwrite.ErrNoTxRepairLog)
}
