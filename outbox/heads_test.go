package outbox

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The relay's queries are decoded column by column from raw bytes; a
// result that is not what the decoder expects must be refused by name,
// never read as something else.
func TestHeadDecoderRefusesUnexpectedRows(t *testing.T) {
	var d headDecoder
	fds := make([]pgconn.FieldDescription, len(headOIDs))
	for i := range fds {
		fds[i] = pgconn.FieldDescription{Name: "c", DataTypeOID: headOIDs[i], Format: pgtype.BinaryFormatCode}
	}
	require.NoError(t, d.check(fds))
	assert.ErrorContains(t, d.check(fds[:10]), "returned 10 columns, want 11")
	fds[8].DataTypeOID = pgtype.JSONOID
	assert.ErrorContains(t, d.check(fds), "column 8")
	fds[8].DataTypeOID, fds[10].Format = pgtype.JSONBOID, pgtype.TextFormatCode
	assert.ErrorContains(t, d.check(fds), "column 10")

	row := func() [][]byte {
		return [][]byte{
			{0, 0, 0, 7}, nil, {0, 0, 0, 0, 0, 0, 0, 42}, {1}, make([]byte, 16), []byte("key"),
			[]byte("topic"), []byte("payload"), nil, {0, 0, 0, 2}, make([]byte, 8),
		}
	}
	var rec Record
	var m headMeta
	require.NoError(t, d.decode(row(), &rec, &m))
	assert.Equal(t, headMeta{bucket: 7, lane: "key", ready: true}, m)
	assert.Equal(t, Record{Message: Message{Key: "key", Topic: "topic", Payload: []byte("payload")}, Seq: 42, Attempts: 2,
		CreatedAt: rec.CreatedAt}, rec)
	assert.Equal(t, "2000-01-01T00:00:00Z", rec.CreatedAt.UTC().Format("2006-01-02T15:04:05Z07:00"))

	for col, name := range map[int]string{0: "bucket", 2: "seq", 4: "id", 6: "topic", 7: "payload", 10: "created_at"} {
		v := row()
		v[col] = nil
		assert.ErrorContains(t, d.decode(v, &Record{}, &headMeta{}), name, "column %d missing", col)
	}
	for col, name := range map[int]string{0: "bucket", 2: "seq", 3: "ready", 4: "id", 9: "attempts", 10: "created_at"} {
		v := row()
		v[col] = append(v[col], 0)
		assert.ErrorContains(t, d.decode(v, &Record{}, &headMeta{}), name, "column %d too long", col)
	}
	// NULL stands for the values almost every row has.
	v := row()
	v[3], v[9] = nil, nil
	require.NoError(t, d.decode(v, &rec, &m))
	assert.True(t, m.ready)
	assert.Zero(t, rec.Attempts)
	v[3] = []byte{0}
	require.NoError(t, d.decode(v, &rec, &m))
	assert.False(t, m.ready)
	v = row()
	v[8] = []byte{2, '{', '}'}
	assert.ErrorContains(t, d.decode(v, &Record{}, &headMeta{}), "jsonb version")
	// A row edited by hand is decoded, marked broken, for a dead letter.
	v[8] = []byte{1, '['}
	m = headMeta{}
	require.NoError(t, d.decode(v, &rec, &m))
	assert.Contains(t, m.broken, "headers are not a JSON object of strings")
	v = row()
	v[6] = []byte{}
	m = headMeta{}
	require.NoError(t, d.decode(v, &rec, &m))
	assert.Equal(t, "the topic is empty", m.broken)
}

// The fast path's statement names the leased buckets in a stable order (one
// prepared statement per bucket set, whatever order leases come in), and
// filters by range when the relay holds them all (a row edited out of
// every bucket is no relay's to publish). The writes name no buckets on a
// plain table; on a partitioned one they name the held buckets' ranges,
// unless every bucket is held.
func TestStatementsForBuckets(t *testing.T) {
	pub := PublisherFunc(func(context.Context, []Record) []error { return nil })
	o, err := New(Config{Buckets: 4})
	require.NoError(t, err)
	r, err := o.NewRelay(&pgxpool.Pool{}, pub, RelayConfig{})
	require.NoError(t, err)
	some := r.statementsFor([]int32{3, 1}).fast
	assert.Contains(t, some, `WHERE t.bucket = ANY('{1,3}'::int4[])`)
	assert.Equal(t, some, r.statementsFor([]int32{1, 3}).fast)
	assert.NotContains(t, r.statementsFor([]int32{1, 3}).ackSpan, "t.bucket BETWEEN")
	all := r.statementsFor([]int32{2, 0, 3, 1}).fast
	assert.Contains(t, all, "WHERE t.bucket BETWEEN 0 AND 3 ORDER BY")
	assert.NotContains(t, all, bucketFilter)
	assert.Contains(t, all, "ORDER BY t.seq LIMIT $1")

	o, err = New(Config{Buckets: 8, Partitions: 4})
	require.NoError(t, err)
	r, err = o.NewRelay(&pgxpool.Pool{}, pub, RelayConfig{})
	require.NoError(t, err)
	st := r.statementsFor([]int32{5, 0, 1, 2, 7})
	for _, sql := range []string{st.ack, st.ackSpan, st.ackEach, st.fail} {
		assert.Contains(t, sql, "AND (t.bucket BETWEEN 0 AND 2 OR t.bucket BETWEEN 5 AND 5 OR t.bucket BETWEEN 7 AND 7)")
		assert.NotContains(t, sql, pruneFilter)
	}
	assert.NotContains(t, r.statementsFor([]int32{0, 1, 2, 3, 4, 5, 6, 7}).ackSpan, "t.bucket BETWEEN")
}

// A batch is picked out of its range of seqs by a bitmap, bit i (least
// significant first in each byte, as get_bit counts) for seq first+i.
func TestBitmapOfSeqs(t *testing.T) {
	bits := bitmap([]int64{3, 5, 12, 4}, 3, 12)
	assert.Equal(t, []byte{0b0000_0111, 0b0000_0010}, bits)
	assert.Equal(t, []byte{1}, bitmap([]int64{9}, 9, 9))
}

// The relays' shares, laid end to end in ID order, are ranges that cover
// the buckets once: 16 buckets on 4 partitions and 2 or 4 relays are whole
// partitions each.
func TestShareRanges(t *testing.T) {
	pub := PublisherFunc(func(context.Context, []Record) []error { return nil })
	o, err := New(Config{Buckets: 16, Partitions: 4})
	require.NoError(t, err)
	ranges := func(ids ...string) [][2]int {
		var out [][2]int
		for _, id := range ids {
			r, err := o.NewRelay(&pgxpool.Pool{}, pub, RelayConfig{ID: id})
			require.NoError(t, err)
			_, live, lo, hi := r.share(ids)
			assert.Equal(t, len(ids), live)
			out = append(out, [2]int{lo, hi})
		}
		return out
	}
	assert.Equal(t, [][2]int{{0, 8}, {8, 16}}, ranges("a", "b"))
	assert.Equal(t, [][2]int{{0, 4}, {4, 8}, {8, 12}, {12, 16}}, ranges("a", "b", "c", "d"))
	assert.Equal(t, [][2]int{{0, 6}, {6, 11}, {11, 16}}, ranges("a", "b", "c"))
	assert.Equal(t, [][2]int{{0, 16}}, ranges("a"))
}
