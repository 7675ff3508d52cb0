package expandcontract

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Column is a column of the new shape: its name, SQL type and the SQL
// expression over the old row's columns that fills it.
type Column struct {
	Name, Type, Expr string
}

// The helpers below build the plans of the common changes. Each returns a
// plan linked to the dimmer migration named like the plan (change
// Migration if yours is named otherwise), with a backfill, and its
// [Transform]. The helpers only change the schema and say how rows are
// copied; the service's reads and writes go through packages dualwrite and
// shadowread under the migration's stage, and the backfill runs the
// transform. Every step is idempotent or transactional, so an interrupted
// phase resumes.

// RenameColumn renames table.from to table.to (of SQL type typ) without a
// moment where either build misses its column: expand adds to (and lets
// from be NULL, since builds stop writing it once the migration is
// complete), the backfill copies from into to, contract drops from. The new
// column is nullable; make it NOT NULL afterwards with [AddNotNull]. The
// same holds for [ChangeType] and [SplitColumn]. A rollback drops the new
// columns but does not restore NOT NULL on the old ones.
func RenameColumn(plan, table, key, from, to, typ string) (Plan, error) {
	return replaceColumns(plan, table, key, []string{from}, []Column{{Name: to, Type: typ, Expr: quoteCol(from)}})
}

// ChangeType moves table.column to newColumn of type newType, filled by
// using (an expression over the old columns; empty: column::newType).
// The new column keeps its new name: renaming it back would be another plan,
// since a rename in place breaks the builds that read it.
func ChangeType(plan, table, key, column, newColumn, newType, using string) (Plan, error) {
	if using == "" && column != "" && newType != "" {
		using = quoteCol(column) + "::" + newType
	}
	return replaceColumns(plan, table, key, []string{column}, []Column{{Name: newColumn, Type: newType, Expr: using}})
}

// SplitColumn replaces table.column by the parts, each filled by its
// expression over the old columns (e.g. split_part(full_name, ' ', 1)).
func SplitColumn(plan, table, key, column string, parts ...Column) (Plan, error) {
	if len(parts) < 2 {
		return Plan{}, fmt.Errorf("%w %q: SplitColumn needs at least two parts, got %d", ErrInvalidPlan, plan, len(parts))
	}
	return replaceColumns(plan, table, key, []string{column}, parts)
}

func replaceColumns(plan, table, key string, old []string, cols []Column) (Plan, error) {
	if err := need(plan, map[string]string{"table": table, "key": key}); err != nil {
		return Plan{}, err
	}
	var errs []error
	for _, o := range old {
		if o == "" {
			errs = append(errs, errors.New("the old column name is empty"))
		}
	}
	for i, c := range cols {
		if c.Name == "" || c.Type == "" || strings.TrimSpace(c.Expr) == "" {
			errs = append(errs, fmt.Errorf("new column %d (%q): name, type and expression are all required", i+1, c.Name))
		}
	}
	if len(errs) > 0 {
		return Plan{}, fmt.Errorf("%w %q: %w", ErrInvalidPlan, plan, errors.Join(errs...))
	}
	t := ident(table)
	p := Plan{Name: plan, Migration: plan, Backfill: true, Transform: &Transform{Source: table, Key: key}}
	var adds, drops, undo []string
	for _, c := range cols {
		adds = append(adds, fmt.Sprintf("ADD COLUMN IF NOT EXISTS %s %s", quoteCol(c.Name), c.Type))
		undo = append(undo, "DROP COLUMN IF EXISTS "+quoteCol(c.Name))
		p.Transform.Set = append(p.Transform.Set, Assignment{Column: c.Name, Expr: c.Expr})
	}
	for _, o := range old {
		drops = append(drops, "DROP COLUMN IF EXISTS "+quoteCol(o))
		// Once the migration is complete the builds stop writing the old
		// column, before contract drops it: it must accept rows without it.
		adds = append(adds, fmt.Sprintf("ALTER COLUMN %s DROP NOT NULL", quoteCol(o)))
	}
	// Adding a nullable column without a volatile default and dropping a
	// column only touch the catalog: the AccessExclusive lock is brief.
	p.Expand = []Step{{Name: "add-columns", SQL: fmt.Sprintf("ALTER TABLE %s %s", t, strings.Join(adds, ", "))}}
	p.Contract = []Step{{Name: "drop-old-columns", SQL: fmt.Sprintf("ALTER TABLE %s %s", t, strings.Join(drops, ", "))}}
	p.Rollback = []Step{{Name: "drop-new-columns", SQL: fmt.Sprintf("ALTER TABLE %s %s", t, strings.Join(undo, ", "))}}
	p.Description = fmt.Sprintf("%s: replace %s by %s", table, strings.Join(old, ", "), colNames(cols))
	return p, p.Validate()
}

