package backfill_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
)

// Tables installed by version 1 (no per-range estimate) are upgraded in
// place, their jobs resumable; newer tables are refused.
func TestInstallUpgradesAndRefusesNewer(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id) SELECT generate_series(1, 300)`)
	j := ordersJob("upgraded")
	j.Config.Ranges = 3
	j.Config.InitialChunk, j.Config.MinChunk, j.Config.MaxChunk = 50, 50, 50
	exec(t, e.pool, `ALTER TABLE backfill_ranges DROP COLUMN est_rows; UPDATE backfill_meta SET version = 1`)
	require.NoError(t, e.bf.Install(tctx(t)))
	assert.Equal(t, int64(backfill.SchemaVersion), count(t, e.pool, `SELECT version FROM backfill_meta`))
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Equal(t, int64(300), res.Rows)
	assert.Zero(t, e.diff(t))

	exec(t, e.pool, `UPDATE backfill_meta SET version = $1`, backfill.SchemaVersion+1)
	require.ErrorIs(t, e.bf.Install(tctx(t)), backfill.ErrSchemaMismatch)
}
