package backfill

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5"
)

// Work stealing: ranges are planned to hold about equal row counts, but a
// sample can be off, rows differ in cost (a Go transform, a slow sink), and
// workers join late (another process). A worker that finds no free range
// splits the leased range with the most left: the holder keeps the lower
// half from its cursor, the stealer leases the upper half as a new range.
//
// The split is fenced by the range row's lock, the one every chunk takes
// first: the stealer locks the row, checks that the holder's cursor is
// still below the split key and that the range's end is the one it
// counted from, moves the end down and inserts the new range, in one
// transaction. The holder reads its range's end again under the same lock
// at the start of every chunk, so a chunk runs wholly before a split or
// wholly after it. Where the sink commits on its own (the lock is let go
// while the sink writes), the cursor only moves if the end is unchanged;
// otherwise the chunk is redone up to the new end and the rows written past
// it are written again by the stealer (the sink is idempotent).

// Stealing pays when each half holds a few chunks; counting what is left is
// capped so a huge range costs a bounded scan (the holder then keeps part
// of it and steals back when done).
const (
	stealMinChunks = 4
	stealCapChunks = 64
)

type stealCandidate struct {
	id       int
	cursor   []string
	hi       []string
	rowsDone int64
}

// steal splits the leased range with the most rows left and leases its
// upper part to w, or returns nil when no range is worth splitting.
func (r *runner) steal(ctx context.Context, w *worker) (*lease, error) {
	b := r.b
	rows, err := b.pool.Query(ctx, `SELECT id, cursor, hi, rows_done FROM `+b.t.ranges+`
WHERE job = $1 AND NOT done AND lease_until >= clock_timestamp() AND owner IS DISTINCT FROM $2
ORDER BY est_rows - rows_done DESC, id LIMIT 4`, r.j.Name, w.id)
	if err != nil {
		return nil, fmt.Errorf("backfill: %s: find a range to split: %w", r.j.Name, err)
	}
	cands, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (stealCandidate, error) {
		var c stealCandidate
		return c, row.Scan(&c.id, &c.cursor, &c.hi, &c.rowsDone)
	})
	if err != nil {
		return nil, fmt.Errorf("backfill: %s: find a range to split: %w", r.j.Name, err)
	}
	chunk := w.sz.size
	for _, c := range cands {
		// What is left, counted up to a cap.
		limit := stealCapChunks * chunk
		var args []any
		where := r.sh.where(c.cursor, c.hi, &args, "")
		args = append(args, limit)
		sql := `SELECT count(*) FROM (SELECT 1 FROM ` + r.sh.spec.Source.sql() + ` WHERE ` + where +
			fmt.Sprintf(` LIMIT $%d) s`, len(args))
		var left int64
		if err := r.src.QueryRow(ctx, sql, args...).Scan(&left); err != nil {
			return nil, fmt.Errorf("backfill: %s: count range %d: %w", r.j.Name, c.id, err)
		}
		if left < int64(stealMinChunks*chunk) {
			// Not worth it; correct the estimate so the next look starts
			// elsewhere.
			if _, err := b.pool.Exec(ctx, `UPDATE `+b.t.ranges+` SET est_rows = rows_done + $3 WHERE job = $1 AND id = $2`,
				r.j.Name, c.id, left); err != nil {
				return nil, fmt.Errorf("backfill: %s: %w", r.j.Name, err)
			}
			continue
		}
		keep := left / 2
		var mid []string
		sql, args = r.sh.boundarySQL(c.cursor, c.hi, int(keep))
		if err := r.src.QueryRow(ctx, sql, args...).Scan(&mid); err != nil {
			if errors.Is(err, pgx.ErrNoRows) {
				continue // rows went away meanwhile
			}
			return nil, fmt.Errorf("backfill: %s: split range %d: %w", r.j.Name, c.id, err)
		}
		if slices.Equal(mid, c.hi) {
			continue
		}
		rest := max(left-keep, 0)
		if left == int64(limit) {
			rest = -1 // unknown: at least as much as counted
		}
		l, err := r.split(ctx, w, c, mid, keep, rest)
		if err != nil || l != nil {
			return l, err
		}
	}
	return nil, nil
}

// split moves the end of range c down to mid and leases (mid, c.hi] to w as
// a new range, if c still ends at c.hi and its holder has not passed mid.
func (r *runner) split(ctx context.Context, w *worker, c stealCandidate, mid []string, keep, rest int64) (*lease, error) {
	b := r.b
	var l *lease
	err := pgx.BeginFunc(ctx, b.pool, func(tx pgx.Tx) error {
		// Waits for the holder's chunk in flight, if any.
		var cursor, hi []string
		var rowsDone, est int64
		err := tx.QueryRow(ctx, `SELECT cursor, hi, rows_done, est_rows FROM `+b.t.ranges+`
WHERE job = $1 AND id = $2 AND NOT done AND lease_until >= clock_timestamp() FOR UPDATE`, r.j.Name, c.id).Scan(&cursor, &hi, &rowsDone, &est)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil // finished, or its holder died: claimable the usual way
		}
		if err != nil {
			return err
		}
		if !slices.Equal(hi, c.hi) {
			return nil // split by another stealer meanwhile
		}
		if !slices.Equal(cursor, c.cursor) {
			// The holder moved on: it must still have rows before mid. The
			// source decides, in the key's own type and collation.
			var args []any
			var ahead bool
			if err := r.src.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+r.sh.spec.Source.sql()+` WHERE `+
				r.sh.where(cursor, mid, &args, "")+`)`, args...).Scan(&ahead); err != nil {
				return err
			}
			if !ahead {
				return nil
			}
		}
		var id int
		if err := tx.QueryRow(ctx, `UPDATE `+b.t.jobs+` SET ranges = ranges + 1, updated_at = now() WHERE name = $1 RETURNING ranges - 1`,
			r.j.Name).Scan(&id); err != nil {
			return err
		}
		if rest < 0 {
			rest = max(est-rowsDone-keep, keep)
		}
		if _, err := tx.Exec(ctx, `UPDATE `+b.t.ranges+` SET hi = $3, est_rows = rows_done + $4, updated_at = now() WHERE job = $1 AND id = $2`,
			r.j.Name, c.id, mid, keep); err != nil {
			return err
		}
		l = &lease{id: id, hi: c.hi, cursor: mid, token: 1}
		_, err = tx.Exec(ctx, `INSERT INTO `+b.t.ranges+` (job, id, lo, hi, cursor, owner, token, lease_until, est_rows)
VALUES ($1, $2, $3, $4, $3, $5, $6, clock_timestamp() + make_interval(secs => $7), $8)`,
			r.j.Name, id, mid, c.hi, w.id, l.token, r.cfg.LeaseTTL.Seconds(), rest)
		return err
	})
	if err != nil {
		if transient(ctx, err) {
			r.b.logger.Warn("backfill: split failed, will look again", "job", r.j.Name, "range", c.id, "err", err)
			return nil, nil
		}
		return nil, fmt.Errorf("backfill: %s: split range %d: %w", r.j.Name, c.id, err)
	}
	if l != nil {
		r.track.split()
		r.b.logger.Info("backfill: split a busy range", "job", r.j.Name, "range", c.id, "new_range", l.id, "at", mid, "worker", w.id)
	}
	return l, nil
}
