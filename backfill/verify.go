package backfill

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/big"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
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
	// Repair recopies the ranges holding a lasting difference (and deletes
	// the target rows of their differing keys the source does not have)
	// and checks those keys again. A range's repair is one transaction
	// against the service's writes; one lost to a deadlock or a dropped
	// connection is retried as a chunk is (Config.MaxRetries).
	Repair bool
	// RecheckDelay separates the looks at a differing range's keys (200ms):
	// a dual write in flight at one look has landed on both sides by the
	// next. A dual write whose second side lags its first by more than this
	// is taken for a lasting difference.
	RecheckDelay time.Duration
	// OverwriteNewer lets Repair replace target rows newer than their
	// source (see [Verification.NewerInTarget]) with the source's: for when
	// old is right after all. Without it they are left alone.
	OverwriteNewer bool
	Checks         []BusinessCheck
}

// Verification is the outcome of one verify, stored for [VerifiedGuard].
type Verification struct {
	Job, Migration string
	Epoch          int64
	OK             bool
	Chunks         int64
	// Differing counts the ranges holding a lasting difference, Repaired
	// those of them whose differing keys Repair made equal again (and
	// their newer keys too, with OverwriteNewer); DifferingKeys counts
	// their differing keys. A differing key left after any repair fails
	// the verification, and so does a newer one (see NewerInTarget).
	Differing, Repaired, DifferingKeys int64
	// InFlight counts keys that differed while dual writes were landing on
	// them and then settled: equal at a later look, or, still being
	// written, with the target holding at least the version the source had
	// at the look before. They are not a failure: the dual write is
	// responsible for them. A key whose source row did not change between
	// two looks is never in flight.
	InFlight int64
	// NewerInTarget counts keys, not counted in DifferingKeys, whose
	// target row holds a greater version than their source row while the
	// source did not change: the target has a write the source lacks (in
	// live or rampdown, a failed write to old waiting in the repair log or
	// dead-lettered there; otherwise a write that reached new only). The
	// version guard keeps the copy from replacing them, so Repair alone
	// cannot make them equal. They fail the verification until the source
	// catches up (replay the repair log, then verify again) or, when the
	// source is right, a Repair with OverwriteNewer copies it over them.
	NewerInTarget          int64
	RowsSource, RowsTarget int64
	Ranges                 []RangeDiff    `json:"ranges,omitempty"`
	Checks                 []CheckOutcome `json:"checks,omitempty"`
	Problems               []string       `json:"problems,omitempty"`
	StartedAt, FinishedAt  time.Time
}

