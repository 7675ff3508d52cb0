package backfill

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/jackc/pgx/v5/pgconn"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/flags"
)

// BusinessCheck compares an aggregate the business cares about on both
// sides, because equal rows are not the whole story (a transform can be
// wrong in every row alike). Each query returns rows of (group text,
// value numeric), e.g. per day: order count, revenue total. Groups missing
// on one side count as differing.
type BusinessCheck struct {
	Name      string
	SourceSQL string
	TargetSQL string
	// Tolerance is the absolute difference allowed per group; RelTolerance
	// the difference relative to the larger magnitude. A group passes when
	// it is within either.
	Tolerance, RelTolerance float64
}

// VerifyOptions tune [Backfiller.Verify].
type VerifyOptions struct {
	// ChunkRows per checksum (10,000).
	ChunkRows int
	// Repair recopies differing ranges (and deletes target rows the source
	// does not have) and checks them again.
	Repair bool
	// RecheckDelay: a differing range is checked again after it before it
	// counts, since a dual write may have been in flight (200ms).
	RecheckDelay time.Duration
	Checks       []BusinessCheck
}

// Verification is the outcome of one verify, stored for [VerifiedGuard].
type Verification struct {
	Job, Migration         string
	Epoch                  int64
	OK                     bool
	Chunks                 int64
	Differing, Repaired    int64
	RowsSource, RowsTarget int64
	Ranges                 []RangeDiff    `json:"ranges,omitempty"`
	Checks                 []CheckOutcome `json:"checks,omitempty"`
	Problems               []string       `json:"problems,omitempty"`
	StartedAt, FinishedAt  time.Time
}

// RangeDiff is a key range whose checksums differed.
type RangeDiff struct {
	Lo, Hi                 []string
	SourceRows, TargetRows int64
	Repaired               bool
}

// CheckOutcome is one business check's verdict.
type CheckOutcome struct {
	Name   string
	OK     bool
	Groups int
	Detail string `json:",omitempty"`
}

type sum struct {
	rows int64
	hash string
}

// checksum counts the rows of one side in (lo, hi] and sums a hash of each
// row's compared columns as a JSON array: NULL stays null (not the string
// "null", not empty), and the sum does not depend on row order.
func checksum(ctx context.Context, q querier, table Table, sh *shape, cols []string, lo, hi []string) (sum, error) {
	var args []any
	w := sh.where(lo, hi, &args, "")
	var s sum
	err := q.QueryRow(ctx, `SELECT count(*), coalesce(sum(hashtextextended(jsonb_build_array(`+strings.Join(cols, ", ")+
		`)::text, 0)::numeric), 0)::text FROM `+table.sql()+` WHERE `+w, args...).Scan(&s.rows, &s.hash)
	if err != nil {
		return s, fmt.Errorf("backfill: checksum %s: %w", table, err)
	}
	return s, nil
}

