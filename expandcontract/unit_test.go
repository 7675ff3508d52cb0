package expandcontract_test

import (
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/expandcontract"
)

func fmtInt(n int64) string { return strconv.FormatInt(n, 10) }

func TestRangesRoundTripThroughAttributes(t *testing.T) {
	t.Parallel()
	old := expandcontract.Range{Plan: "a", Min: expandcontract.Pending, Max: expandcontract.Migrating}
	nw := expandcontract.Range{Plan: "b.c", Min: expandcontract.Expanded, Max: expandcontract.Contracted}
	attrs := expandcontract.Attributes(old, nw)()
	assert.Equal(t, map[string]string{"dimmer.schema/a": "pending..migrating", "dimmer.schema/b.c": "expanded..contracted"}, attrs)
	attrs["watchdog/x"] = "unrelated"
	got, err := expandcontract.RangesFromAttributes(attrs)
	require.NoError(t, err)
	assert.Equal(t, map[string]expandcontract.Range{"a": old, "b.c": nw}, got)

	attrs["dimmer.schema/bad"] = "contracted..pending"
	got, err = expandcontract.RangesFromAttributes(attrs)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "min is after max")
	assert.Len(t, got, 2, "the readable ranges are still returned")

	assert.True(t, old.Contains(expandcontract.RolledBack), "rolled back has the pending shape")
	assert.False(t, old.Contains(expandcontract.Contracted))
	_, err = expandcontract.ParseRange("a", "expanded")
	assert.ErrorContains(t, err, "want MIN..MAX")
	_, err = expandcontract.ParseRange("a", "expanded..done")
	assert.ErrorIs(t, err, expandcontract.ErrUnknownStage)
	st, err := expandcontract.ParseStage("rolled_back")
	require.NoError(t, err)
	assert.Equal(t, "rolled back", st.String())
	assert.Panics(t, func() {
		expandcontract.Attributes(expandcontract.Range{Plan: "x", Min: expandcontract.RolledBack, Max: expandcontract.RolledBack})
	})
}

func TestBadInputNamesWhatIsWrong(t *testing.T) {
	t.Parallel()
	err := expandcontract.Plan{Name: "Bad Name", Expand: []expandcontract.Step{{Name: "a", SQL: ""}, {Name: "a", SQL: "SELECT 1"}}, Backfill: true}.Validate()
	require.ErrorIs(t, err, expandcontract.ErrInvalidPlan)
	for _, want := range []string{"Name:", "expand step 1 (a): SQL is empty", `Name "a" is used twice`, "Backfill is set but Migration is empty"} {
		assert.Contains(t, err.Error(), want)
	}
	_, err = expandcontract.RenameColumn("p", "", "id", "a", "b", "text")
	assert.ErrorContains(t, err, "empty table")
	_, err = expandcontract.SplitColumn("p", "t", "id", "a", expandcontract.Column{Name: "x", Type: "text", Expr: "a"})
	assert.ErrorContains(t, err, "at least two parts")
	_, err = expandcontract.ExtractTable("p", "t", "id", "t2", "t_id", "bigint", expandcontract.Column{Name: "x", Expr: "x"})
	assert.ErrorContains(t, err, "name, type and expression are all required")
	_, err = expandcontract.AddNotNull("p", "t", "id", "c", "")
	assert.ErrorContains(t, err, "empty default")
	err = expandcontract.Plan{Name: "p", Expand: []expandcontract.Step{{Name: "ix", Concurrently: true,
		SQL: "CREATE INDEX CONCURRENTLY ON t (c)"}}}.Validate()
	assert.ErrorContains(t, err, "the index this concurrent step builds has no name")
	require.NoError(t, expandcontract.Plan{Name: "p", Expand: []expandcontract.Step{{Name: "ix", Concurrently: true,
		SQL: `CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS idx_émail ON "app"."t" (c)`}}}.Validate())
	_, err = expandcontract.NewRegistry(nil)
	assert.ErrorContains(t, err, "pool is nil")
}

func TestTransformSQL(t *testing.T) {
	t.Parallel()
	p, err := expandcontract.RenameColumn("p", "app.users", "id", "fullname", "display_name", "text")
	require.NoError(t, err)
	assert.Equal(t, `ALTER TABLE "app"."users" ADD COLUMN IF NOT EXISTS "display_name" text, ALTER COLUMN "fullname" DROP NOT NULL`, p.Expand[0].SQL)
	assert.Equal(t, `UPDATE "app"."users" SET "display_name" = ("fullname") WHERE "id" > $1 AND "id" <= $2 AND ("display_name" IS DISTINCT FROM ("fullname"))`, p.Transform.ChunkSQL())
	assert.Equal(t, `ALTER TABLE "app"."users" DROP COLUMN IF EXISTS "fullname"`, p.Contract[0].SQL)
}
