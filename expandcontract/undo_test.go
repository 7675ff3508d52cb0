package expandcontract_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
)

// TestRollbackOfAnExpandThatCannotSucceed: a unique index over duplicate
// values fails on every run and leaves an invalid index. The expand cannot
// finish, so it is rolled back: refused while a build needs the new shape
// (and left interrupted, as found), then done, dropping the invalid index the
// plan's own rollback steps do not know about, audited. A corrected plan is
// accepted and expands.
func TestRollbackOfAnExpandThatCannotSucceed(t *testing.T) {
	t.Parallel()
	e := newEnvDB(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE members (id int PRIMARY KEY, email text)`)
	e.exec(t, `INSERT INTO members SELECT g, 'm' || (g % 50) || '@example.com' FROM generate_series(1, 200) g`)
	reg := e.registry(t)
	plan := expandcontract.Plan{Name: "members-email-unique",
		Expand: []expandcontract.Step{
			{Name: "add-verified", SQL: `ALTER TABLE members ADD COLUMN IF NOT EXISTS verified bool`},
			{Name: "unique-email", Concurrently: true, SQL: `CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS idx_émail ON members (email)`},
		},
		Contract: []expandcontract.Step{{Name: "noop", SQL: `SELECT 1`}},
		Rollback: []expandcontract.Step{{Name: "drop-verified", SQL: `ALTER TABLE members DROP COLUMN IF EXISTS verified`}}}
	require.NoError(t, reg.Register(ctx, "deploy", plan))
	oldBuild := expandcontract.Range{Plan: plan.Name, Min: expandcontract.Pending, Max: expandcontract.Migrating}
	newBuild := expandcontract.Range{Plan: plan.Name, Min: expandcontract.Expanded, Max: expandcontract.Contracted}
	e.heartbeat(t, "api-old", "v1", oldBuild)

	for range 2 {
		_, err := reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
		var se *expandcontract.StepError
		require.ErrorAs(t, err, &se)
		assert.Equal(t, "unique-email", se.Step)
		assert.ErrorContains(t, err, "could not create unique index")
		assert.Regexp(t, `DETAIL: Key \(email\)=\(m\d+@example\.com\) is duplicated`, err.Error(), "the server says which key")
		exists, valid := indexValid(t, e.pool, "idx_émail")
		require.True(t, exists)
		require.False(t, valid, "the failed build leaves an invalid index")
	}
	st, err := reg.Status(ctx, plan.Name)
	require.NoError(t, err)
	assert.Equal(t, expandcontract.PhaseExpand, st.Running)
	_, err = reg.Migrate(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	assert.ErrorContains(t, err, "run expand again to finish it, or rollback to undo it")

	// A build that needs the new shape holds the rollback back; the expand
	// stays interrupted.
	stopNew := e.heartbeat(t, "api-new", "v2", newBuild)
	_, err = reg.Rollback(ctx, plan.Name, expandcontract.Request{Actor: "ops", Reason: "duplicates"})
	requireRefused(t, err, expandcontract.CheckNewShapeUnused)
	st, err = reg.Status(ctx, plan.Name)
	require.NoError(t, err)
	assert.Equal(t, expandcontract.PhaseExpand, st.Running)
	stopNew()

	st, err = reg.Rollback(ctx, plan.Name, expandcontract.Request{Actor: "ops", Reason: "duplicates"})
	require.NoError(t, err)
	assert.Equal(t, expandcontract.RolledBack, st.Stage)
	assert.Empty(t, st.Running)
	exists, _ := indexValid(t, e.pool, "idx_émail")
	assert.False(t, exists, "the invalid index is dropped")
	assert.Equal(t, []string{"id", "email"}, e.columns(t, "members"))
	audit, err := reg.Audit(ctx, plan.Name, 1)
	require.NoError(t, err)
	require.Len(t, audit, 1)
	assert.Equal(t, "rollback", audit[0].Action)
	assert.Equal(t, expandcontract.OutcomeApplied, audit[0].Outcome)
	assert.Equal(t, "ops", audit[0].Actor)
	assert.Contains(t, audit[0].Detail, `invalid index "idx_émail" of step unique-email`)

	// The corrected plan: duplicates allowed, the rollback drops the index too.
	fixed := plan
	fixed.Expand = []expandcontract.Step{plan.Expand[0],
		{Name: "index-email", Concurrently: true, SQL: `CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_émail ON members (email)`}}
	fixed.Rollback = append([]expandcontract.Step{{Name: "drop-index", Concurrently: true, SQL: `DROP INDEX CONCURRENTLY IF EXISTS idx_émail`}}, plan.Rollback...)
	require.NoError(t, reg.Register(ctx, "deploy", fixed))
	st, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	require.NoError(t, err)
	assert.Equal(t, expandcontract.Expanded, st.Stage)
	exists, valid := indexValid(t, e.pool, "idx_émail")
	assert.True(t, exists && valid)
}
