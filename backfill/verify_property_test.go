package backfill_test

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
)

// corruption changes one column of one target row to a value chosen
// against the ways a checksum goes wrong. equal marks values SQL equality
// takes for the same (EXCEPT sees no row) although they are spelled
// differently; verification reports those too.
type corruption struct {
	col, to string
	// from, when set, is the source value the row gets first (both sides).
	from  string
	equal bool
}

// TestVerifyHasNoFalseNegative corrupts, one at a time, a value of every
// column type the backfill copies and checks verify's verdict against
// EXCEPT in both directions: whenever EXCEPT shows a row, verification
// fails and names the row's key; on the clean copy it passes.
func TestVerifyHasNoFalseNegative(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	exec(t, e.pool, `CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)`)
	const cols = `k1 text COLLATE "en-x-icu" NOT NULL, k2 int NOT NULL,
	j json, jb jsonb, ia int[], ta text[], jba jsonb[], n numeric, n2 numeric(10,3), f8 float8, f4 float4,
	ts timestamp, tz timestamptz, iv interval, by bytea, tc text COLLATE "C", tde text COLLATE "de-x-icu", tci text COLLATE ci,
	u uuid, b bool, version bigint NOT NULL, PRIMARY KEY (k1, k2)`
	exec(t, e.pool, `CREATE TABLE src (`+cols+`)`)
	exec(t, e.pool, `CREATE TABLE dst (`+cols+`)`)
	rng := rand.New(rand.NewPCG(12, 9))
	const rows = 60
	for i := range rows {
		exec(t, e.pool, `INSERT INTO src VALUES ($1, $2, $3::json, $4::jsonb, $5::int[], $6::text[], $7::jsonb[], $8::numeric, $8::numeric, $9::float8, $9::float8,
	timestamp '2024-02-29 12:00:00' + $10::int8 * interval '1 microsecond', timestamptz '2024-02-29 12:00:00+00' + $10::int8 * interval '1 microsecond',
	$10::int8 * interval '1 second', $11::bytea, $12::text, $12::text, $12::text, gen_random_uuid(), $13, 1)`,
			[]string{"a", "B", "ä", "z", "Ab", ""}[i%6]+fmt.Sprint(i/6), rng.IntN(3)-1,
			fmt.Sprintf(`{"a": %d, "b": [1, null]}`, i), fmt.Sprintf(`{"x": %d}`, i),
			fmt.Sprintf("{%d,NULL,3}", i), `{"x",NULL,""}`, `{"{\"a\": 1}",NULL}`,
			fmt.Sprintf("%d.%02d", i, i%100), rng.Float64()*1000, rng.Int64N(1e12), fmt.Sprintf(`\x%02x00`, i), fmt.Sprintf("text %d é", i), i%2 == 0)
	}
	j := backfill.Job{Name: "types", Migration: "orders",
		Spec:   backfill.Spec{Source: backfill.Table{Name: "src"}, Target: backfill.Table{Name: "dst"}, Key: []string{"k1", "k2"}, VersionColumn: "version"},
		Config: backfill.Config{PollInterval: 50 * time.Millisecond}}
	_, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	opts := backfill.VerifyOptions{ChunkRows: 16, RecheckDelay: time.Millisecond}
	v, err := e.bf.Verify(tctx(t), j, opts)
	require.NoError(t, err)
	require.True(t, v.OK, "the clean copy verifies: %v", v.Problems)

	// EXCEPT needs equality, which json lacks: json is compared as the
	// text it is (key order, whitespace and duplicate keys matter), and
	// json[] would be too.
	const sel = `k1, k2, j::text, jb, ia, ta, jba, n, n2, f8, f4, ts, tz, iv, by, tc, tde, tci, u, b, version`
	except := func() int64 {
		return count(t, e.pool, `SELECT (SELECT count(*) FROM (SELECT `+sel+` FROM src EXCEPT ALL SELECT `+sel+` FROM dst) a)
	+ (SELECT count(*) FROM (SELECT `+sel+` FROM dst EXCEPT ALL SELECT `+sel+` FROM src) b)`)
	}
	cases := []corruption{
		{col: "jb", from: `'null'`, to: `NULL`},
		{col: "jb", from: `NULL`, to: `'null'`},
		{col: "jb", to: `'{"x": "1"}'`},
		{col: "jb", from: `'{"x": 1}'`, to: `'{"x": 1.0}'`, equal: true},
		{col: "j", from: `'{"a": 1, "b": 2}'`, to: `'{"b": 2, "a": 1}'`},
		{col: "j", from: `'{"a": 1}'`, to: `'{"a":1}'`},
		{col: "j", from: `'{"a": 1}'`, to: `'{"a": 1, "a": 1}'`},
		{col: "j", from: `'null'`, to: `NULL`},
		{col: "ia", from: `'{1,NULL}'`, to: `'{1}'`},
		{col: "ia", from: `'{NULL}'`, to: `'{}'`},
		{col: "ia", from: `'{1,2}'`, to: `'[0:1]={1,2}'`},
		{col: "ia", from: `'{{1,2},{3,4}}'`, to: `'{1,2,3,4}'`},
		{col: "ia", from: `'{}'`, to: `NULL`},
		{col: "ta", from: `'{NULL}'`, to: `'{"NULL"}'`},
		{col: "ta", from: `'{""}'`, to: `'{}'`},
		{col: "jba", from: `ARRAY[NULL]::jsonb[]`, to: `ARRAY['null']::jsonb[]`},
		{col: "n", from: `1.5`, to: `1.50`, equal: true},
		{col: "n", from: `1.5`, to: `1.5000000000000000000001`},
		{col: "n", from: `'NaN'`, to: `0`},
		{col: "n2", from: `1.001`, to: `1.002`},
		{col: "f8", from: `0.3`, to: `0.1::float8 + 0.2::float8`},
		{col: "f8", from: `'NaN'`, to: `'Infinity'`},
		{col: "f8", from: `0`, to: `'-0'`, equal: true},
		{col: "f8", from: `'NaN'`, to: `NULL`},
		{col: "f4", from: `1`, to: `1.0000001`},
		{col: "ts", to: `ts + interval '1 microsecond'`},
		{col: "tz", to: `tz + interval '1 microsecond'`},
		{col: "tz", from: `'infinity'`, to: `'-infinity'`},
		{col: "iv", from: `interval '1 day'`, to: `interval '24 hours'`, equal: true},
		{col: "iv", to: `iv + interval '1 microsecond'`},
		{col: "by", from: `'\x00'`, to: `'\x0000'`},
		{col: "by", from: `''`, to: `NULL`},
		{col: "tc", from: `'x'`, to: `'x '`},
		{col: "tc", from: `''`, to: `NULL`},
		{col: "tc", from: `'null'`, to: `NULL`},
		{col: "tde", from: `'é'`, to: `e'e\u0301'`},
		{col: "tde", from: `'straße'`, to: `'strasse'`},
		{col: "tci", from: `'a'`, to: `'A'`, equal: true},
		{col: "tci", from: `'a'`, to: `'b'`},
		{col: "u", to: `gen_random_uuid()`},
		{col: "b", to: `NOT b`},
		{col: "b", from: `false`, to: `NULL`},
		{col: "version", to: `version - 1`},
		{col: "k2", to: `k2 + 10`},
		{col: "k1", to: `k1 || ' '`},
	}
	for i, c := range cases {
		var key1 string
		var key2 int
		require.NoError(t, e.pool.QueryRow(tctx(t), `SELECT k1, k2 FROM src ORDER BY k1, k2 OFFSET $1 LIMIT 1`, rng.IntN(rows)).Scan(&key1, &key2))
		if c.from != "" {
			exec(t, e.pool, `UPDATE src SET `+c.col+` = `+c.from+` WHERE (k1, k2) = ($1, $2)`, key1, key2)
			exec(t, e.pool, `UPDATE dst SET `+c.col+` = `+c.from+` WHERE (k1, k2) = ($1, $2)`, key1, key2)
			require.Zero(t, except(), "case %d: the row is equal before it is corrupted", i)
		}
		exec(t, e.pool, `UPDATE dst SET `+c.col+` = `+c.to+` WHERE (k1, k2) = ($1, $2)`, key1, key2)
		shows := except()
		v, err := e.bf.Verify(tctx(t), j, opts)
		require.NoError(t, err)
		switch {
		case shows > 0:
			assert.False(t, v.OK, "case %d: %s %s -> %s: EXCEPT shows %d rows, verify passed", i, c.col, c.from, c.to, shows)
		case !c.equal:
			t.Errorf("case %d: %s %s -> %s: the corruption did not change the row for EXCEPT", i, c.col, c.from, c.to)
		default:
			assert.False(t, v.OK, "case %d: %s %s -> %s: equal values spelled differently differ", i, c.col, c.from, c.to)
		}
		if !v.OK {
			var keys [][]string
			for _, r := range v.Ranges {
				keys = append(keys, r.Keys...)
			}
			assert.Contains(t, keys, []string{key1, fmt.Sprint(key2)}, "case %d names the key", i)
		}
		// Put the row back for the next case.
		exec(t, e.pool, `DELETE FROM dst WHERE (k1, k2) = ($1, $2) OR (k1, k2) NOT IN (SELECT k1, k2 FROM src)`, key1, key2)
		exec(t, e.pool, `INSERT INTO dst SELECT * FROM src WHERE (k1, k2) NOT IN (SELECT k1, k2 FROM dst)`)
		require.Zero(t, except(), "case %d restored", i)
	}
	v, err = e.bf.Verify(tctx(t), j, opts)
	require.NoError(t, err)
	assert.True(t, v.OK, "restored: %v", v.Problems)
}
