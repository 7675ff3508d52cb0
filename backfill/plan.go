package backfill

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5"
)

// keyspace is the job's fixed work: the upper bound taken at start and the
// split points of its ranges.
type keyspace struct {
	upper    []string // nil: the source was empty
	splits   [][]string
	estimate int64
}

// planKeyspace fixes the upper bound (rows created after it are the dual
// writes' job) and splits [start, upper] into at most n ranges of about
// equal row counts: exactly by ntile over the key index on small tables, by
// ntile over a block sample (TABLESAMPLE SYSTEM) of about 300 rows per
// range on big ones (a billion-row table is never scanned to plan).
func planKeyspace(ctx context.Context, q querier, sh *shape, c Config) (keyspace, error) {
	var ks keyspace
	src := sh.spec.Source.sql()
	// NULLs sort first descending: a key column holding one shows here.
	var upper []*string
	err := q.QueryRow(ctx, `SELECT `+sh.cursor+` FROM `+src+` ORDER BY `+sh.keyDesc+` LIMIT 1`).Scan(&upper)
	if errors.Is(err, pgx.ErrNoRows) {
		return keyspace{}, nil
	}
	if err != nil {
		return ks, fmt.Errorf("backfill: upper bound of %s: %w", sh.spec.Source, err)
	}
	for i, v := range upper {
		if v == nil {
			return ks, fieldErr("Spec.Key", "column %q of %s holds NULL: a row is copied, resumed and verified by its key, "+
				"which NULL does not identify; key by columns that are never NULL (a primary key)", sh.spec.Key[i], sh.spec.Source)
		}
		ks.upper = append(ks.upper, *v)
	}
	var reltuples float64
	var relpages, pages int64
	if err := q.QueryRow(ctx, `SELECT reltuples::float8, relpages::int8, pg_relation_size(oid) / current_setting('block_size')::int8
FROM pg_class WHERE oid = to_regclass($1)`, src).Scan(&reltuples, &relpages, &pages); err != nil {
		return ks, fmt.Errorf("backfill: size of %s: %w", sh.spec.Source, err)
	}
	ks.estimate = int64(reltuples)
	if reltuples < 0 && relpages < 100000 {
		// Never analysed and not big: count.
		if err := q.QueryRow(ctx, `SELECT count(*) FROM `+src).Scan(&ks.estimate); err != nil {
			return ks, fmt.Errorf("backfill: count %s: %w", sh.spec.Source, err)
		}
	}
	n := c.rangesFor(ks.estimate)
	if n <= 1 {
		return ks, nil
	}
	// The last key of each of n tiles of the key order: over the whole
	// table when small, over a block sample of it when big. Only the n keys
	// leave the server, and only the key columns are sorted: a big sort or
	// a burst of rows decoded in the caller's process would stall what
	// else runs there.
	//
	// A block sample's unit is the block, not the row: a table is mostly
	// stored in about its key order, so the rows of one block are
	// neighbours in the key order and tell little more than one of them.
	// About 300 blocks per range (at most 20,000 in all) place each split
	// to within about a tenth of a range, and work stealing evens out the
	// rest; of each block about two rows are kept for the sort.
	var args []any
	w := sh.where(nil, ks.upper, &args, "")
	from := src
	if ks.estimate > 200000 && pages > 0 {
		blocks := min(pages, int64(min(20000, 300*n)))
		perBlock := float64(ks.estimate) / float64(pages)
		args = append(args, 100*float64(blocks)/float64(pages))
		from = src + fmt.Sprintf(` TABLESAMPLE SYSTEM ($%d)`, len(args))
		if perBlock > 2 {
			args = append(args, 2/perBlock)
			w += fmt.Sprintf(` AND random() < $%d`, len(args))
		}
	}
	rows, err := q.Query(ctx, `SELECT DISTINCT ON (b) `+sh.cursor+` FROM (SELECT `+sh.keyList+`, ntile(`+fmt.Sprint(n)+
		`) OVER (ORDER BY `+sh.keyList+`) AS b FROM `+from+` WHERE `+w+`) s ORDER BY b, `+sh.keyDesc, args...)
	if err != nil {
		return ks, fmt.Errorf("backfill: split %s: %w", sh.spec.Source, err)
	}
	picks, err := pgx.CollectRows(rows, pgx.RowTo[[]string])
	if err != nil {
		return ks, fmt.Errorf("backfill: split %s: %w", sh.spec.Source, err)
	}
	// The last tile ends at the upper bound, whatever the sample's last
	// key: a range of its own from there would hold a sliver.
	if len(picks) > 0 {
		picks = picks[:len(picks)-1]
	}
	for _, p := range picks {
		if len(ks.splits) > 0 && slices.Equal(ks.splits[len(ks.splits)-1], p) {
			continue
		}
		ks.splits = append(ks.splits, p)
	}
	// The last range ends at the upper bound itself.
	if len(ks.splits) > 0 && slices.Equal(ks.splits[len(ks.splits)-1], ks.upper) {
		ks.splits = ks.splits[:len(ks.splits)-1]
	}
	return ks, nil
}

