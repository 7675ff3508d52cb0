package main

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
)

func TestCDCCommands(t *testing.T) {
	t.Parallel()
	url := dimmertest.LogicalDatabase(t)
	pool := dimmertest.Pool(t, url)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	slot := dimmertest.Name("s_")
	require.NoError(t, cdc.CreateSlot(ctx, pool, cdc.SlotSpec{Slot: slot, Purpose: "relay"}))
	dropped := false
	t.Cleanup(func() {
		if !dropped {
			_ = cdc.DropSlot(context.Background(), pool, "", slot, true)
		}
	})
	// WAL written after the slot: retained until a reader confirms it.
	_, err := pool.Exec(ctx, `CREATE TABLE filler AS SELECT i, repeat('x', 200) AS pad FROM generate_series(1, 20000) i`)
	require.NoError(t, err)

	r := dimmer(t, nil, "cdc", "status", "--db", url)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Regexp(t, `SLOT\s+PURPOSE\s+PUBLICATION\s+READER\s+CONFIRMED\s+LAG\s+RETAINED\s+WAL`, r.stdout)
	assert.Regexp(t, slot+`\s+relay\s+`+slot+`\s+-\s+\S+\s+\S+B\s+\S+B\s+(reserved|extended)`, r.stdout)

	assert.NotContains(t, r.stdout, "FENCE")
	_, err = cdc.InstallFence(ctx, pool, cdc.FenceConfig{Migration: "orders_v2"})
	require.NoError(t, err)
	r = dimmer(t, nil, "cdc", "status", "--db", url)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Regexp(t, `FENCE\s+OLD SIDE\s+SINCE\s+orders_v2\s+written\s+\d{4}-`, r.stdout)

	r = dimmer(t, nil, "cdc", "status", "--db", url, "--max-retained", "1024")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, slot+" retains")
	assert.Contains(t, r.stderr, "not connected")

	r = dimmer(t, nil, "cdc", "drop", "no_such_slot", "--db", url)
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "no_such_slot is not registered")

	r = dimmer(t, nil, "cdc", "drop", slot, "--db", url)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, slot+": dropped\n", r.stdout)
	dropped = true
	var n int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&n))
	assert.Zero(t, n)
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM pg_publication WHERE pubname = $1`, slot).Scan(&n))
	assert.Zero(t, n)

	r = dimmer(t, nil, "cdc", "status")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "no database")
}