// Verify compares old and new chunk by chunk (row count and a NULL-safe
// hash over the compared columns, both sides), over the whole key space
// including rows added since the copy, then runs the business checks. With
// Repair, differing ranges are recopied and checked again. The result is
// stored at the migration's current epoch, where [VerifiedGuard] reads it.
// Verify needs no prior Run: it verifies a table copied by any means.
func (b *Backfiller) Verify(ctx context.Context, j Job, o VerifyOptions) (Verification, error) {
	r, err := b.open(ctx, &j)
	if err != nil {
		return Verification{}, err
	}
	if r.txPG == nil {
		pg, ok := j.Sink.(*PGSink)
		if !ok {
			return Verification{}, fmt.Errorf("%w: %s writes to %s; only Postgres targets are read back", ErrNotVerifiable, j.Name, j.Sink.Describe())
		}
		r.txPG = pg
		r.sink = nil
	}
	if o.ChunkRows <= 0 {
		o.ChunkRows = 10000
	}
	if o.RecheckDelay <= 0 {
		o.RecheckDelay = 200 * time.Millisecond
	}
	st, err := b.stageOf(ctx, j.Migration)
	if err != nil {
		return Verification{}, err
	}
	v := Verification{Job: j.Name, Migration: j.Migration, Epoch: st.Epoch, StartedAt: time.Now().UTC()}
	var srcCols, tgtCols []string
	for _, c := range r.sh.cols {
		if slices.Contains(j.Spec.VerifyIgnore, c) {
			continue
		}
		tgtCols = append(tgtCols, ident(c))
		if e, ok := j.Spec.Exprs[c]; ok {
			srcCols = append(srcCols, "("+e+")")
		} else {
			srcCols = append(srcCols, ident(c))
		}
	}
	tgtPool := r.txPG.pool
	var lo []string
	for {
		var hi []string
		var args []any
		w := r.sh.where(lo, nil, &args, "")
		args = append(args, o.ChunkRows-1)
		err := r.src.QueryRow(ctx, `SELECT `+r.sh.cursor+` FROM `+j.Spec.Source.sql()+` WHERE `+w+` ORDER BY `+r.sh.keyList+
			fmt.Sprintf(` OFFSET $%d LIMIT 1`, len(args)), args...).Scan(&hi)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return v, fmt.Errorf("backfill: verify %s: %w", j.Name, err)
		}
		// hi nil: the last chunk is open-ended on both sides, so target rows
		// beyond the source's last key are counted too.
		d, err := r.compareRange(ctx, tgtPool, srcCols, tgtCols, lo, hi, o)
		if err != nil {
			return v, err
		}
		v.Chunks++
		v.RowsSource += d.SourceRows
		v.RowsTarget += d.TargetRows
		if d.differs {
			v.Differing++
			if d.Repaired {
				v.Repaired++
			}
			if len(v.Ranges) < 100 {
				v.Ranges = append(v.Ranges, d.RangeDiff)
			}
		}
		if hi == nil {
			break
		}
		lo = hi
	}
	for _, c := range o.Checks {
		co, err := runCheck(ctx, r.src, tgtPool, c)
		if err != nil {
			return v, err
		}
		v.Checks = append(v.Checks, co)
		if !co.OK {
			v.Problems = append(v.Problems, fmt.Sprintf("business check %s: %s", c.Name, co.Detail))
		}
	}
	if n := v.Differing - v.Repaired; n > 0 {
		v.Problems = append(v.Problems, fmt.Sprintf("%d of %d ranges differ", n, v.Chunks))
	}
	if end, err := b.stageOf(ctx, j.Migration); err == nil && end.Epoch != v.Epoch {
		v.Problems = append(v.Problems, fmt.Sprintf("the migration went back to off during the verification (epoch %d -> %d)", v.Epoch, end.Epoch))
	}
	v.OK = len(v.Problems) == 0
	v.FinishedAt = time.Now().UTC()
	detail, _ := json.Marshal(v)
	if _, err := b.pool.Exec(ctx, `INSERT INTO `+b.t.verifications+` (job, migration, epoch, ok, started_at, finished_at, chunks, differing, repaired, rows_source, rows_target, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)`, v.Job, v.Migration, v.Epoch, v.OK, v.StartedAt, v.FinishedAt,
		v.Chunks, v.Differing, v.Repaired, v.RowsSource, v.RowsTarget, detail); err != nil {
		return v, fmt.Errorf("backfill: store verification of %s: %w", j.Name, err)
	}
	return v, nil
}

type rangeResult struct {
	RangeDiff
	differs bool
}

func (r *runner) compareRange(ctx context.Context, tgt *pgxpool.Pool, srcCols, tgtCols []string, lo, hi []string, o VerifyOptions) (rangeResult, error) {
	cmp := func() (sum, sum, error) {
		s, err := checksum(ctx, r.src, r.j.Spec.Source, r.sh, srcCols, lo, hi)
		if err != nil {
			return s, sum{}, err
		}
		t, err := checksum(ctx, tgt, r.txPG.table, r.sh, tgtCols, lo, hi)
		return s, t, err
	}
	s, t, err := cmp()
	if err != nil {
		return rangeResult{}, err
	}
	res := rangeResult{RangeDiff: RangeDiff{Lo: lo, Hi: hi, SourceRows: s.rows, TargetRows: t.rows}}
	if s == t {
		return res, nil
	}
	if err := sleep(ctx, o.RecheckDelay); err != nil {
		return res, err
	}
	if s, t, err = cmp(); err != nil {
		return res, err
	}
	res.SourceRows, res.TargetRows = s.rows, t.rows
	if s == t {
		return res, nil
	}
	res.differs = true
	if !o.Repair {
		return res, nil
	}
	if err := r.recopy(ctx, lo, hi); err != nil {
		return res, err
	}
	if s, t, err = cmp(); err != nil {
		return res, err
	}
	res.Repaired = s == t
	return res, nil
}

