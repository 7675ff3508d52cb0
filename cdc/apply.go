package cdc

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// applier writes a batch of stream changes to the sync's destination.
type applier struct {
	s       *Sync
	sh      *tableShape
	types   map[string]string // target column -> its type, for casts from text
	upserts map[string]string // by the sorted list of columns written
	// conn, when set, is where the changes go: the open target transaction
	// of a source transaction streamed while in progress. Else the target
	// pool.
	conn *pgx.Conn
	buf  []byte // the parameters of the statement being sent
}

func (s *Sync) newApplier(ctx context.Context, sh *tableShape) (*applier, error) {
	a := &applier{s: s, sh: sh, upserts: map[string]string{}, types: map[string]string{}}
	if s.cfg.Sink != nil {
		return a, nil
	}
	rows, err := s.target.Query(ctx, `SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped`, a.target())
	if err != nil {
		return nil, fmt.Errorf("cdc: sync %s: target %s: %w", s.cfg.Name, a.target(), err)
	}
	var name, typ string
	if _, err := pgx.ForEachRow(rows, []any{&name, &typ}, func() error { a.types[name] = typ; return nil }); err != nil {
		return nil, fmt.Errorf("cdc: sync %s: target %s: %w", s.cfg.Name, a.target(), err)
	}
	for _, c := range sh.cols {
		if _, ok := a.types[c.name]; !ok {
			return nil, badConfig("Target", "%s has no column %q (synced from %s)", a.target(), c.name, sh.qualified)
		}
	}
	return a, nil
}

func (a *applier) target() string { return a.s.targetName() }

func (s *Sync) targetName() string {
	t := s.cfg.Target
	if t.Schema == "" {
		return pgx.Identifier{t.Name}.Sanitize()
	}
	return pgx.Identifier{t.Schema, t.Name}.Sanitize()
}

