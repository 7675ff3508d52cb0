package cdc_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/dimmertest"
)

// valuesTable has a column of most built-in types and a two-column key;
// %s is an extra column (an enum, which has no built-in binary form) or
// nothing. The target (valuesTarget) takes some columns by assignment
// casts: smallint into integer, real into double precision, varchar into
// text.
const (
	valuesTable = `CREATE TABLE %s (id int, k2 text, v int NOT NULL, i2 smallint, i8 bigint, num numeric, f8 float8, f4 real,
	b boolean, ts timestamptz, d date, u uuid, j jsonb, by bytea, vc varchar(20), iv interval, big text%s, PRIMARY KEY (id, k2))`
	valuesTarget = `CREATE TABLE %s (id int, k2 text, v int NOT NULL, i2 int, i8 bigint, num numeric, f8 float8, f4 float8,
	b boolean, ts timestamptz, d date, u uuid, j jsonb, by bytea, vc text, iv interval, big text%s, PRIMARY KEY (id, k2))`
	valuesDump = `SELECT (id, k2, v, i2::int, i8, num, f8, f4::real, b, ts, d, u, j, by, vc::text, iv, md5(big)%s)::text FROM %s ORDER BY id, k2`
	valuesRow  = `INSERT INTO %s (id, k2, v, i2, i8, num, f8, f4, b, ts, d, u, j, by, vc, iv, big%s) VALUES
	($1::int, 'k' || $1::int, 1, -32768, -9223372036854775808, 12345678901234567890.000123, 'NaN', 1.1, true, '2026-12-05 06:01:02.123456+00',
	 '1999-12-31', ('6f1c2b4a-0000-4000-8000-00000000000' || ($1::int %% 10))::uuid, '{"a": [1, 2.5, "x"], "b": {"c": null}}', '\x00ff00',
	 'ünïcødé ' || $1::int,  '1 year 2 mons 3 days 04:05:06.7', repeat(md5($1::int::text), 200)%s),
	($1::int + 1, 'zero', 2, 0, 0, 'NaN', '-Infinity', -0.0, false, 'infinity', '-infinity', NULL, 'null', '', '', '-1 day', ''%s),
	($1::int + 2, 'nulls', 3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL%s)`
)

// textValuesIf makes a sync read text values when text is set, as it does
// for a type without a built-in binary form.
func textValuesIf(text bool) func(*cdc.Sync) {
	return func(s *cdc.Sync) {
		if text {
			cdc.TextValues(s)
		}
	}
}

// Values of every form reach the target unchanged, read in binary (the
// default for built-in types), in text (forced, as for a type without a
// built-in binary form) and in text because a column is an enum: through
// inserts, updates leaving a TOASTed value unchanged, deletes,
// key changes and NULLs.
func TestSyncValueForms(t *testing.T) {
	t.Parallel()
	srcURL, src := logicalDB(t)
	dst := dimmertest.Pool(t, dimmertest.Database(t))
	ctx := tctx(t, 3*time.Minute)
	for _, db := range []*pgxpool.Pool{src, dst} {
		_, err := db.Exec(ctx, `CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')`)
		require.NoError(t, err)
	}
	for _, c := range []struct {
		name      string
		text      bool
		enum      bool
		extraRows string
	}{{name: "binary"}, {name: "text", text: true}, {name: "enum", enum: true}} {
		t.Run(c.name, func(t *testing.T) {
			tbl := "vals_" + c.name
			extraCol, extraVal, extraDump := "", "", ""
			if c.enum {
				extraCol, extraVal, extraDump = ", m mood", ", 'happy'", ", m"
			}
			ins := func(id int) {
				t.Helper()
				x := extraVal
				if x != "" {
					x = ", NULL"
				}
				_, err := src.Exec(ctx, fmt.Sprintf(valuesRow, tbl, extraDump, extraVal, x, x), id)
				require.NoError(t, err)
			}
			_, err := src.Exec(ctx, fmt.Sprintf(valuesTable, tbl, extraCol))
			require.NoError(t, err)
			_, err = dst.Exec(ctx, fmt.Sprintf(valuesTarget, tbl, extraCol))
			require.NoError(t, err)
			// The initial copy is package backfill's; rows here come
			// from the stream.
			s, _, _ := runSync(t, srcURL, src, dst, cdc.SyncConfig{Name: dimmertest.Name("vals_"), Source: backfill.Table{Name: tbl},
				Target: backfill.Table{Name: tbl}, VersionColumn: "v", Logger: quiet(t)}, textValuesIf(c.text))
			require.Eventually(t, s.Streaming, time.Minute, 10*time.Millisecond)
			require.Equal(t, c.name == "binary", cdc.BinaryValues(s))
			for id := 10; id < 100; id += 10 {
				ins(id)
			}
			for _, q := range []string{
				`UPDATE %s SET v = v + 1, i8 = i8 + 1, num = -num WHERE id = 10`, // big unchanged (TOAST)
				`UPDATE %s SET v = v + 1, by = NULL, j = '[]', ts = NULL WHERE id = 20`,
				`DELETE FROM %s WHERE id IN (30, 31, 32)`,
				`UPDATE %s SET k2 = 'moved', v = v + 1 WHERE id = 40`, // the key changes
				`UPDATE %s SET id = 1000, v = v + 1 WHERE id = 41`,
				`UPDATE %s SET v = v + 1, i2 = 7, f4 = 3.25, vc = 'x' WHERE id = 52`,
			} {
				_, err := src.Exec(ctx, fmt.Sprintf(q, tbl))
				require.NoError(t, err)
			}
			require.NoError(t, s.CaughtUp(ctx, src))
			dumpOf := func(db *pgxpool.Pool) []string {
				rows, err := db.Query(ctx, fmt.Sprintf(valuesDump, extraDump, tbl))
				require.NoError(t, err)
				out, err := pgx.CollectRows(rows, pgx.RowTo[string])
				require.NoError(t, err)
				return out
			}
			want := dumpOf(src)
			require.Len(t, want, 3*9-3)
			require.Equal(t, want, dumpOf(dst))
		})
	}
}