// recopy makes the target's range (lo, hi] equal to the source's: rows the
// source lacks are deleted, the rest copied again.
func (r *runner) recopy(ctx context.Context, lo, hi []string) error {
	pg := r.txPG
	sameDB := pg.pool == r.b.pool && r.src == querier(r.b.pool)
	return pgx.BeginFunc(ctx, pg.pool, func(tx pgx.Tx) error {
		if sameDB {
			var args []any
			w := r.sh.where(lo, hi, &args, "t.")
			var match []string
			for _, k := range r.j.Spec.Key {
				match = append(match, "s."+ident(k)+" = t."+ident(k))
			}
			if _, err := tx.Exec(ctx, `DELETE FROM `+pg.table.sql()+` t WHERE `+w+` AND NOT EXISTS (SELECT 1 FROM `+
				r.j.Spec.Source.sql()+` s WHERE `+strings.Join(match, " AND ")+`)`, args...); err != nil {
				return fmt.Errorf("backfill: repair %s: %w", pg.table, err)
			}
		} else {
			keys, err := r.targetOnlyKeys(ctx, tx, lo, hi)
			if err != nil {
				return err
			}
			for _, k := range keys {
				var args []any
				if _, err := tx.Exec(ctx, `DELETE FROM `+pg.table.sql()+` WHERE `+r.sh.bound("=", k, &args, ""), args...); err != nil {
					return fmt.Errorf("backfill: repair %s: %w", pg.table, err)
				}
			}
		}
		if r.fast {
			sql, args := r.sh.copySQL(lo, hi, false)
			if _, err := tx.Exec(ctx, sql, args...); err != nil {
				return fmt.Errorf("backfill: repair %s: %w", pg.table, err)
			}
			return nil
		}
		var src querier = r.src
		if sameDB {
			src = tx
		}
		rows, _, err := r.read(ctx, src, lo, hi, math.MaxInt32)
		if err != nil {
			return err
		}
		if rows, err = r.transform(ctx, rows); err != nil {
			return err
		}
		return pg.writeTx(ctx, tx, rows)
	})
}

// targetOnlyKeys lists keys in (lo, hi] present in the target only (the
// databases differ, so the sides are compared here).
func (r *runner) targetOnlyKeys(ctx context.Context, tx pgx.Tx, lo, hi []string) ([][]string, error) {
	keysOf := func(q querier, t Table) (map[string][]string, error) {
		var args []any
		w := r.sh.where(lo, hi, &args, "")
		rows, err := q.Query(ctx, `SELECT `+r.sh.cursor+` FROM `+t.sql()+` WHERE `+w, args...)
		if err != nil {
			return nil, fmt.Errorf("backfill: repair: keys of %s: %w", t, err)
		}
		ks, err := pgx.CollectRows(rows, pgx.RowTo[[]string])
		if err != nil {
			return nil, err
		}
		m := make(map[string][]string, len(ks))
		for _, k := range ks {
			m[strings.Join(k, "\x00")] = k
		}
		return m, nil
	}
	src, err := keysOf(r.src, r.j.Spec.Source)
	if err != nil {
		return nil, err
	}
	tgt, err := keysOf(tx, r.txPG.table)
	if err != nil {
		return nil, err
	}
	var out [][]string
	for k, v := range tgt {
		if _, ok := src[k]; !ok {
			out = append(out, v)
		}
	}
	return out, nil
}

func runCheck(ctx context.Context, src querier, tgt *pgxpool.Pool, c BusinessCheck) (CheckOutcome, error) {
	load := func(q querier, sql string) (map[string]float64, error) {
		rows, err := q.Query(ctx, sql)
		if err != nil {
			return nil, fmt.Errorf("backfill: business check %s: %w", c.Name, err)
		}
		defer rows.Close()
		m := map[string]float64{}
		for rows.Next() {
			var g *string
			var v *float64
			if err := rows.Scan(&g, &v); err != nil {
				return nil, fmt.Errorf("backfill: business check %s: rows must be (group text, value numeric): %w", c.Name, err)
			}
			key := "<null>"
			if g != nil {
				key = *g
			}
			if v == nil {
				m[key] = math.NaN()
			} else {
				m[key] = *v
			}
		}
		return m, rows.Err()
	}
	a, err := load(src, c.SourceSQL)
	if err != nil {
		return CheckOutcome{}, err
	}
	bm, err := load(tgt, c.TargetSQL)
	if err != nil {
		return CheckOutcome{}, err
	}
	out := CheckOutcome{Name: c.Name, OK: true}
	var bad []string
	groups := map[string]bool{}
	for g := range a {
		groups[g] = true
	}
	for g := range bm {
		groups[g] = true
	}
	out.Groups = len(groups)
	for _, g := range slices.Sorted(func(yield func(string) bool) {
		for g := range groups {
			if !yield(g) {
				return
			}
		}
	}) {
		x, okA := a[g]
		y, okB := bm[g]
		switch {
		case !okA:
			bad = append(bad, fmt.Sprintf("%s: only in target (%v)", g, y))
		case !okB:
			bad = append(bad, fmt.Sprintf("%s: only in source (%v)", g, x))
		case math.IsNaN(x) || math.IsNaN(y):
			if math.IsNaN(x) != math.IsNaN(y) {
				bad = append(bad, fmt.Sprintf("%s: source %v, target %v", g, x, y))
			}
		default:
			d := math.Abs(x - y)
			if d > c.Tolerance && d > c.RelTolerance*math.Max(math.Abs(x), math.Abs(y)) {
				bad = append(bad, fmt.Sprintf("%s: source %v, target %v", g, x, y))
			}
		}
	}
	if len(bad) > 0 {
		out.OK = false
		if len(bad) > 5 {
			bad = append(bad[:5], fmt.Sprintf("and %d more", len(bad)-5))
		}
		out.Detail = fmt.Sprintf("%d of %d groups differ: %s", len(bad), len(groups), strings.Join(bad, "; "))
	}
	return out, nil
}