// checkTarget refuses a target table that cannot take the synced rows: it
// is missing, lacks a synced column, cannot hold a column's type (a
// [*ColumnTypeError]) or has no unique index on the key to upsert by.
func (s *Sync) checkTarget(ctx context.Context, sh *tableShape) error {
	name := s.targetName()
	var qualified *string
	err := s.target.QueryRow(ctx, `SELECT to_regclass($1)::text`, name).Scan(&qualified)
	if err != nil {
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "3F000" {
			return fmt.Errorf("cdc: sync %s: look up target %s: %w", s.cfg.Name, name, err)
		}
	}
	if qualified == nil {
		return fmt.Errorf("%w: target %s (of sync %s)", ErrNoTable, name, s.cfg.Name)
	}
	srcTypes := make([]string, len(sh.cols))
	names := make([]string, len(sh.cols))
	for i, c := range sh.cols {
		names[i], srcTypes[i] = c.name, c.typ
	}
	// For each synced column: the target's column type, and whether a
	// value of the source's type (looked up by name in the target's
	// database) is assignable to it.
	rows, err := s.target.Query(ctx, `
SELECT c.name, a.attname IS NOT NULL, coalesce(format_type(a.atttypid, a.atttypmod), ''),
	coalesce(src.t = base.oid OR t.typcategory = 'S'
		OR EXISTS (SELECT 1 FROM pg_cast k WHERE k.castsource = src.t AND k.casttarget = base.oid AND k.castcontext IN ('i', 'a')), false)
FROM unnest($2::text[], $3::text[]) AS c(name, srctype)
LEFT JOIN pg_attribute a ON a.attrelid = $1::regclass AND a.attname = c.name AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type base ON base.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
LEFT JOIN LATERAL (SELECT to_regtype(c.srctype)::oid AS t) src ON true`, *qualified, names, srcTypes)
	if err != nil {
		return fmt.Errorf("cdc: sync %s: target %s: %w", s.cfg.Name, *qualified, err)
	}
	var col, typ string
	var exists, ok bool
	var bad error
	_, err = pgx.ForEachRow(rows, []any{&col, &exists, &typ, &ok}, func() error {
		if bad != nil {
			return nil
		}
		src, _ := sh.col(col)
		switch {
		case !exists:
			bad = badConfig("Target", "%s has no column %q (synced from %s)", *qualified, col, sh.qualified)
		case !ok:
			bad = &ColumnTypeError{Table: *qualified, Column: col, SourceType: src.typ, TargetType: typ}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("cdc: sync %s: target %s: %w", s.cfg.Name, *qualified, err)
	}
	if bad != nil {
		return bad
	}
	var keyed bool
	if err := s.target.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = $1::regclass AND i.indisunique
	AND i.indpred IS NULL AND i.indexprs IS NULL
	AND (SELECT array_agg(a.attname::text COLLATE "C" ORDER BY a.attname::text COLLATE "C") FROM pg_attribute a
	     WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey))
	    = (SELECT array_agg(k COLLATE "C" ORDER BY k COLLATE "C") FROM unnest($2::text[]) k))`, *qualified, sh.key).Scan(&keyed); err != nil {
		return fmt.Errorf("cdc: sync %s: target %s: %w", s.cfg.Name, *qualified, err)
	}
	if !keyed {
		return badConfig("Target", "%s has no unique index on exactly the key (%s) to upsert by", *qualified, strings.Join(sh.key, ", "))
	}
	return nil
}

func (a *applier) truncate(ctx context.Context, commit time.Time) error {
	if a.s.cfg.Sink != nil {
		return a.s.cfg.Sink(ctx, []Change{{Op: OpTruncate, CommitTime: commit}})
	}
	if err := a.exec(ctx, `TRUNCATE `+a.target(), nil, nil); err != nil {
		return fmt.Errorf("cdc: sync %s: truncate %s: %w", a.s.cfg.Name, a.target(), err)
	}
	return nil
}

// merged is the net effect of a batch's changes on one key.
type merged struct {
	deleteFirst bool // a delete came before the final upsert: remove the old row, whatever its version
	last        change
	upsert      bool
}

// apply writes a batch. A Go sink gets the changes as they came; a target
// table gets each key's net effect: deletes by key, then version-guarded
// upserts grouped by the columns they carry (an update's unchanged TOAST
// columns are left out, so the target keeps its value).
func (a *applier) apply(ctx context.Context, batch []change) error {
	if a.s.cfg.Sink != nil {
		cs := make([]Change, len(batch))
		for i, c := range batch {
			cs[i] = c.Change
		}
		if err := a.s.cfg.Sink(ctx, cs); err != nil {
			return fmt.Errorf("cdc: sync %s: sink: %w", a.s.cfg.Name, err)
		}
		return nil
	}
	// A change of key moves the row in place (so the columns an update left
	// unchanged keep their values): what comes before it is applied first.
	for {
		i := slices.IndexFunc(batch, func(c change) bool { return c.moveFrom != nil })
		if i < 0 {
			return a.applyNet(ctx, batch)
		}
		if err := a.applyNet(ctx, batch[:i]); err != nil {
			return err
		}
		if err := a.move(ctx, batch[i]); err != nil {
			return err
		}
		rest := slices.Clone(batch[i:])
		rest[0].moveFrom = nil
		batch = rest
	}
}

// move re-keys the row of c's old key to its new key, unless a row holds
// the new key already (a replay after the move was applied).
func (a *applier) move(ctx context.Context, c change) error {
	var cols, olds, news []string
	var args [][]byte
	var oids []uint32
	for i, k := range a.sh.key {
		col, _ := a.sh.col(k)
		id := pgx.Identifier{k}.Sanitize()
		cols = append(cols, id)
		args = append(args, c.moveFrom[i].data, c.vals[col.idx].data)
		oid, cast := uint32(textOID), "::text::"+col.typ
		if a.sh.binary {
			oid, cast = col.oid, ""
		}
		oids = append(oids, oid, oid)
		olds = append(olds, fmt.Sprintf("$%d%s", 2*i+1, cast))
		news = append(news, fmt.Sprintf("$%d%s", 2*i+2, cast))
	}
	tuple := func(xs []string) string { return "(" + strings.Join(xs, ", ") + ")" }
	q := `UPDATE ` + a.target() + ` SET ` + tuple(cols) + ` = ROW` + tuple(news) + ` WHERE ` + tuple(cols) + ` = ` + tuple(olds) +
		` AND NOT EXISTS (SELECT 1 FROM ` + a.target() + ` WHERE ` + tuple(cols) + ` = ` + tuple(news) + `)`
	if err := a.exec(ctx, q, args, oids); err != nil {
		return fmt.Errorf("cdc: sync %s: move a row of %s to a new key: %w", a.s.cfg.Name, a.target(), err)
	}
	return nil
}

// applyNet writes each key's net effect of batch (which has no change of
// key).
func (a *applier) applyNet(ctx context.Context, batch []change) error {
	if len(batch) == 0 {
		return nil
	}
	net := make(map[string]*merged, len(batch))
	order := make([]*merged, 0, len(batch))
	for _, c := range batch {
		m, ok := net[c.key]
		if !ok {
			m = &merged{}
			net[c.key] = m
			order = append(order, m)
		}
		switch c.Op {
		case OpDelete:
			m.deleteFirst, m.upsert = true, false
			m.last = c
		default:
			if m.upsert && len(c.Unchanged) > 0 {
				// An earlier change of this batch carries the value the
				// update left unchanged.
				vals := slices.Clone(c.vals)
				if c.Row != nil {
					c.Row = maps.Clone(c.Row)
				}
				var still []string
				for _, u := range c.Unchanged {
					col, _ := a.sh.col(u)
					if v := m.last.vals[col.idx]; v.set {
						vals[col.idx] = v
						if c.Row != nil {
							c.Row[u] = m.last.Row[u]
						}
					} else {
						still = append(still, u)
					}
				}
				c.vals, c.Unchanged = vals, still
			}
			m.last, m.upsert = c, true
		}
	}
	var dels []*change
	// Upserts are grouped by the columns they carry (a bit per synced
	// column), one statement per group.
	groups := map[string][]*change{}
	var sigs []string
	sig := make([]byte, (len(a.sh.cols)+7)/8)
	for _, m := range order {
		if m.deleteFirst {
			dels = append(dels, &m.last)
		}
		if !m.upsert {
			continue
		}
		clear(sig)
		for i, v := range m.last.vals {
			if v.set {
				sig[i/8] |= 1 << (i % 8)
			}
		}
		g, ok := groups[string(sig)]
		if !ok {
			sigs = append(sigs, string(sig))
		}
		groups[string(sig)] = append(g, &m.last)
	}
	if len(dels) > 0 {
		if err := a.deleteKeys(ctx, dels); err != nil {
			return err
		}
	}
	for _, sig := range sigs {
		cs := groups[sig]
		var idx []int
		for i := range a.sh.cols {
			if sig[i/8]&(1<<(i%8)) != 0 {
				idx = append(idx, i)
			}
		}
		q, err := a.upsertSQL(sig, idx)
		if err != nil {
			return err
		}
		args, oids := a.arrays(idx, len(cs), func(row, ci int) colVal { return cs[row].vals[ci] })
		if err := a.exec(ctx, q, args, oids); err != nil {
			return fmt.Errorf("cdc: sync %s: apply to %s: %w", a.s.cfg.Name, a.target(), err)
		}
	}
	return nil
}

// upsertSQL is one statement upserting rows given as text arrays, one per
// column, cast to the target's types, under the version guard.
func (a *applier) upsertSQL(sig string, idx []int) (string, error) {
	if q, ok := a.upserts[sig]; ok {
		return q, nil
	}
	cols := make([]string, len(idx))
	for i, ci := range idx {
		cols[i] = a.sh.cols[ci].name
	}
	for _, k := range append(slices.Clone(a.sh.key), a.s.cfg.VersionColumn) {
		if !slices.Contains(cols, k) {
			return "", fmt.Errorf("cdc: sync %s: a change of %s lacks column %q (an unchanged TOAST value of a key or version column?)", a.s.cfg.Name, a.sh.qualified, k)
		}
	}
	var names, sel, params, aliases, sets, keys []string
	for i, c := range cols {
		id := pgx.Identifier{c}.Sanitize()
		names = append(names, id)
		sel = append(sel, fmt.Sprintf("u.c%d::%s", i, a.types[c]))
		params = append(params, fmt.Sprintf("$%d", i+1))
		aliases = append(aliases, fmt.Sprintf("c%d", i))
		if !slices.Contains(a.sh.key, c) {
			sets = append(sets, id+" = EXCLUDED."+id)
		}
	}
	for _, k := range a.sh.key {
		keys = append(keys, pgx.Identifier{k}.Sanitize())
	}
	v := pgx.Identifier{a.s.cfg.VersionColumn}.Sanitize()
	q := `INSERT INTO ` + a.target() + ` AS t (` + strings.Join(names, ", ") + `) SELECT ` + strings.Join(sel, ", ") +
		` FROM unnest(` + strings.Join(params, ", ") + `) AS u(` + strings.Join(aliases, ", ") + `)
ON CONFLICT (` + strings.Join(keys, ", ") + `) DO `
	if len(sets) == 0 {
		q += `NOTHING`
	} else {
		q += `UPDATE SET ` + strings.Join(sets, ", ") + ` WHERE t.` + v + ` IS NULL OR t.` + v + ` <= EXCLUDED.` + v
	}
	a.upserts[sig] = q
	return q, nil
}

func (a *applier) deleteKeys(ctx context.Context, dels []*change) error {
	n := len(a.sh.key)
	idx := make([]int, n)
	var sel, cols []string
	for i, k := range a.sh.key {
		col, _ := a.sh.col(k)
		idx[i] = col.idx
		sel = append(sel, fmt.Sprintf("u.c%d::%s", i, col.typ))
		cols = append(cols, pgx.Identifier{k}.Sanitize())
	}
	arrays, oids := a.arrays(idx, len(dels), func(row, ci int) colVal { return dels[row].vals[ci] })
	var params, names []string
	for i := range n {
		params = append(params, fmt.Sprintf("$%d", i+1))
		names = append(names, fmt.Sprintf("c%d", i))
	}
	q := `DELETE FROM ` + a.target() + ` WHERE (` + strings.Join(cols, ", ") + `) IN (SELECT ` + strings.Join(sel, ", ") +
		` FROM unnest(` + strings.Join(params, ", ") + `) AS u(` + strings.Join(names, ", ") + `))`
	if err := a.exec(ctx, q, arrays, oids); err != nil {
		return fmt.Errorf("cdc: sync %s: delete from %s: %w", a.s.cfg.Name, a.target(), err)
	}
	return nil
}

// arrays makes one array parameter per synced column in idx, of n rows:
// the values as the server sent them, as elements of the column's type
// (binary) or of text, in PostgreSQL's binary array format.
func (a *applier) arrays(idx []int, n int, val func(row, col int) colVal) ([][]byte, []uint32) {
	args := make([][]byte, len(idx))
	oids := make([]uint32, len(idx))
	b := a.buf[:0]
	ends := make([]int, len(idx))
	for i, ci := range idx {
		elem, arr := uint32(textOID), uint32(textArrayOID)
		if a.sh.binary {
			elem, arr = a.sh.cols[ci].oid, a.sh.cols[ci].arrayOID
		}
		oids[i] = arr
		b = appendArray(b, elem, n, func(row int) ([]byte, bool) {
			v := val(row, ci)
			return v.data, v.null
		})
		ends[i] = len(b)
	}
	start := 0
	for i, end := range ends {
		args[i] = b[start:end:end]
		start = end
	}
	a.buf = b
	return args, oids
}

// exec runs sql with parameters in binary format (args of types oids) on
// the applier's connection, or one of the target pool's.
func (a *applier) exec(ctx context.Context, sql string, args [][]byte, oids []uint32) error {
	formats := make([]int16, len(args))
	for i := range formats {
		formats[i] = pgtype.BinaryFormatCode
	}
	run := func(pc *pgconn.PgConn) error {
		_, err := pc.ExecParams(ctx, sql, args, oids, formats, nil).Close()
		return err
	}
	if a.conn != nil {
		return run(a.conn.PgConn())
	}
	return a.s.target.AcquireFunc(ctx, func(c *pgxpool.Conn) error { return run(c.Conn().PgConn()) })
}

// ErrOppositeSync: a table sync was started while another sync streams
// the other way between the same two tables (a reverse sync while the
// forward one still runs, or the other way round). pgoutput as dimmer
// reads it does not filter a sync's own writes by origin (PostgreSQL 15
// cannot), so each sync would stream the other's writes back: stop the
// running one first.
var ErrOppositeSync = errors.New("cdc: a sync runs the other way between the same tables")

// directionLock is the first key of the advisory locks a running table
// sync holds on its target database.
const directionLock = "dimmer.cdc.sync"

// claimDirection marks, for as long as the sync runs, that it writes its
// target from its source: an advisory lock in the target database keyed
// by both tables' identities (server, database, table). It then refuses
// to run if the opposite sync holds the same mark in the source database.
// Both take their own mark before looking for the other's, so of two
// started at once at least one sees the other.
func (s *Sync) claimDirection(ctx context.Context, src *pgxpool.Pool, sh *tableShape) (*directionClaim, error) {
	srcID, srcName, err := tableIdentity(ctx, src, sh.qualified)
	if err != nil {
		return nil, fmt.Errorf("cdc: sync %s: source %s: %w", s.cfg.Name, sh.qualified, err)
	}
	dstID, dstName, err := tableIdentity(ctx, s.target, s.targetName())
	if err != nil {
		return nil, fmt.Errorf("cdc: sync %s: target %s: %w", s.cfg.Name, s.targetName(), err)
	}
	pc, err := s.target.Acquire(ctx)
	if err != nil {
		return nil, fmt.Errorf("cdc: sync %s: target: %w", s.cfg.Name, err)
	}
	// The mark lives as long as this session: the connection leaves the
	// pool, and closing it ends the mark (also if this process dies).
	claim := &directionClaim{conn: pc.Hijack()}
	release := claim.release
	var got bool
	if err := claim.conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))`, directionLock, dstID+" <- "+srcID).Scan(&got); err != nil {
		release()
		return nil, fmt.Errorf("cdc: sync %s: mark the target: %w", s.cfg.Name, err)
	}
	// Not got: a sync of this same direction runs (its slot will say it
	// is busy); not our concern here.
	var opposite bool
	err = pgx.BeginFunc(ctx, src, func(tx pgx.Tx) error {
		return tx.QueryRow(ctx, `SELECT NOT pg_try_advisory_xact_lock_shared(hashtext($1), hashtext($2))`, directionLock, srcID+" <- "+dstID).Scan(&opposite)
	})
	if err != nil {
		release()
		return nil, fmt.Errorf("cdc: sync %s: look for a sync the other way: %w", s.cfg.Name, err)
	}
	if opposite {
		release()
		return nil, fmt.Errorf("%w: sync %s would stream %s into %s while a sync streams %s into %s; without origin filtering (PostgreSQL 15's pgoutput has none) each would replay the other's writes: stop that sync first (after a cutover: stop the forward sync, then run the reverse one)",
			ErrOppositeSync, s.cfg.Name, srcName, dstName, dstName, srcName)
	}
	return claim, nil
}

// directionClaim is a running sync's mark (see claimDirection).
type directionClaim struct{ conn *pgx.Conn }

func (c *directionClaim) release() {
	if c != nil && c.conn != nil {
		_ = c.conn.Close(context.Background())
	}
}

// lost reports whether the mark's session ended (its connection broke):
// an idle connection's break shows only when it is used, so it is pinged.
func (c *directionClaim) lost(ctx context.Context) bool {
	if c == nil {
		return false
	}
	if c.conn == nil || c.conn.IsClosed() {
		return true
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return c.conn.Ping(ctx) != nil
}

// tableIdentity names a table across servers: id adds the server's
// system identifier (when readable) to name, the database and the
// qualified table.
func tableIdentity(ctx context.Context, db *pgxpool.Pool, table string) (id, name string, err error) {
	var sys string
	if err := db.QueryRow(ctx, `SELECT system_identifier::text FROM pg_control_system()`).Scan(&sys); err != nil {
		sys = "" // not readable by this role: the database and table still tell
	}
	err = db.QueryRow(ctx, `SELECT current_database() || '/' || format('%I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::regclass`, table).Scan(&name)
	return sys + "/" + name, name, err
}