// RangeDiff is a key range holding a lasting difference.
type RangeDiff struct {
	Lo, Hi                 []string
	SourceRows, TargetRows int64
	// DifferingKeys counts the keys that differ with their source row
	// unchanged; Keys shows the first ten of them (as text).
	DifferingKeys int64
	Keys          [][]string `json:"keys,omitempty"`
	// NewerInTarget counts the keys whose target row is newer than their
	// unchanged source row; NewerKeys shows the first ten.
	NewerInTarget int64
	NewerKeys     [][]string `json:"newer_keys,omitempty"`
	// InFlight counts the range's keys that differed only while written.
	InFlight int64
	// Repaired: Repair made the differing keys equal again (and the newer
	// ones, with OverwriteNewer).
	Repaired bool
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

// verifier is one Verify's view of the two sides.
type verifier struct {
	r   *runner
	o   VerifyOptions
	tgt *pgxpool.Pool
	// sameDB: source and target are read through one pool, so one
	// statement, and so one snapshot, sees both sides.
	sameDB bool
	// targetFirst: in two statements the side the dual writes write second
	// (new in dualwrite and shadow, old from live on) is read first. A
	// write seen there was made on the other side before, so the second
	// read sees it too: the sides differ by writes landing between the two
	// reads, never by half a write seen the wrong way round.
	targetFirst bool
	src, dst    side
	// rs: the target is Redis hashes, read back key by key.
	rs *RedisSink
}

// side is what is compared on one side of a job.
type side struct {
	table Table
	// row is a hash of the compared columns as a JSON array: NULL stays
	// null (not the string "null", not empty).
	row     string
	version string
}

func newVerifier(ctx context.Context, r *runner, st flags.State, o VerifyOptions) (*verifier, error) {
	if rs, ok := r.sink.(*RedisSink); ok && r.txPG == nil {
		return &verifier{r: r, o: o, rs: rs, targetFirst: st.Stage.Authoritative() == flags.Old}, nil
	}
	v := &verifier{r: r, o: o, tgt: r.txPG.pool, sameDB: r.sameDB(), targetFirst: st.Stage.Authoritative() == flags.Old}
	_, tgtTypes, err := columnTypes(ctx, v.tgt, r.txPG.table)
	if err != nil {
		return nil, fmt.Errorf("%w (target)", err)
	}
	_, srcTypes, err := columnTypes(ctx, r.src, r.j.Spec.Source)
	if err != nil {
		return nil, fmt.Errorf("%w (Spec.Source)", err)
	}
	var srcCols, tgtCols []string
	for _, c := range r.sh.cols {
		if slices.Contains(r.j.Spec.VerifyIgnore, c) {
			continue
		}
		tgtCols = append(tgtCols, ident(c))
		e := r.sh.srcExpr(c)
		// The copy stores the source value in the target column's type; the
		// comparison converts it the same way (numeric(12,2) rounds, text
		// becomes varchar), so only a difference the target can hold counts.
		if _, isExpr := r.j.Spec.Exprs[c]; !isExpr && srcTypes[c] == tgtTypes[c] {
			srcCols = append(srcCols, e)
			continue
		}
		srcCols = append(srcCols, "("+e+")::"+tgtTypes[c])
	}
	ver := r.j.Spec.VersionColumn
	v.src = side{table: r.j.Spec.Source, row: rowHash(srcCols), version: r.sh.srcExpr(ver)}
	v.dst = side{table: r.txPG.table, row: rowHash(tgtCols), version: ident(ver)}
	return v, nil
}

// rowHash hashes the compared columns through the row's text form, which
// is injective: every value in its type's own text output (json exactly as
// written, jsonb, arrays with their bounds and NULL elements, numerics with
// their scale, floats in shortest exact form, NaN and -0 included), fields
// quoted where needed and NULL as an empty field. A JSON rendering (what
// this once was) is not: a jsonb SQL NULL and JSON null, a jsonb[] NULL
// element and a null one, and json values differing in key order,
// whitespace or duplicate keys all render alike. So any row that IS
// DISTINCT FROM its source hashes differently, and so do values equal but
// spelled differently (1.5 and 1.50, 0 and -0, 'a' and 'A' under a
// case-insensitive collation): verification errs on the side of a
// difference.
func rowHash(cols []string) string {
	return `hashtextextended(ROW(` + strings.Join(cols, ", ") + `)::text, 0)`
}

// normalSettings fix every setting a value's text form depends on, so two
// sessions (two databases, or pools with their own settings) render equal
// values alike and extra_float_digits cannot round floats together.
const normalSettings = `SELECT set_config('TimeZone', 'UTC', true), set_config('DateStyle', 'ISO, YMD', true),
	set_config('IntervalStyle', 'postgres', true), set_config('extra_float_digits', '1', true),
	set_config('bytea_output', 'hex', true)`

// normalized runs f in a transaction of q under normalSettings.
func normalized(ctx context.Context, q querier, f func(q querier) error) error {
	db, ok := q.(interface {
		Begin(context.Context) (pgx.Tx, error)
	})
	if !ok {
		return f(q)
	}
	return pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, normalSettings); err != nil {
			return err
		}
		return f(tx)
	})
}

// srcExpr is the source expression of target column c.
func (sh *shape) srcExpr(c string) string {
	if e, ok := sh.spec.Exprs[c]; ok {
		return "(" + e + ")"
	}
	return ident(c)
}

// checksumSQL counts one side's rows in (lo, hi] and sums their hashes
// (the sum does not depend on row order).
func (v *verifier) checksumSQL(s side, lo, hi []string, args *[]any) string {
	return `SELECT count(*) AS n, coalesce(sum(` + s.row + `::numeric), 0)::text AS h FROM ` + s.table.sql() +
		` WHERE ` + v.r.sh.where(lo, hi, args, "")
}

