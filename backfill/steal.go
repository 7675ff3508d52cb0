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

// Stealing pays when each half holds a good part of a chunk (a chunk is
// TargetChunkTime of work, far more than a split costs): splitting only
// ranges of several chunks left the other workers idle through the last
// range of a job, since a chunk then often is most of a range. Counting
// what is left is capped so a huge range costs a bounded scan (the holder
// then keeps part of it and steals back when done).
const (
	stealMinShare  = 4 // each half holds at least 1/stealMinShare of a chunk
	stealCapChunks = 64
)

// stealMinHalf is the fewest rows each half of a split holds, for a stealer
// whose chunk is chunk rows.
func stealMinHalf(chunk, minChunk int) int64 {
	return int64(max(chunk/stealMinShare, minChunk, 1))
}

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
		minHalf := stealMinHalf(chunk, w.sz.min)
		if left < 2*minHalf {
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
		l, err := r.split(ctx, w, c, split{mid: mid, keep: keep, rest: rest, left: left, capped: left == int64(limit), minHalf: minHalf})
		if err != nil || l != nil {
			return l, err
		}
	}
	return nil, nil
}

// split is where a stealer means to split a range: mid closes the keep rows
// the holder keeps, counted from the cursor the stealer saw, of the left
// rows it counted (capped: at least that many); rest is what the new range
// is estimated to hold (-1: unknown).
type split struct {
	mid              []string
	keep, rest, left int64
	capped           bool
	minHalf          int64
}

// split moves the end of range c down to a split point and leases the rows
// above it to w as a new range, if c still ends at c.hi and its holder
// still has rows before that point.
func (r *runner) split(ctx context.Context, w *worker, c stealCandidate, s split) (*lease, error) {
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
			// The source is read in this transaction where it is in this
			// database: through another of the pool's connections, the
			// split would wait for one while holding the row lock that the
			// holder's next chunk and other stealers wait for, each on a
			// connection of that pool, and with as many workers as
			// connections none would ever come free.
			src := r.src
			if src == querier(b.pool) {
				src = tx
			}
			ok, err := r.resplit(ctx, src, c, cursor, &s)
			if err != nil || !ok {
				return err
			}
		}
		mid, keep, rest := s.mid, s.keep, s.rest
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
		r.b.logger.Info("backfill: split a busy range", "job", r.j.Name, "range", c.id, "new_range", l.id, "at", s.mid, "worker", w.id)
	}
	return l, nil
}

// resplit moves the split point after the holder's cursor moved from the
// one the stealer counted from to cursor: the lock waited for the holder's
// chunk in flight, which, with chunks about as big as ranges, may have
// passed the split point or most of the way to it. What it passed is
// counted (at most one of its chunks) and, where the holder would keep too
// little, the point is placed again halfway through what is left (a scan of
// about a chunk or two). The holder's next chunk waits meanwhile. It
// reports whether the split is still worth it.
func (r *runner) resplit(ctx context.Context, q querier, c stealCandidate, cursor []string, s *split) (bool, error) {
	src := r.sh.spec.Source.sql()
	var args []any
	var passed int64
	if err := q.QueryRow(ctx, `SELECT count(*) FROM `+src+` WHERE `+r.sh.where(c.cursor, cursor, &args, ""), args...).Scan(&passed); err != nil {
		return false, err
	}
	left := s.left - passed
	if left < 2*s.minHalf {
		return false, nil
	}
	if s.keep-passed >= max(left/4, s.minHalf) {
		// The holder keeps enough below the same point. The source decides
		// that it still has rows there, in the key's own type and collation.
		args = nil
		var ahead bool
		if err := q.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+src+` WHERE `+
			r.sh.where(cursor, s.mid, &args, "")+`)`, args...).Scan(&ahead); err != nil {
			return false, err
		}
		s.keep -= passed
		return ahead, nil
	}
	s.keep = left / 2
	sql, args := r.sh.boundarySQL(cursor, c.hi, int(s.keep))
	var mid []string
	if err := q.QueryRow(ctx, sql, args...).Scan(&mid); err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return false, nil // rows went away meanwhile
		}
		return false, err
	}
	if slices.Equal(mid, c.hi) {
		return false, nil
	}
	s.mid, s.rest = mid, left-s.keep
	if s.capped {
		s.rest = -1
	}
	return true, nil
}
