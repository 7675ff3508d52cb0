package backfill_test

import (
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A big table stored in its key order (each block holds neighbouring keys)
// is planned from a sample of blocks: the ranges hold about equal row
// counts, not a few blocks' worth of guesses.
func TestPlanSplitsBigTableEvenly(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id) SELECT generate_series(1, 300000)`)
	exec(t, e.pool, `ANALYZE old_orders`)
	j := ordersJob("plan")
	j.Config.Ranges = 10
	p, err := e.bf.DryRun(tctx(t), j)
	require.NoError(t, err)
	require.Len(t, p.Ranges, 10)
	prev := int64(0)
	for i, r := range p.Ranges {
		hi, err := strconv.ParseInt(r.Hi[0], 10, 64)
		require.NoError(t, err)
		assert.InDelta(t, 30000, hi-prev, 12000, "range %d holds %d rows", i, hi-prev)
		prev = hi
	}
	assert.Equal(t, int64(300000), prev, "the last range ends at the upper bound")
}