// checksums of both sides of (lo, hi]: in one statement where they are in
// one database, so no write can land between the two.
func (v *verifier) checksums(ctx context.Context, lo, hi []string) (sum, sum, error) {
	var s, t sum
	if v.sameDB {
		var args []any
		q := `SELECT s.n, s.h, t.n, t.h FROM (` + v.checksumSQL(v.src, lo, hi, &args) + `) s, (` + v.checksumSQL(v.dst, lo, hi, &args) + `) t`
		if err := normalized(ctx, v.r.src, func(src querier) error {
			return src.QueryRow(ctx, q, args...).Scan(&s.rows, &s.hash, &t.rows, &t.hash)
		}); err != nil {
			return s, t, fmt.Errorf("backfill: checksum %s and %s: %w", v.src.table, v.dst.table, err)
		}
		return s, t, nil
	}
	one := func(q querier, sd side, out *sum) error {
		var args []any
		sql := v.checksumSQL(sd, lo, hi, &args)
		if err := normalized(ctx, q, func(q querier) error {
			return q.QueryRow(ctx, sql, args...).Scan(&out.rows, &out.hash)
		}); err != nil {
			return fmt.Errorf("backfill: checksum %s: %w", sd.table, err)
		}
		return nil
	}
	if v.targetFirst {
		if err := one(v.tgt, v.dst, &t); err != nil {
			return s, t, err
		}
		return s, t, one(v.r.src, v.src, &s)
	}
	if err := one(v.r.src, v.src, &s); err != nil {
		return s, t, err
	}
	return s, t, one(v.tgt, v.dst, &t)
}

// rowLook is one side's row of a key at one look.
type rowLook struct {
	present bool
	hash    int64
	version any
}

func (a rowLook) changed(b rowLook) bool {
	return a.present != b.present || a.hash != b.hash || !sameVersion(a.version, b.version)
}

// keyLook is both sides of a key at one look.
type keyLook struct {
	key      []string
	src, tgt rowLook
}

func (k keyLook) equal() bool {
	return k.src.present == k.tgt.present && k.src.hash == k.tgt.hash
}

// newer: the target row holds a greater version than the source row.
func (k keyLook) newer() bool {
	if !k.src.present || !k.tgt.present {
		return false
	}
	c, ok := versionCmp(k.tgt.version, k.src.version)
	return ok && c > 0
}

// sideSQL lists one side's key, row hash and version in (lo, hi],
// restricted to keys when given.
func (v *verifier) sideSQL(s side, lo, hi []string, keys [][]string, args *[]any) string {
	sh := v.r.sh
	w := sh.where(lo, hi, args, "")
	if keys != nil {
		w += " AND " + sh.keyIn(keys, args, "")
	}
	return `SELECT ` + sh.cursor + ` AS k, ` + s.row + ` AS h, ` + s.version + ` AS v FROM ` + s.table.sql() + ` WHERE ` + w
}