// A Go sink gets the same Go values whether the sync reads them in binary
// or in text.
func TestSyncSinkValuesBinaryAndText(t *testing.T) {
	t.Parallel()
	srcURL, src := logicalDB(t)
	ctx := tctx(t, 2*time.Minute)
	_, err := src.Exec(ctx, fmt.Sprintf(valuesTable, "sv", ""))
	require.NoError(t, err)
	got := map[bool][]cdc.Change{}
	var mu sync.Mutex
	var syncs []*cdc.Sync
	for _, text := range []bool{false, true} {
		s, _, _ := runSync(t, srcURL, src, nil, cdc.SyncConfig{Name: dimmertest.Name("sv_"), Source: backfill.Table{Name: "sv"}, VersionColumn: "v",
			Logger: quiet(t), Sink: func(_ context.Context, cs []cdc.Change) error {
				mu.Lock()
				defer mu.Unlock()
				for _, c := range cs {
					if c.Op != cdc.OpCopy {
						got[text] = append(got[text], c)
					}
				}
				return nil
			}}, textValuesIf(text))
		require.Eventually(t, s.Streaming, time.Minute, 10*time.Millisecond)
		require.Equal(t, !text, cdc.BinaryValues(s))
		syncs = append(syncs, s)
	}
	_, err = src.Exec(ctx, fmt.Sprintf(valuesRow, "sv", "", "", "", ""), 1)
	require.NoError(t, err)
	for _, s := range syncs {
		require.NoError(t, s.CaughtUp(ctx, src))
	}
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, got[false], 3)
	require.Len(t, got[true], 3)
	for i := range got[false] {
		bin, txt := got[false][i].Row, got[true][i].Row
		require.Equal(t, len(txt), len(bin))
		for k, tv := range txt {
			switch k {
			case "f8", "f4", "num": // NaN is not equal to itself; numeric's digits may be grouped differently
				assert.Equal(t, fmt.Sprint(tv), fmt.Sprint(bin[k]), "row %d column %s", i, k)
			default:
				assert.Equal(t, tv, bin[k], "row %d column %s", i, k)
			}
		}
	}
}

// A source whose sessions print dates day first and intervals in SQL
// style: values reach a target that reads month first unchanged, read in
// binary or in text (the sync pins the text formats of its replication
// session).
func TestSyncValuesUnderSourceDateStyle(t *testing.T) {
	t.Parallel()
	srcURL, src := logicalDB(t)
	ctx := tctx(t, 2*time.Minute)
	srcURL += "&options=-c%20DateStyle%3DSQL%2CDMY%20-c%20IntervalStyle%3Dsql_standard%20-c%20extra_float_digits%3D-3"
	for _, text := range []bool{false, true} {
		tbl := fmt.Sprintf("ds_%v", text)
		_, err := src.Exec(ctx, `SET DateStyle = 'ISO, MDY'; CREATE TABLE `+tbl+` (id int PRIMARY KEY, v int NOT NULL, d date, ts timestamp, tz timestamptz, iv interval, f float8);
CREATE TABLE `+tbl+`_copy (LIKE `+tbl+` INCLUDING ALL)`)
		require.NoError(t, err)
		name := dimmertest.Name("ds_")
		s, err := cdc.NewSync(srcURL, src, cdc.SyncConfig{Name: name, Source: backfill.Table{Name: tbl}, Target: backfill.Table{Name: tbl + "_copy"},
			VersionColumn: "v", Logger: quiet(t)})
		require.NoError(t, err)
		if text {
			cdc.TextValues(s)
		}
		runCtx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- s.Run(runCtx) }()
		require.Eventually(t, s.Streaming, time.Minute, 10*time.Millisecond)
		_, err = src.Exec(ctx, `INSERT INTO `+tbl+` VALUES (1, 1, '2026-12-05', '2026-12-05 01:02:03.5', '2026-12-05 01:02:03.5+02', '1 day -02:00:00.25', 0.1),
	(2, 1, '0044-03-15 BC', '1999-01-02', 'epoch', '-1 year 2 mons', 1e-300)`)
		require.NoError(t, err)
		require.NoError(t, s.CaughtUp(ctx, src))
		q := `SELECT (id, d, ts, tz, iv, f)::text FROM %s ORDER BY id`
		want, got := dumpWith(t, src, fmt.Sprintf(q, tbl)), dumpWith(t, src, fmt.Sprintf(q, tbl+"_copy"))
		require.Len(t, want, 2)
		require.Equal(t, want, got, "text form: %v", text)
		cancel()
		require.ErrorIs(t, <-done, context.Canceled)
		require.NoError(t, cdc.DropSlot(context.Background(), src, "", name, true))
	}
}

func dumpWith(t *testing.T, db *pgxpool.Pool, q string) []string {
	rows, err := db.Query(tctx(t, 30*time.Second), q)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return out
}
