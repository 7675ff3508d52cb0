package expandcontract_test

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
)

// TestHelpersWithLongUnicodeNames builds a plan with every helper over
// tables and columns whose names are longer than Postgres's 63-byte limit
// and made of multi-byte characters, and drives each through register,
// expand, the transform and contract. Every generated name stays valid
// UTF-8, so the stored definition equals the code's and registering it again
// (as every restarting instance does) is accepted.
func TestHelpersWithLongUnicodeNames(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	reg := e.registry(t)
	// 2-byte and 3-byte characters, so a cut at byte 63 falls inside one.
	long := func(prefix string) string { return prefix + strings.Repeat("é", 25) + strings.Repeat("名", 5) }
	tbl, key, col := long("tä_"), "ключ", long("spälte_")
	require.Greater(t, len(tbl), expandcontract.MaxNameBytes)

	type helper struct {
		name string
		plan func(plan, table string) (expandcontract.Plan, error)
		// gone and added are the columns contract removes and expand adds
		// (names as the server keeps them, cut at 63 bytes).
		gone, added string
	}
	newCol := long("neu_")
	helpers := []helper{
		{"rename", func(p, tb string) (expandcontract.Plan, error) {
			return expandcontract.RenameColumn(p, tb, key, col, newCol, "text")
		}, col, newCol},
		{"change-type", func(p, tb string) (expandcontract.Plan, error) {
			return expandcontract.ChangeType(p, tb, key, col, newCol, "varchar(200)", "")
		}, col, newCol},
		{"split", func(p, tb string) (expandcontract.Plan, error) {
			return expandcontract.SplitColumn(p, tb, key, col,
				expandcontract.Column{Name: newCol, Type: "text", Expr: `split_part("` + col + `", ' ', 1)`},
				expandcontract.Column{Name: long("zweite_"), Type: "text", Expr: `split_part("` + col + `", ' ', 2)`})
		}, col, newCol},
		{"not-null", func(p, tb string) (expandcontract.Plan, error) {
			return expandcontract.AddNotNull(p, tb, key, col, "'leer'")
		}, "", ""},
		{"extract", func(p, tb string) (expandcontract.Plan, error) {
			return expandcontract.ExtractTable(p, tb, key, long("ausgelagert_"+p+"_"), long("ref_"), "bigint",
				expandcontract.Column{Name: col, Type: "text", Expr: `"` + col + `"`})
		}, col, ""},
	}
	for _, h := range helpers {
		t.Run(h.name, func(t *testing.T) {
			table := long(h.name+"_") + "_" + tbl
			e.exec(t, `CREATE TABLE "`+table+`" ("`+key+`" bigint PRIMARY KEY, "`+col+`" text)`)
			e.exec(t, `INSERT INTO "`+table+`" SELECT g, CASE WHEN g % 4 = 0 THEN NULL ELSE 'a b' || g END FROM generate_series(1, 50) g`)
			plan, err := h.plan("unicode-"+h.name, table)
			require.NoError(t, err)
			for _, ph := range []string{expandcontract.PhaseExpand, expandcontract.PhaseContract, expandcontract.PhaseRollback} {
				for _, s := range plan.Steps(ph) {
					assert.True(t, utf8.ValidString(s.SQL), "%s step %s: invalid UTF-8 in %q", ph, s.Name, s.SQL)
				}
			}
			require.NoError(t, reg.Register(ctx, "deploy", plan))
			stored, err := reg.Plan(ctx, plan.Name)
			require.NoError(t, err)
			assert.Equal(t, plan, stored, "the stored definition is the code's")

			_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
			require.NoError(t, err)
			require.NoError(t, reg.Register(ctx, "restart", plan), "a restarting instance registers the same plan again")
			_, err = reg.Migrate(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
			require.NoError(t, err)
			_, err = plan.Transform.Apply(ctx, e.pool, 0, 1000)
			require.NoError(t, err)
			n, err := plan.Transform.Pending(ctx, e.pool)
			require.NoError(t, err)
			assert.Zero(t, n)
			st, err := reg.Contract(ctx, plan.Name, expandcontract.Request{Actor: "ops", Force: true, Reason: "no fleet in this test"})
			require.NoError(t, err)
			assert.Equal(t, expandcontract.Contracted, st.Stage)

			cols := e.columns(t, truncate(table))
			if h.gone != "" {
				assert.NotContains(t, cols, truncate(h.gone))
			}
			if h.added != "" {
				assert.Contains(t, cols, truncate(h.added))
			}
			if h.name == "not-null" {
				var nullable string
				require.NoError(t, e.pool.QueryRow(ctx, `SELECT is_nullable FROM information_schema.columns
WHERE table_schema = $1 AND table_name = $2 AND column_name = $3`, e.schema, truncate(table), truncate(col)).Scan(&nullable))
				assert.Equal(t, "NO", nullable)
				var cons int
				require.NoError(t, e.pool.QueryRow(ctx, `SELECT count(*) FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'c'`,
					`"`+table+`"`).Scan(&cons))
				assert.Zero(t, cons, "the helper's check constraint is dropped after SET NOT NULL")
			}
		})
	}
}

// truncate is how the server cuts an identifier: at 63 bytes, on a
// character boundary.
func truncate(s string) string {
	for len(s) > expandcontract.MaxNameBytes {
		_, size := utf8.DecodeLastRuneInString(s)
		s = s[:len(s)-size]
	}
	return s
}