// VerifiedGuard is the flags guard "backfill complete and verified": it
// applies when keys enter shadow and passes only when, for the migration,
// every backfill job stored in schema has finished at the migration's
// current epoch and the latest verification of each job (at least one) is
// a success made at that epoch. Going back to off bumps the epoch, so new
// must be backfilled and verified again before shadow.
func VerifiedGuard(pool *pgxpool.Pool, schema string) flags.Guard {
	q := func(n string) string { return pgx.Identifier{schema, n}.Sanitize() }
	jobs, vers := q("backfill_jobs"), q("backfill_verifications")
	return flags.NewGuard("backfill-verified", flags.Entering(flags.Shadow), func(ctx context.Context, t flags.Transition) error {
		return checkVerified(ctx, pool, jobs, vers, t.Migration, t.From.Epoch)
	})
}

func checkVerified(ctx context.Context, pool *pgxpool.Pool, jobs, vers, migration string, epoch int64) error {
	var problems []string
	rows, err := pool.Query(ctx, `SELECT name, epoch, done FROM `+jobs+` WHERE migration = $1 ORDER BY name`, migration)
	if err != nil {
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "42P01" {
			return fmt.Errorf("no backfill has been installed (%s is missing): run and verify one for %s, or force with a reason if new was filled by other means", jobs, migration)
		}
		return fmt.Errorf("backfill tables unreadable: %v", err)
	}
	type job struct {
		name  string
		epoch int64
		done  bool
	}
	js, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (job, error) {
		var j job
		return j, r.Scan(&j.name, &j.epoch, &j.done)
	})
	if err != nil {
		return fmt.Errorf("backfill tables unreadable: %v", err)
	}
	names := map[string]bool{}
	for _, j := range js {
		names[j.name] = true
		switch {
		case j.epoch != epoch:
			problems = append(problems, fmt.Sprintf("job %s ran at epoch %d, the migration is at epoch %d (it went back to off): run it again", j.name, j.epoch, epoch))
		case !j.done:
			problems = append(problems, fmt.Sprintf("job %s has not finished", j.name))
		}
	}
	rows, err = pool.Query(ctx, `SELECT DISTINCT ON (job) job, ok, epoch, detail->'problems' FROM `+vers+` WHERE migration = $1 ORDER BY job, id DESC`, migration)
	if err != nil {
		return fmt.Errorf("backfill verifications unreadable: %v", err)
	}
	verified := map[string]bool{}
	for rows.Next() {
		var name string
		var ok bool
		var e int64
		var probs []string
		if err := rows.Scan(&name, &ok, &e, &probs); err != nil {
			rows.Close()
			return fmt.Errorf("backfill verifications unreadable: %v", err)
		}
		verified[name] = true
		switch {
		case e != epoch:
			problems = append(problems, fmt.Sprintf("job %s was last verified at epoch %d, the migration is at epoch %d: verify again", name, e, epoch))
		case !ok:
			problems = append(problems, fmt.Sprintf("job %s: last verification failed: %s", name, strings.Join(probs, "; ")))
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("backfill verifications unreadable: %v", err)
	}
	for _, j := range js {
		if !verified[j.name] {
			problems = append(problems, fmt.Sprintf("job %s was never verified", j.name))
		}
	}
	if len(js) == 0 && len(verified) == 0 {
		problems = append(problems, "no backfill was run or verified for "+migration)
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// Guard is [VerifiedGuard] over this Backfiller's tables.
func (b *Backfiller) Guard() flags.Guard { return VerifiedGuard(b.pool, b.schema) }