// Plan is what a dry run reports: what the job would copy, written nowhere.
type Plan struct {
	Job       string
	Migration string
	// Fingerprint of the definition; Stored tells whether a job of this
	// name exists and StoredMatches whether it has this definition.
	Fingerprint   string
	Stored        bool
	StoredMatches bool
	// UpperBound is the last key that would be copied (text form per key
	// column); nil when the source is empty.
	UpperBound    []string
	EstimatedRows int64
	// Ranges are the (exclusive lo, inclusive hi] key ranges.
	Ranges []KeyRange
	// CopySQL is the statement of one chunk on the fast path, or the read
	// statement on the Go path.
	CopySQL string
	// Sample holds up to 5 rows as they would reach the sink (after Exprs
	// and Transform).
	Sample []Row
	// RowsDone counts the rows a stored job of this definition has copied
	// already: a run resumes after them.
	RowsDone int64
	// Refused says why a run would be refused now (the migration's stage),
	// empty when it would start.
	Refused string
}

// KeyRange is a range of keys: Lo exclusive (nil: from the start), Hi inclusive.
type KeyRange struct{ Lo, Hi []string }

// DryRun plans the job and shows a sample of transformed rows; it writes
// nothing, neither to the sink nor to the backfill tables.
func (b *Backfiller) DryRun(ctx context.Context, j Job) (Plan, error) {
	r, err := b.open(ctx, &j)
	if err != nil {
		return Plan{}, err
	}
	cfg := j.Config.withDefaults()
	ks, err := planKeyspace(ctx, r.src, r.sh, j.Config)
	if err != nil {
		return Plan{}, err
	}
	p := Plan{Job: j.Name, Migration: j.Migration, Fingerprint: r.fp, UpperBound: ks.upper, EstimatedRows: ks.estimate}
	var stored string
	err = b.pool.QueryRow(ctx, `SELECT definition FROM `+b.t.jobs+` WHERE name = $1`, j.Name).Scan(&stored)
	switch {
	case err == nil:
		p.Stored, p.StoredMatches = true, stored == r.fp
	case !errors.Is(err, pgx.ErrNoRows):
		return p, fmt.Errorf("backfill: dry run: %w", err)
	}
	if p.StoredMatches {
		if err := b.pool.QueryRow(ctx, `SELECT coalesce(sum(rows_done), 0)::int8 FROM `+b.t.ranges+` WHERE job = $1`, j.Name).Scan(&p.RowsDone); err != nil {
			return p, fmt.Errorf("backfill: dry run: %w", err)
		}
	}
	st, err := b.stageOf(ctx, j.Migration)
	if err != nil {
		return p, err
	}
	if err := stageAllows(j.Migration, st, cfg); err != nil {
		p.Refused = err.Error()
	}
	p.Ranges = rangesOf(ks)
	switch {
	case r.inPlace && r.fast:
		if p.CopySQL, _ = r.sh.fillSQL(nil, ks.upper); p.CopySQL == "" {
			p.CopySQL, _ = r.sh.copySQL(nil, ks.upper, cfg.LockSourceRows)
		}
	case r.fast:
		p.CopySQL, _ = r.sh.copySQL(nil, ks.upper, cfg.LockSourceRows)
	default:
		p.CopySQL, _ = r.sh.readSQL(nil, ks.upper, cfg.InitialChunk)
	}
	if ks.upper != nil {
		rows, _, err := r.read(ctx, r.src, nil, ks.upper, 5)
		if err != nil {
			return p, err
		}
		p.Sample = rows
	}
	return p, nil
}

func rangesOf(ks keyspace) []KeyRange {
	if ks.upper == nil {
		return nil
	}
	var out []KeyRange
	var lo []string
	for _, s := range ks.splits {
		out = append(out, KeyRange{Lo: lo, Hi: s})
		lo = s
	}
	return append(out, KeyRange{Lo: lo, Hi: ks.upper})
}
