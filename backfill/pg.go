package backfill

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
)

// querier is what the SQL helpers need: a pool, a connection or a tx.
type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func ident(s string) string { return pgx.Identifier{s}.Sanitize() }

// columnTypes returns the table's columns and their SQL types, in order.
func columnTypes(ctx context.Context, q querier, t Table) ([]string, map[string]string, error) {
	rows, err := q.Query(ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum`, t.sql())
	if err != nil {
		return nil, nil, fmt.Errorf("backfill: read columns of %s: %w", t, err)
	}
	defer rows.Close()
	var names []string
	types := map[string]string{}
	for rows.Next() {
		var n, ty string
		if err := rows.Scan(&n, &ty); err != nil {
			return nil, nil, err
		}
		names = append(names, n)
		types[n] = ty
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("backfill: read columns of %s: %w", t, err)
	}
	if len(names) == 0 {
		return nil, nil, fieldErr("table", "%s does not exist (or has no columns)", t)
	}
	return names, types, nil
}

// shape is a job resolved against the catalog: the SQL it runs.
type shape struct {
	spec     Spec
	keyTypes []string
	cols     []string // target columns written
	selects  string   // source select list producing target-named columns
	keyList  string   // "k1", "k2"
	keyDesc  string   // "k1" DESC, "k2" DESC
	cursor   string   // ARRAY["k1"::text, ...]
}

func resolve(ctx context.Context, src querier, j *Job) (*shape, error) {
	s := j.Spec
	srcCols, srcTypes, err := columnTypes(ctx, src, s.Source)
	if err != nil {
		return nil, fmt.Errorf("%w (Spec.Source)", err)
	}
	sh := &shape{spec: s}
	for _, k := range s.Key {
		ty, ok := srcTypes[k]
		if !ok {
			return nil, fieldErr("Spec.Key", "column %q is not in %s (columns: %s)", k, s.Source, strings.Join(srcCols, ", "))
		}
		sh.keyTypes = append(sh.keyTypes, ty)
	}
	if _, ok := srcTypes[s.VersionColumn]; !ok && s.Exprs[s.VersionColumn] == "" {
		return nil, fieldErr("Spec.VersionColumn", "column %q is not in %s and has no entry in Exprs (columns: %s)", s.VersionColumn, s.Source, strings.Join(srcCols, ", "))
	}
	sh.cols = s.Columns
	if len(sh.cols) == 0 {
		sh.cols = srcCols
		for _, c := range slices.Sorted(maps.Keys(s.Exprs)) {
			if !slices.Contains(sh.cols, c) {
				sh.cols = append(sh.cols, c)
			}
		}
	}
	for _, need := range append(slices.Clone(s.Key), s.VersionColumn) {
		if !slices.Contains(sh.cols, need) {
			return nil, fieldErr("Spec.Columns", "must include %q (key and version columns are written)", need)
		}
	}
	var sel []string
	for _, c := range sh.cols {
		if e, ok := s.Exprs[c]; ok {
			sel = append(sel, "("+e+") AS "+ident(c))
			continue
		}
		if _, ok := srcTypes[c]; !ok {
			return nil, fieldErr("Spec.Columns", "column %q is not in %s and has no entry in Exprs", c, s.Source)
		}
		sel = append(sel, ident(c))
	}
	sh.selects = strings.Join(sel, ", ")
	var kl, kd, kc []string
	for _, k := range s.Key {
		kl = append(kl, ident(k))
		kd = append(kd, ident(k)+" DESC")
		kc = append(kc, ident(k)+"::text")
	}
	sh.keyList, sh.keyDesc, sh.cursor = strings.Join(kl, ", "), strings.Join(kd, ", "), "ARRAY["+strings.Join(kc, ", ")+"]"
	return sh, nil
}

// bound renders "(keys) op (params)" for a key tuple given as text, cast back
// to the key types, appending the values to args.
func (sh *shape) bound(op string, key []string, args *[]any, prefix string) string {
	var ps []string
	for i, v := range key {
		*args = append(*args, v)
		ps = append(ps, fmt.Sprintf("$%d::%s", len(*args), sh.keyTypes[i]))
	}
	if len(key) == 1 {
		return prefix + ident(sh.spec.Key[0]) + " " + op + " " + ps[0]
	}
	var cols []string
	for _, k := range sh.spec.Key {
		cols = append(cols, prefix+ident(k))
	}
	return "(" + strings.Join(cols, ", ") + ") " + op + " (" + strings.Join(ps, ", ") + ")"
}

// where renders lo < key <= hi (a nil bound is open).
func (sh *shape) where(lo, hi []string, args *[]any, prefix string) string {
	var conds []string
	if lo != nil {
		conds = append(conds, sh.bound(">", lo, args, prefix))
	}
	if hi != nil {
		conds = append(conds, sh.bound("<=", hi, args, prefix))
	}
	if len(conds) == 0 {
		return "true"
	}
	return strings.Join(conds, " AND ")
}

// upsert is the version-guarded conflict clause: a target row with a newer
// version than the incoming one is left alone.
func upsertClause(target string, key, cols []string, version string) string {
	var sets []string
	for _, c := range cols {
		if !slices.Contains(key, c) {
			sets = append(sets, ident(c)+" = EXCLUDED."+ident(c))
		}
	}
	var kl []string
	for _, k := range key {
		kl = append(kl, ident(k))
	}
	v := ident(version)
	return " ON CONFLICT (" + strings.Join(kl, ", ") + ") DO UPDATE SET " + strings.Join(sets, ", ") +
		" WHERE " + target + "." + v + " IS NULL OR " + target + "." + v + " <= EXCLUDED." + v
}

func quoteList(cols []string) string {
	var q []string
	for _, c := range cols {
		q = append(q, ident(c))
	}
	return strings.Join(q, ", ")
}

// boundarySQL finds the key closing a chunk of limit rows after lo (an
// index-only scan, no sort): the chunk is then copied as a plain key range.
// The key is rendered as text outside the OFFSET: inside, every skipped row
// would be rendered too.
func (sh *shape) boundarySQL(lo, hi []string, limit int) (string, []any) {
	var args []any
	w := sh.where(lo, hi, &args, "")
	args = append(args, limit-1)
	return `SELECT ` + sh.cursor + ` FROM (SELECT ` + sh.keyList + ` FROM ` + sh.spec.Source.sql() + ` WHERE ` + w +
		` ORDER BY ` + sh.keyList + fmt.Sprintf(` OFFSET $%d LIMIT 1) b`, len(args)), args
}

// countSQL counts the source rows in (lo, hi].
func (sh *shape) countSQL(lo, hi []string) (string, []any) {
	var args []any
	w := sh.where(lo, hi, &args, "")
	return `SELECT count(*) FROM ` + sh.spec.Source.sql() + ` WHERE ` + w, args
}

// copySQL is the fast path: one statement upserts the source rows of the key
// range (lo, hi] into the target, version-guarded, inside the server.
func (sh *shape) copySQL(lo, hi []string, lockSource bool) (string, []any) {
	return sh.copyKeysSQL(lo, hi, nil, keysAll, lockSource)
}

// fillSQL is an in-place chunk (Target is Source): one UPDATE of the
// columns Spec.Exprs computes over the key range (lo, hi], the other
// columns being the row's own. An upsert of the table into itself
// probes the key index for each row, locks it (a WAL record of its own)
// and only then updates it: about twice an UPDATE's work, all of it done
// while the chunk's earlier rows stay locked against the service's
// writes. The version guard has nothing to compare here: a row the
// service updated after the chunk's snapshot is updated in its newest
// version (READ COMMITTED rereads it after the service commits), so the
// service's write is kept and its computed columns follow it. Empty when
// Exprs writes no column: the upsert then rewrites nothing anyway.
func (sh *shape) fillSQL(lo, hi []string) (string, []any) {
	var sets []string
	for _, c := range sh.cols {
		if e, ok := sh.spec.Exprs[c]; ok {
			sets = append(sets, ident(c)+" = ("+e+")")
		}
	}
	if len(sets) == 0 {
		return "", nil
	}
	var args []any
	src := sh.spec.Source.sql()
	// Unaliased: Exprs may name the table as FROM exposes it.
	return `UPDATE ` + src + ` SET ` + strings.Join(sets, ", ") + ` WHERE ` + sh.where(lo, hi, &args, src+"."), args
}

// keyFilter restricts a chunk's copy to some of its keys.
type keyFilter int

const (
	keysAll   keyFilter = iota
	keysIn              // only the listed keys (they are in the target)
	keysNotIn           // all but the listed keys, by a plain INSERT
)

// copyKeysSQL copies the source rows of (lo, hi]: keysAll and keysIn by the
// version-guarded upsert, keysNotIn by a plain INSERT, which never
// overwrites anything: a row that is in the target after all makes it fail
// with unique_violation.
func (sh *shape) copyKeysSQL(lo, hi []string, keys [][]string, f keyFilter, lockSource bool) (string, []any) {
	var args []any
	src := sh.spec.Source.sql()
	w := sh.where(lo, hi, &args, src+".")
	if f != keysAll && len(keys) > 0 {
		not := ""
		if f == keysNotIn {
			not = "NOT "
		}
		w += " AND " + not + sh.keyIn(keys, &args, src+".")
	}
	lock := ""
	if lockSource {
		// The locking clause names the table as FROM exposes it: unqualified.
		lock = " FOR KEY SHARE OF " + ident(sh.spec.Source.Name)
	}
	cl := quoteList(sh.cols)
	q := `INSERT INTO ` + sh.spec.Target.sql() + ` AS t (` + cl + `) SELECT ` + sh.selects + ` FROM ` + src +
		` WHERE ` + w + lock
	if f != keysNotIn {
		q += upsertClause("t", sh.spec.Key, sh.cols, sh.spec.VersionColumn)
	}
	return q, args
}

// keyIn renders "(keys) IN (the listed keys)", the keys given as text and
// passed as one text array per key column, cast back to the key types.
func (sh *shape) keyIn(keys [][]string, args *[]any, prefix string) string {
	var arrays, names, casts, cols []string
	for i, k := range sh.spec.Key {
		cols = append(cols, prefix+ident(k))
		col := make([]string, len(keys))
		for j, k := range keys {
			col[j] = k[i]
		}
		*args = append(*args, col)
		arrays = append(arrays, fmt.Sprintf("$%d::text[]", len(*args)))
		n := ident(fmt.Sprintf("__dimmer_k%d", i))
		names = append(names, n)
		casts = append(casts, "u."+n+"::"+sh.keyTypes[i])
	}
	return "(" + strings.Join(cols, ", ") + ") IN (SELECT " + strings.Join(casts, ", ") + " FROM unnest(" + strings.Join(arrays, ", ") +
		") AS u(" + strings.Join(names, ", ") + "))"
}

// presentSQL lists up to limit keys of the target in (lo, hi]: the rows a
// chunk must upsert; the others are inserted plainly.
func (sh *shape) presentSQL(lo, hi []string, limit int) (string, []any) {
	var args []any
	w := sh.where(lo, hi, &args, "")
	args = append(args, limit)
	return `SELECT ` + sh.cursor + ` FROM ` + sh.spec.Target.sql() + ` WHERE ` + w + fmt.Sprintf(` LIMIT $%d`, len(args)), args
}

// readSQL reads a chunk for the Go path: target-shaped rows plus the cursor.
func (sh *shape) readSQL(lo, hi []string, limit int) (string, []any) {
	var args []any
	w := sh.where(lo, hi, &args, "")
	args = append(args, limit)
	return `SELECT ` + sh.selects + `, ` + sh.cursor + ` AS "__dimmer_cursor" FROM ` + sh.spec.Source.sql() +
		` WHERE ` + w + ` ORDER BY ` + sh.keyList + fmt.Sprintf(` LIMIT $%d`, len(args)), args
}
