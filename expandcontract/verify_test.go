package expandcontract_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
)

// TestContractAcceptsDataMovedByTheTransform: a plan whose rows were copied
// with its own Transform (no backfill job, no verifier configured) passes
// the backfill-verified check once a verification since the expand counted
// no pending row at the migration's current epoch, and contracts without
// force. A verification that found rows, or one from before the migration
// went back to off, does not count.
func TestContractAcceptsDataMovedByTheTransform(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE books (id bigint PRIMARY KEY, writer text)`)
	e.exec(t, `INSERT INTO books SELECT g, 'w' || g FROM generate_series(1, 300) g`)
	plan, err := expandcontract.RenameColumn("books-author", "books", "id", "writer", "author", "text")
	require.NoError(t, err)
	reg := e.registry(t) // no verifier: only the transform path can pass
	require.NoError(t, reg.Register(ctx, "deploy", plan))
	e.heartbeat(t, "api-new", "v2", expandcontract.Range{Plan: plan.Name, Min: expandcontract.Expanded, Max: expandcontract.Contracted})
	backfillCheck := func() flags.CheckResult {
		t.Helper()
		checks, err := reg.ContractChecks(ctx, plan.Name)
		require.NoError(t, err)
		for _, c := range checks {
			if c.Name == expandcontract.CheckBackfillVerified {
				return c
			}
		}
		t.Fatal("no backfill-verified check")
		return flags.CheckResult{}
	}

	_, err = reg.VerifyTransform(ctx, plan.Name, expandcontract.Request{Actor: "ops"})
	require.ErrorIs(t, err, expandcontract.ErrWrongStage, "nothing to verify before migrating")
	_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	require.NoError(t, err)
	_, err = reg.Migrate(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	require.NoError(t, err)
	flagstest.Set(t, e.flags, plan.Migration, flags.DualWrite, nil)
	c := backfillCheck()
	assert.False(t, c.Passed)
	assert.Contains(t, c.Detail, "its transform was not verified since the expand")

	_, err = plan.Transform.Apply(ctx, e.pool, 0, 200)
	require.NoError(t, err)
	v, err := reg.VerifyTransform(ctx, plan.Name, expandcontract.Request{Actor: "ops"})
	require.NoError(t, err)
	assert.EqualValues(t, 100, v.Pending)
	c = backfillCheck()
	assert.False(t, c.Passed)
	assert.Contains(t, c.Detail, "found 100 row(s) not filled")

	_, err = plan.Transform.Apply(ctx, e.pool, 200, 300)
	require.NoError(t, err)
	v, err = reg.VerifyTransform(ctx, plan.Name, expandcontract.Request{Actor: "ops"})
	require.NoError(t, err)
	assert.Zero(t, v.Pending)
	assert.Equal(t, "dualwrite", v.MigrationStage)
	c = backfillCheck()
	assert.True(t, c.Passed, c.Detail)
	assert.Contains(t, c.Detail, "transform verified")

	// Back to off (as the controller records it, with a new epoch): the new
	// column is stale, the verification with it.
	cur, err := e.flags.Load(ctx, plan.Migration)
	require.NoError(t, err)
	next := cur
	next.Stage, next.Epoch = flags.Off, cur.Epoch+1
	_, err = e.flags.Swap(ctx, cur.Revision, next, flagstest.Entry(plan.Migration, cur.Stage, flags.Off, "ops"))
	require.NoError(t, err)
	flagstest.Set(t, e.flags, plan.Migration, flags.DualWrite, nil)
	c = backfillCheck()
	assert.False(t, c.Passed)
	assert.Contains(t, c.Detail, "it went back to off since")
	v, err = reg.VerifyTransform(ctx, plan.Name, expandcontract.Request{Actor: "ops"})
	require.NoError(t, err)
	require.Zero(t, v.Pending)

	completeMigration(t, e, plan.Migration)
	st, err := reg.Contract(ctx, plan.Name, expandcontract.Request{Actor: "ops"})
	require.NoError(t, err, "no force needed")
	assert.Equal(t, expandcontract.Contracted, st.Stage)
	audit, err := reg.Audit(ctx, plan.Name, 1)
	require.NoError(t, err)
	require.Len(t, audit, 1)
	assert.False(t, audit[0].Forced)
	for _, ch := range audit[0].Checks {
		assert.True(t, ch.Passed, "%s: %s", ch.Name, ch.Detail)
	}
}