// AddNotNull makes table.column NOT NULL, with def (an SQL expression) for
// the rows that have none. Expand sets def as the column default, so rows
// inserted by any build from now on have a value; the backfill fills the
// existing NULLs; contract adds a NOT VALID check constraint (brief lock),
// validates it (a scan that does not block writes), then sets NOT NULL,
// which the valid constraint lets Postgres do without a second scan, and
// drops the constraint. Old builds that insert an explicit NULL keep working
// until contract; that is why the constraint waits for it.
func AddNotNull(plan, table, key, column, def string) (Plan, error) {
	if err := need(plan, map[string]string{"table": table, "key": key, "column": column, "default": def}); err != nil {
		return Plan{}, err
	}
	t, c := ident(table), quoteCol(column)
	base := table
	if i := strings.LastIndexByte(base, '.'); i >= 0 {
		base = base[i+1:]
	}
	cons := truncateName(base + "_" + column + "_not_null")
	qc := quoteCol(cons)
	p := Plan{
		Name: plan, Migration: plan, Backfill: true,
		Description: fmt.Sprintf("%s.%s: NOT NULL, default %s", table, column, def),
		Expand:      []Step{{Name: "set-default", SQL: fmt.Sprintf("ALTER TABLE %s ALTER COLUMN %s SET DEFAULT %s", t, c, def)}},
		Contract: []Step{
			{Name: "add-check-not-valid", SQL: fmt.Sprintf("ALTER TABLE %s DROP CONSTRAINT IF EXISTS %s, ADD CONSTRAINT %s CHECK (%s IS NOT NULL) NOT VALID", t, qc, qc, c)},
			{Name: "validate-check", SQL: fmt.Sprintf("ALTER TABLE %s VALIDATE CONSTRAINT %s", t, qc)},
			{Name: "set-not-null", SQL: fmt.Sprintf("ALTER TABLE %s ALTER COLUMN %s SET NOT NULL; ALTER TABLE %s DROP CONSTRAINT IF EXISTS %s", t, c, t, qc)},
		},
		Rollback:  []Step{{Name: "drop-default", SQL: fmt.Sprintf("ALTER TABLE %s ALTER COLUMN %s DROP DEFAULT", t, c)}},
		Transform: &Transform{Source: table, Key: key, Set: []Assignment{{Column: column, Expr: fmt.Sprintf("coalesce(%s, %s)", c, def)}}},
	}
	return p, p.Validate()
}

// ExtractTable moves columns of table into newTable, one row per row of
// table: newTable's primary key newKey (of type keyType) references
// table.key. Each column's Expr says how it is filled from the old row
// (usually the old column itself). Contract drops the moved columns from
// table; rollback drops newTable.
func ExtractTable(plan, table, key, newTable, newKey, keyType string, cols ...Column) (Plan, error) {
	if err := need(plan, map[string]string{"table": table, "key": key, "new table": newTable, "new key": newKey, "key type": keyType}); err != nil {
		return Plan{}, err
	}
	if len(cols) == 0 {
		return Plan{}, fmt.Errorf("%w %q: ExtractTable needs at least one column", ErrInvalidPlan, plan)
	}
	defs := []string{fmt.Sprintf("%s %s PRIMARY KEY REFERENCES %s (%s) ON DELETE CASCADE", quoteCol(newKey), keyType, ident(table), quoteCol(key))}
	var drops []string
	tr := &Transform{Source: table, Key: key, Target: newTable, TargetKey: newKey}
	for i, c := range cols {
		if c.Name == "" || c.Type == "" || strings.TrimSpace(c.Expr) == "" {
			return Plan{}, fmt.Errorf("%w %q: column %d (%q): name, type and expression are all required", ErrInvalidPlan, plan, i+1, c.Name)
		}
		defs = append(defs, quoteCol(c.Name)+" "+c.Type)
		drops = append(drops, "DROP COLUMN IF EXISTS "+quoteCol(c.Name))
		tr.Set = append(tr.Set, Assignment{Column: c.Name, Expr: c.Expr})
	}
	p := Plan{
		Name: plan, Migration: plan, Backfill: true,
		Description: fmt.Sprintf("move %s of %s into %s", colNames(cols), table, newTable),
		Expand:      []Step{{Name: "create-table", SQL: fmt.Sprintf("CREATE TABLE IF NOT EXISTS %s (%s)", ident(newTable), strings.Join(defs, ", "))}},
		Contract:    []Step{{Name: "drop-moved-columns", SQL: fmt.Sprintf("ALTER TABLE %s %s", ident(table), strings.Join(drops, ", "))}},
		Rollback:    []Step{{Name: "drop-table", SQL: "DROP TABLE IF EXISTS " + ident(newTable)}},
		Transform:   tr,
	}
	return p, p.Validate()
}

func need(plan string, fields map[string]string) error {
	var missing []string
	for _, k := range []string{"table", "key", "column", "default", "new table", "new key", "key type"} {
		if v, ok := fields[k]; ok && strings.TrimSpace(v) == "" {
			missing = append(missing, k)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w %q: empty %s", ErrInvalidPlan, plan, strings.Join(missing, ", "))
	}
	return nil
}

// MaxNameBytes is Postgres's limit on an identifier (NAMEDATALEN-1 bytes);
// a longer name is cut by the server.
const MaxNameBytes = 63

// truncateName cuts a generated name to [MaxNameBytes] on a character
// boundary, as the server itself would cut it: a name cut inside a UTF-8
// sequence would not survive the registry's JSON round trip, and the stored
// plan would no longer equal the code's.
func truncateName(name string) string {
	if len(name) <= MaxNameBytes {
		return name
	}
	cut := MaxNameBytes
	for cut > 0 && !utf8.RuneStart(name[cut]) {
		cut--
	}
	return name[:cut]
}

// quoteCol quotes one column name (never schema-qualified).
func quoteCol(name string) string { return `"` + strings.ReplaceAll(name, `"`, `""`) + `"` }

func colNames(cols []Column) string {
	n := make([]string, len(cols))
	for i, c := range cols {
		n[i] = c.Name
	}
	return strings.Join(n, ", ")
}
