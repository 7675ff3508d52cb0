package backfill

import (
	"context"
	"fmt"
	"hash/fnv"
	"math/big"
	"slices"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Verification of a RedisSink reads the target back: for each chunk of
// the source, the rows are shaped as the copy shapes them (Exprs, the Go
// Transform), rendered as [RedisSink.Write] renders them, and compared
// with the hashes HGETALL returns, field by field, both sides hashed the
// same way. A differing key goes through the same looks as a Postgres
// target (in flight, lasting, newer in the target) and the same repair
// (the range written again; a key the source lacks deleted). Redis has no
// key order, so a hash whose source row never existed is not found: only
// keys the source has, or had at an earlier look, are compared.

// rendered is what Write stores for a row: field -> value.
func (s *RedisSink) rendered(r Row) map[string]string {
	m := map[string]string{}
	if v := r[s.spec.VersionColumn]; v != nil {
		m[s.spec.VersionColumn] = RedisValue(v)
	}
	for _, c := range s.columns() {
		if r[c] != nil {
			m[c] = RedisValue(r[c])
		}
	}
	return m
}

// fieldsHash hashes a hash's fields in name order, unambiguously.
func fieldsHash(m map[string]string) int64 {
	h := fnv.New64a()
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}) {
		fmt.Fprintf(h, "%d:%s%d:%s", len(k), k, len(m[k]), m[k])
	}
	return int64(h.Sum64())
}

// redisVersion reads a stored version field as a number (times are stored
// as Unix nanoseconds).
func redisVersion(s string) any {
	r, ok := new(big.Rat).SetString(s)
	if !ok {
		return s
	}
	return r
}

// sourceVersion is a source row's version as the sink compares it.
func sourceVersion(v any) any {
	if t, ok := v.(time.Time); ok {
		return t.UnixNano()
	}
	return v
}

// redisRow is one source row of a chunk, shaped for the sink.
type redisRow struct {
	key  []string
	row  Row // nil: the transform skips it (the sink holds nothing)
	hkey string
}

// readKeyed reads the source rows of (lo, hi] shaped for the sink, with
// their keys as text.
func (r *runner) readKeyed(ctx context.Context, lo, hi []string) ([]redisRow, error) {
	sql, args := r.sh.readSQL(lo, hi, 1<<30)
	rows, err := r.src.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("backfill: read %s: %w", r.j.Spec.Source, err)
	}
	defer rows.Close()
	fds := rows.FieldDescriptions()
	var out []redisRow
	for rows.Next() {
		vals, err := rows.Values()
		if err != nil {
			return nil, fmt.Errorf("backfill: read %s: %w", r.j.Spec.Source, err)
		}
		row := make(Row, len(vals)-1)
		for i, v := range vals[:len(vals)-1] {
			row[fds[i].Name] = writable(v, fds[i].DataTypeOID)
		}
		out = append(out, redisRow{key: toStrings(vals[len(vals)-1]), row: row})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("backfill: read %s: %w", r.j.Spec.Source, err)
	}
	for i := range out {
		if r.j.Transform != nil {
			t, err := r.j.Transform(ctx, out[i].row)
			if err != nil {
				return nil, fmt.Errorf("backfill: %s: transform: %w", r.j.Name, err)
			}
			out[i].row = t
		}
	}
	return out, nil
}

// keyRow stands for a key the source no longer has: the key columns as
// text, enough for the sink's key function.
func (r *runner) keyRow(key []string) Row {
	row := Row{}
	for i, k := range r.j.Spec.Key {
		row[k] = key[i]
	}
	return row
}

// lookRedis is look for a RedisSink target.
func (v *verifier) lookRedis(ctx context.Context, lo, hi []string, keys [][]string) ([]keyLook, int64, int64, error) {
	rs := v.rs
	src, err := v.r.readKeyed(ctx, lo, hi)
	if err != nil {
		return nil, 0, 0, err
	}
	byKey := map[string]int{}
	for i := range src {
		byKey[strings.Join(src[i].key, "\x00")] = i
	}
	type item struct {
		key  []string
		row  Row
		hkey string
	}
	var items []item
	if keys == nil {
		for _, s := range src {
			it := item{key: s.key, row: s.row}
			if s.row != nil {
				it.hkey = rs.key(s.row)
			} else {
				it.hkey = rs.key(v.r.keyRow(s.key))
			}
			items = append(items, it)
		}
	} else {
		for _, k := range keys {
			it := item{key: k}
			if i, ok := byKey[strings.Join(k, "\x00")]; ok {
				it.row = src[i].row
			}
			if it.row != nil {
				it.hkey = rs.key(it.row)
			} else {
				it.hkey = rs.key(v.r.keyRow(k))
			}
			items = append(items, it)
		}
	}
	p := rs.client.Pipeline()
	cmds := make([]*redis.MapStringStringCmd, len(items))
	for i, it := range items {
		cmds[i] = p.HGetAll(ctx, it.hkey)
	}
	if len(items) > 0 {
		if _, err := p.Exec(ctx); err != nil {
			return nil, 0, 0, fmt.Errorf("backfill: read back %s: %w", rs.Describe(), err)
		}
	}
	var out []keyLook
	var nSrc, nTgt int64
	for i, it := range items {
		k := keyLook{key: it.key}
		if it.row != nil {
			nSrc++
			m := rs.rendered(it.row)
			k.src = rowLook{present: true, hash: fieldsHash(m), version: sourceVersion(it.row[rs.spec.VersionColumn])}
		}
		if h := cmds[i].Val(); len(h) > 0 {
			nTgt++
			k.tgt = rowLook{present: true, hash: fieldsHash(h), version: redisVersion(h[rs.spec.VersionColumn])}
		}
		if keys != nil || !k.equal() {
			out = append(out, k)
		}
	}
	return out, nSrc, nTgt, nil
}

// recopyRedis writes the range's source rows again (version-guarded) and
// deletes the hashes of the differing keys the source lacks; the
// overwrite keys' hashes are deleted first, so the write replaces them.
func (v *verifier) recopyRedis(ctx context.Context, lo, hi []string, differing, overwrite [][]string) error {
	rs := v.rs
	src, err := v.r.readKeyed(ctx, lo, hi)
	if err != nil {
		return err
	}
	have := map[string]bool{}
	var rows []Row
	for _, s := range src {
		have[strings.Join(s.key, "\x00")] = s.row != nil
		if s.row != nil {
			rows = append(rows, s.row)
		}
	}
	var del []string
	for _, k := range differing {
		if !have[strings.Join(k, "\x00")] {
			del = append(del, rs.key(v.r.keyRow(k)))
		}
	}
	for _, k := range overwrite {
		i := slices.IndexFunc(src, func(s redisRow) bool { return slices.Equal(s.key, k) })
		if i >= 0 && src[i].row != nil {
			del = append(del, rs.key(src[i].row))
		}
	}
	if len(del) > 0 {
		if err := rs.client.Del(ctx, del...).Err(); err != nil {
			return fmt.Errorf("backfill: repair %s: %w", rs.Describe(), err)
		}
	}
	if err := rs.Write(ctx, rows); err != nil {
		return fmt.Errorf("backfill: repair %s: %w", rs.Describe(), err)
	}
	return nil
}
