package cdc_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
)

func count(t testing.TB, db interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, sql string, args ...any) int {
	var n int
	require.NoError(t, db.QueryRow(tctx(t, 10*time.Second), sql, args...).Scan(&n))
	return n
}

func TestCreateSlotRefusesBadInput(t *testing.T) {
	t.Parallel()
	_, pool := logicalDB(t)
	ctx := tctx(t, time.Minute)
	_, err := pool.Exec(ctx, `CREATE TABLE nopk (a int); CREATE TABLE nothing (id int PRIMARY KEY) ;
ALTER TABLE nothing REPLICA IDENTITY NOTHING; CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)`)
	require.NoError(t, err)
	nothingLeft := func(t *testing.T, slotName string) {
		assert.Zero(t, count(t, pool, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, slotName), "slot left behind")
		assert.Zero(t, count(t, pool, `SELECT count(*) FROM pg_publication`), "publication left behind")
		if count(t, pool, `SELECT count(*) FROM pg_tables WHERE schemaname = 'dimmer' AND tablename = 'cdc_slots'`) > 0 {
			assert.Zero(t, count(t, pool, `SELECT count(*) FROM dimmer.cdc_slots WHERE slot = $1`, slotName), "registry row left behind")
		}
	}

	t.Run("no primary key", func(t *testing.T) {
		name := dimmertest.Name("s_")
		err := cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: name, Tables: []string{"a", "nopk"}})
		require.ErrorIs(t, err, cdc.ErrNoReplicaIdentity)
		assert.Contains(t, err.Error(), "public.nopk")
		nothingLeft(t, name)
	})
	t.Run("replica identity nothing", func(t *testing.T) {
		name := dimmertest.Name("s_")
		err := cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: name, Tables: []string{"nothing"}})
		require.ErrorIs(t, err, cdc.ErrNoReplicaIdentity)
		assert.Contains(t, err.Error(), "NOTHING")
		nothingLeft(t, name)
	})
	t.Run("missing table", func(t *testing.T) {
		name := dimmertest.Name("s_")
		err := cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: name, Tables: []string{"nosuch"}})
		require.ErrorIs(t, err, cdc.ErrNoTable)
		assert.Contains(t, err.Error(), "nosuch")
		nothingLeft(t, name)
	})
	t.Run("bad name", func(t *testing.T) {
		err := cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: "Bad-Name"})
		var fe *cdc.FieldError
		require.ErrorAs(t, err, &fe)
		assert.Equal(t, "Slot", fe.Field)
	})
	t.Run("slot taken by another plugin", func(t *testing.T) {
		name := dimmertest.Name("s_")
		_, err := pool.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'test_decoding')`, name)
		require.NoError(t, err)
		t.Cleanup(func() { _, _ = pool.Exec(context.Background(), `SELECT pg_drop_replication_slot($1)`, name) })
		err = cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: name, Tables: []string{"a"}})
		require.ErrorIs(t, err, cdc.ErrSlotTaken)
		assert.Contains(t, err.Error(), name)
		assert.Contains(t, err.Error(), "test_decoding")
		assert.Zero(t, count(t, pool, `SELECT count(*) FROM pg_publication`), "publication left behind")
		// Never dropped by dimmer either.
		require.ErrorIs(t, cdc.DropSlot(ctx, pool, "", name, true), cdc.ErrNoSlot)
		assert.Equal(t, 1, count(t, pool, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, name))
	})
	t.Run("publication taken", func(t *testing.T) {
		name, pub := dimmertest.Name("s_"), dimmertest.Name("p_")
		_, err := pool.Exec(ctx, `CREATE PUBLICATION `+pub)
		require.NoError(t, err)
		t.Cleanup(func() { _, _ = pool.Exec(context.Background(), `DROP PUBLICATION `+pub) })
		err = cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: name, Publication: pub})
		require.ErrorIs(t, err, cdc.ErrPublicationTaken)
		assert.Contains(t, err.Error(), pub)
		assert.Zero(t, count(t, pool, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, name))
	})
	t.Run("publication missing a table", func(t *testing.T) {
		name := slot(t, pool, cdc.SlotSpec{Tables: []string{"a"}, Purpose: "sync"})
		// Idempotent with the same tables...
		require.NoError(t, cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: name, Tables: []string{"a"}}))
		// ...refused when asked for a table its publication lacks.
		err := cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: name, Tables: []string{"a", "b"}})
		require.ErrorIs(t, err, cdc.ErrPublicationMissingTable)
		assert.Contains(t, err.Error(), "public.b")
		st, err := cdc.Slots(ctx, pool, "")
		require.NoError(t, err)
		require.Len(t, st, 1)
		assert.Equal(t, name, st[0].Slot)
		assert.True(t, st[0].Exists)
		assert.Equal(t, []string{"public.a"}, st[0].Tables)
	})
}

// The server at DIMMER_POSTGRES_URL runs with wal_level = replica under
// `make test` (the logical one is separate): a slot there is refused
// before anything is created.
func TestCreateSlotRefusesWalLevelReplica(t *testing.T) {
	t.Parallel()
	url := dimmertest.Database(t)
	pool := dimmertest.Pool(t, url)
	ctx := tctx(t, 30*time.Second)
	var level string
	require.NoError(t, pool.QueryRow(ctx, `SHOW wal_level`).Scan(&level))
	if level == "logical" {
		t.Skip("the server at DIMMER_POSTGRES_URL has wal_level = logical; nothing to refuse")
	}
	_, err := pool.Exec(ctx, `CREATE TABLE a (id int PRIMARY KEY)`)
	require.NoError(t, err)
	err = cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: dimmertest.Name("s_"), Tables: []string{"a"}})
	require.ErrorIs(t, err, cdc.ErrWalLevel)
	assert.Contains(t, err.Error(), "wal_level = "+level)
	assert.Zero(t, count(t, pool, `SELECT count(*) FROM pg_publication`))
	assert.Zero(t, count(t, pool, `SELECT count(*) FROM pg_namespace WHERE nspname = 'dimmer'`))
}