// look reads both sides of (lo, hi]: every key of keys (in their order,
// absent ones as absent on both sides), or without keys the keys whose
// rows differ. In one database it is one statement comparing the sides by
// a full join on the key; otherwise each side is listed (the range is one
// chunk) and they are compared here.
func (v *verifier) look(ctx context.Context, lo, hi []string, keys [][]string) ([]keyLook, error) {
	if v.rs != nil {
		got, _, _, err := v.lookRedis(ctx, lo, hi, keys)
		return got, err
	}
	scanSide := func(ns *int64, vs any) rowLook {
		if ns == nil {
			return rowLook{}
		}
		return rowLook{present: true, hash: *ns, version: vs}
	}
	var got []keyLook
	if v.sameDB {
		var args []any
		q := `SELECT coalesce(s.k, t.k), s.h, s.v, t.h, t.v FROM (` + v.sideSQL(v.src, lo, hi, keys, &args) + `) s FULL JOIN (` +
			v.sideSQL(v.dst, lo, hi, keys, &args) + `) t ON s.k = t.k`
		if keys == nil {
			q += ` WHERE s.h IS DISTINCT FROM t.h`
		}
		err := normalized(ctx, v.r.src, func(src querier) error {
			rows, err := src.Query(ctx, q, args...)
			if err != nil {
				return err
			}
			got, err = pgx.CollectRows(rows, func(row pgx.CollectableRow) (keyLook, error) {
				var k keyLook
				var sh, th *int64
				var sv, tv any
				if err := row.Scan(&k.key, &sh, &sv, &th, &tv); err != nil {
					return k, err
				}
				k.src, k.tgt = scanSide(sh, sv), scanSide(th, tv)
				return k, nil
			})
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("backfill: compare %s and %s by key: %w", v.src.table, v.dst.table, err)
		}
	} else {
		list := func(q querier, s side) (map[string]rowLook, [][]string, error) {
			var args []any
			sql := v.sideSQL(s, lo, hi, keys, &args)
			m := map[string]rowLook{}
			var order [][]string
			err := normalized(ctx, q, func(q querier) error {
				rows, err := q.Query(ctx, sql, args...)
				if err != nil {
					return err
				}
				var k []string
				var h *int64
				var ver any
				_, err = pgx.ForEachRow(rows, []any{&k, &h, &ver}, func() error {
					m[strings.Join(k, "\x00")] = scanSide(h, ver)
					order = append(order, k)
					return nil
				})
				return err
			})
			if err != nil {
				return nil, nil, fmt.Errorf("backfill: list %s by key: %w", s.table, err)
			}
			return m, order, nil
		}
		var sm, tm map[string]rowLook
		var sk, tk [][]string
		var err error
		if v.targetFirst {
			if tm, tk, err = list(v.tgt, v.dst); err == nil {
				sm, sk, err = list(v.r.src, v.src)
			}
		} else if sm, sk, err = list(v.r.src, v.src); err == nil {
			tm, tk, err = list(v.tgt, v.dst)
		}
		if err != nil {
			return nil, err
		}
		for _, ks := range [][][]string{sk, tk} {
			for _, k := range ks {
				id := strings.Join(k, "\x00")
				s, inS := sm[id]
				t, inT := tm[id]
				if !inS && !inT {
					continue // listed already
				}
				delete(sm, id)
				delete(tm, id)
				if kl := (keyLook{key: k, src: s, tgt: t}); keys != nil || !kl.equal() {
					got = append(got, kl)
				}
			}
		}
	}
	if keys == nil {
		return got, nil
	}
	byKey := make(map[string]keyLook, len(got))
	for _, k := range got {
		byKey[strings.Join(k.key, "\x00")] = k
	}
	out := make([]keyLook, len(keys))
	for i, k := range keys {
		out[i] = byKey[strings.Join(k, "\x00")]
		out[i].key = k
	}
	return out, nil
}

func keysOf(ks []keyLook) [][]string {
	out := make([][]string, len(ks))
	for i, k := range ks {
		out[i] = k.key
	}
	return out
}

// settle follows the keys that differed at a first look and tells those
// being written (the dual write is in flight: the source row changed
// between the looks and the target then caught up or holds a version at
// least as new) from those that stay different. A key whose source row did
// not change between two looks RecheckDelay apart and whose target still
// differs is a lasting difference, whatever the target did meanwhile.
func (v *verifier) settle(ctx context.Context, lo, hi []string, first []keyLook) (inFlight int64, lasting []keyLook, err error) {
	if len(first) == 0 {
		return 0, nil, nil
	}
	if err := sleep(ctx, v.o.RecheckDelay); err != nil {
		return 0, nil, err
	}
	second, err := v.look(ctx, lo, hi, keysOf(first))
	if err != nil {
		return 0, nil, err
	}
	var moving []keyLook
	for i, k := range second {
		switch {
		case k.equal():
			inFlight++
		case !first[i].src.changed(k.src):
			lasting = append(lasting, k)
		default:
			moving = append(moving, k)
		}
	}
	if len(moving) == 0 {
		return inFlight, lasting, nil
	}
	// The last look: a key still being written has its source changing
	// and its target following it.
	if err := sleep(ctx, v.o.RecheckDelay); err != nil {
		return 0, nil, err
	}
	third, err := v.look(ctx, lo, hi, keysOf(moving))
	if err != nil {
		return 0, nil, err
	}
	for i, k := range third {
		was := moving[i].src
		switch {
		case k.equal():
			inFlight++
		case was.changed(k.src) && was.present && k.tgt.present && versionAtLeast(k.tgt.version, was.version):
			inFlight++
		default:
			lasting = append(lasting, k)
		}
	}
	return inFlight, lasting, nil
}

// Verify compares old and new chunk by chunk (row count and a NULL-safe
// hash over the compared columns, both sides), over the whole key space
// including rows added since the copy, then runs the business checks. A
// range whose checksums differ is compared key by key and its differing
// keys followed over two more looks (see [Verification.InFlight]); with
// Repair, a range with a lasting difference is recopied and its keys
// checked again. The result is stored at the migration's current epoch,
// where [VerifiedGuard] reads it. Verify needs no prior Run: it verifies a
// table copied by any means.
func (b *Backfiller) Verify(ctx context.Context, j Job, o VerifyOptions) (Verification, error) {
	r, err := b.open(ctx, &j)
	if err != nil {
		return Verification{}, err
	}
	if r.txPG == nil {
		switch s := j.Sink.(type) {
		case *PGSink:
			r.txPG = s
			r.sink = nil
		case *RedisSink:
			if len(o.Checks) > 0 {
				return Verification{}, fmt.Errorf("%w: %s writes to %s; business checks run SQL on both sides", ErrNotVerifiable, j.Name, s.Describe())
			}
		default:
			return Verification{}, fmt.Errorf("%w: %s writes to %s; only Postgres tables and RedisSink hashes are read back", ErrNotVerifiable, j.Name, j.Sink.Describe())
		}
	}
	switch {
	case o.ChunkRows < 0:
		return Verification{}, fieldErr("VerifyOptions.ChunkRows", "%d is negative", o.ChunkRows)
	case o.OverwriteNewer && !o.Repair:
		return Verification{}, fieldErr("VerifyOptions.OverwriteNewer", "takes effect only with Repair")
	}
	if o.ChunkRows == 0 {
		o.ChunkRows = 10000
	}
	if o.RecheckDelay <= 0 {
		o.RecheckDelay = 200 * time.Millisecond
	}
	st, err := b.stageOf(ctx, j.Migration)
	if err != nil {
		return Verification{}, err
	}
	// A stored job still copying: the ranges it has not reached read as
	// differing, and a repair would copy them in one transaction per range,
	// past the job's rate limit and its checkpoints.
	unfinished := ""
	if js, err := b.Status(ctx, j.Name); err == nil && !js.Done && js.Epoch == st.Epoch {
		unfinished = fmt.Sprintf("job %s has not finished its copy (%d of ~%d rows)", j.Name, js.RowsDone, js.EstimatedRows)
		if o.Repair {
			return Verification{}, fmt.Errorf("%w: %s: run it to the end before a verification repairs it", ErrJobNotFinished, unfinished)
		}
	} else if err != nil && !errors.Is(err, ErrUnknownJob) {
		return Verification{}, err
	}
	v := Verification{Job: j.Name, Migration: j.Migration, Epoch: st.Epoch, StartedAt: time.Now().UTC()}
	if unfinished != "" {
		v.Problems = append(v.Problems, unfinished+": the ranges it has not reached read as differing")
	}
	vf, err := newVerifier(ctx, r, st, o)
	if err != nil {
		return Verification{}, err
	}
	var lo []string
	var examples, newerExamples []string
	var differingRanges, newer int64
	for {
		var hi []string
		sql, args := r.sh.boundarySQL(lo, nil, o.ChunkRows)
		err := r.src.QueryRow(ctx, sql, args...).Scan(&hi)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return v, fmt.Errorf("backfill: verify %s: %w", j.Name, err)
		}
		// hi nil: the last chunk is open-ended on both sides, so target rows
		// beyond the source's last key are counted too.
		d, err := vf.compareRange(ctx, lo, hi)
		if err != nil {
			return v, err
		}
		v.Chunks++
		v.RowsSource += d.SourceRows
		v.RowsTarget += d.TargetRows
		v.InFlight += d.InFlight
		if d.differs {
			v.Differing++
			v.DifferingKeys += d.DifferingKeys
			v.NewerInTarget += d.NewerInTarget
			if d.Repaired {
				v.Repaired++
			}
			if d.left > 0 {
				differingRanges++
				for _, k := range d.Keys {
					if len(examples) < 5 {
						examples = append(examples, "("+strings.Join(k, ", ")+")")
					}
				}
			}
			if d.leftNewer > 0 {
				newer += d.leftNewer
				for _, k := range d.NewerKeys {
					if len(newerExamples) < 5 {
						newerExamples = append(newerExamples, "("+strings.Join(k, ", ")+")")
					}
				}
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
		co, err := runCheck(ctx, r.src, vf.tgt, c)
		if err != nil {
			return v, err
		}
		v.Checks = append(v.Checks, co)
		if !co.OK {
			v.Problems = append(v.Problems, fmt.Sprintf("business check %s: %s", c.Name, co.Detail))
		}
	}
	if differingRanges > 0 {
		v.Problems = append(v.Problems, fmt.Sprintf("%d of %d ranges differ (keys such as %s)", differingRanges, v.Chunks, strings.Join(examples, " ")))
	}
	if newer > 0 {
		v.Problems = append(v.Problems, fmt.Sprintf("%d keys are newer in the target than in the source (such as %s): the target has writes the source lacks, "+
			"which the version guard keeps; replay the dual writes' repair log so the source catches up and verify again, "+
			"or, if the source is right, repair with OverwriteNewer (dimmer backfill verify --repair --overwrite-newer)",
			newer, strings.Join(newerExamples, " ")))
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
	// left, leftNewer: the differing and newer keys still so after any
	// repair.
	left, leftNewer int64
}

// maxKeysShown per differing range in [RangeDiff.Keys].
const maxKeysShown = 10

func (v *verifier) compareRange(ctx context.Context, lo, hi []string) (rangeResult, error) {
	var res rangeResult
	var first []keyLook
	if v.rs != nil {
		// Every key is read back; the differing ones go on as below.
		var ns, nt int64
		var err error
		if first, ns, nt, err = v.lookRedis(ctx, lo, hi, nil); err != nil {
			return res, err
		}
		res.RangeDiff = RangeDiff{Lo: lo, Hi: hi, SourceRows: ns, TargetRows: nt}
	} else {
		s, t, err := v.checksums(ctx, lo, hi)
		if err != nil {
			return rangeResult{}, err
		}
		res.RangeDiff = RangeDiff{Lo: lo, Hi: hi, SourceRows: s.rows, TargetRows: t.rows}
		if s == t {
			return res, nil
		}
		if first, err = v.look(ctx, lo, hi, nil); err != nil {
			return res, err
		}
	}
	inFlight, lasting, err := v.settle(ctx, lo, hi, first)
	if err != nil {
		return res, err
	}
	res.InFlight = inFlight
	if len(lasting) == 0 {
		return res, nil
	}
	res.differs = true
	var newer []keyLook
	for _, k := range lasting {
		switch {
		case k.newer():
			newer = append(newer, k)
			if len(res.NewerKeys) < maxKeysShown {
				res.NewerKeys = append(res.NewerKeys, k.key)
			}
		default:
			res.DifferingKeys++
			if len(res.Keys) < maxKeysShown {
				res.Keys = append(res.Keys, k.key)
			}
		}
	}
	res.NewerInTarget = int64(len(newer))
	res.left, res.leftNewer = res.DifferingKeys, res.NewerInTarget
	if !v.o.Repair {
		return res, nil
	}
	var overwrite [][]string
	if v.o.OverwriteNewer {
		overwrite = keysOf(newer)
	}
	// The repair rewrites the range in one transaction against the
	// service's own writes (and a copy still running), so it can lose a
	// deadlock or its connection as a chunk can, and is retried like one.
	err = v.r.retry(ctx, "repair", func() error {
		if v.rs != nil {
			return v.recopyRedis(ctx, lo, hi, keysOf(lasting), overwrite)
		}
		return v.r.recopy(ctx, lo, hi, keysOf(lasting), overwrite)
	}, "lo", lo, "hi", hi)
	if err != nil {
		return res, err
	}
	after, err := v.look(ctx, lo, hi, keysOf(lasting))
	if err != nil {
		return res, err
	}
	var still []keyLook
	for _, k := range after {
		if !k.equal() {
			still = append(still, k)
		}
	}
	n, still, err := v.settle(ctx, lo, hi, still)
	if err != nil {
		return res, err
	}
	res.InFlight += n
	res.left, res.leftNewer = 0, 0
	for _, k := range still {
		if k.newer() {
			res.leftNewer++
		} else {
			res.left++
		}
	}
	// Repaired: what the repair was asked to fix is fixed. Newer keys are
	// only its business with OverwriteNewer; without it they stay, and
	// fail the verification on their own account.
	asked := res.DifferingKeys > 0 || v.o.OverwriteNewer && res.NewerInTarget > 0
	res.Repaired = asked && res.left == 0 && (!v.o.OverwriteNewer || res.leftNewer == 0)
	return res, nil
}

// versionAtLeast reports whether version a is at least b. Numbers compare
// as numbers and times as times; anything else is not comparable and
// reports false (the key then counts as differing).
func versionAtLeast(a, b any) bool {
	c, ok := versionCmp(a, b)
	return ok && c >= 0
}

func sameVersion(a, b any) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	if c, ok := versionCmp(a, b); ok {
		return c == 0
	}
	return fmt.Sprint(a) == fmt.Sprint(b)
}

func versionCmp(a, b any) (int, bool) {
	if ta, ok := a.(time.Time); ok {
		tb, ok := b.(time.Time)
		if !ok {
			return 0, false
		}
		return ta.Compare(tb), true
	}
	ra, ok := toRat(a)
	if !ok {
		return 0, false
	}
	rb, ok := toRat(b)
	if !ok {
		return 0, false
	}
	return ra.Cmp(rb), true
}

func toRat(x any) (*big.Rat, bool) {
	switch n := x.(type) {
	case *big.Rat:
		return n, true
	case int64:
		return new(big.Rat).SetInt64(n), true
	case int32:
		return new(big.Rat).SetInt64(int64(n)), true
	case int16:
		return new(big.Rat).SetInt64(int64(n)), true
	case int:
		return new(big.Rat).SetInt64(int64(n)), true
	case float64:
		if math.IsNaN(n) || math.IsInf(n, 0) {
			return nil, false
		}
		return new(big.Rat).SetFloat64(n), true
	case float32:
		return toRat(float64(n))
	case pgtype.Numeric:
		if !n.Valid || n.NaN || n.InfinityModifier != pgtype.Finite || n.Int == nil {
			return nil, false
		}
		r := new(big.Rat).SetInt(n.Int)
		p := new(big.Rat).SetInt(new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(abs(n.Exp))), nil))
		if n.Exp >= 0 {
			return r.Mul(r, p), true
		}
		return r.Quo(r, p), true
	}
	return nil, false
}

func abs(x int32) int32 {
	if x < 0 {
		return -x
	}
	return x
}

// sameDB: the source and the target are read through the same pool.
func (r *runner) sameDB() bool { return r.txPG != nil && r.src == querier(r.txPG.pool) }

// recopy makes the target's range (lo, hi] equal to the source's: of the
// keys found differing, those the source lacks are deleted, and the
// range's rows are copied again under the version guard. Only those keys
// are deleted: another target row the source lacks may be a create in
// flight where new is written first, which the delete would lose. The
// overwrite keys' target rows are deleted first, so the copy replaces
// them whatever their version.
func (r *runner) recopy(ctx context.Context, lo, hi []string, differing, overwrite [][]string) error {
	pg := r.txPG
	sameDB := r.sameDB()
	return pgx.BeginFunc(ctx, pg.pool, func(tx pgx.Tx) error {
		if len(overwrite) > 0 {
			var args []any
			if _, err := tx.Exec(ctx, `DELETE FROM `+pg.table.sql()+` WHERE `+r.sh.keyIn(overwrite, &args, ""), args...); err != nil {
				return fmt.Errorf("backfill: repair %s: %w", pg.table, err)
			}
		}
		if sameDB {
			var args []any
			w := r.sh.where(lo, hi, &args, "t.") + " AND " + r.sh.keyIn(differing, &args, "t.")
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
			only := make(map[string]bool, len(differing))
			for _, k := range differing {
				only[strings.Join(k, "\x00")] = true
			}
			for _, k := range keys {
				if !only[strings.Join(k, "\x00")] {
					continue
				}
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
