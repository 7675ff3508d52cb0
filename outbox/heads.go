package outbox

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
)

// readyExpr: a row may be published now (not dead, not backing off).
const readyExpr = `(t.dead_at IS NULL AND (t.next_attempt_at IS NULL OR t.next_attempt_at <= clock_timestamp()))`

// headColumns are the head queries' columns; headOIDs are their types, in
// the same order, which [headDecoder] reads. A column sent as NULL costs
// the server no output function, so the values almost every row has are
// sent as NULL: a keyed row's lane (its key), readiness when ready, and
// attempts when none. Every column is asked for in binary, so a row is
// decoded from its raw values rather than through pgx's per-column scan
// plans, which cost the relay more CPU per row than the database spent
// finding the row.
const headColumns = `t.bucket, CASE WHEN t.key IS NULL THEN t.lane END, t.seq, NULLIF(` + readyExpr + `, true),
	t.id, t.key, t.topic, t.payload, t.headers, NULLIF(t.attempts, 0), t.created_at`

var (
	headOIDs = [...]uint32{
		pgtype.Int4OID, pgtype.TextOID, pgtype.Int8OID, pgtype.BoolOID, pgtype.UUIDOID, pgtype.TextOID,
		pgtype.TextOID, pgtype.ByteaOID, pgtype.JSONBOID, pgtype.Int4OID, pgtype.TimestamptzOID,
	}
	headFormats = func() pgx.QueryResultFormats {
		f := make(pgx.QueryResultFormats, len(headOIDs))
		for i := range f {
			f[i] = pgx.BinaryFormatCode
		}
		return f
	}()
)

// headDecoder turns head rows into heads. It keeps the last topic, so a
// batch of one topic holds one copy of its name.
type headDecoder struct {
	topic string
}

// pgEpoch is the zero of PostgreSQL's binary timestamps.
var pgEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC).UnixMicro()

// check refuses a result whose columns are not the head columns in binary:
// a change to the queries that this decoder did not follow.
func (d *headDecoder) check(fds []pgconn.FieldDescription) error {
	if len(fds) != len(headOIDs) {
		return fmt.Errorf("head query returned %d columns, want %d", len(fds), len(headOIDs))
	}
	for i, fd := range fds {
		if fd.DataTypeOID != headOIDs[i] || fd.Format != pgx.BinaryFormatCode {
			return fmt.Errorf("head query column %d (%s) is type %d format %d, want type %d in binary",
				i, fd.Name, fd.DataTypeOID, fd.Format, headOIDs[i])
		}
	}
	return nil
}

// decode fills rec and m from one row's raw values.
func (d *headDecoder) decode(v [][]byte, rec *Record, m *headMeta) error {
	bad := func(col string, n int) error {
		return fmt.Errorf("head column %s: %d bytes", col, n)
	}
	switch {
	case len(v[0]) != 4:
		return bad("bucket", len(v[0]))
	case len(v[2]) != 8:
		return bad("seq", len(v[2]))
	case v[3] != nil && len(v[3]) != 1:
		return bad("ready", len(v[3]))
	case len(v[4]) != 16:
		return bad("id", len(v[4]))
	case v[6] == nil:
		return bad("topic", -1)
	case v[7] == nil:
		return bad("payload", -1)
	case v[9] != nil && len(v[9]) != 4:
		return bad("attempts", len(v[9]))
	case len(v[10]) != 8:
		return bad("created_at", len(v[10]))
	}
	m.bucket = int32(binary.BigEndian.Uint32(v[0]))
	rec.Seq = int64(binary.BigEndian.Uint64(v[2]))
	m.ready = v[3] == nil || v[3][0] != 0
	copy(rec.ID[:], v[4])
	rec.Key, m.lane = "", ""
	if v[5] != nil {
		rec.Key = string(v[5])
		m.lane = rec.Key
	} else if v[1] != nil {
		m.lane = string(v[1])
	}
	if string(v[6]) != d.topic {
		d.topic = string(v[6])
	}
	rec.Topic = d.topic
	// Never nil: an empty payload is an empty value, not a Kafka tombstone.
	rec.Payload = append(make([]byte, 0, len(v[7])), v[7]...)
	rec.Headers = nil
	if v[8] != nil {
		// jsonb in binary: a version byte, then the document as text.
		if len(v[8]) < 1 || v[8][0] != 1 {
			return fmt.Errorf("head column headers: unknown jsonb version")
		}
		if err := json.Unmarshal(v[8][1:], &rec.Headers); err != nil {
			// A row edited by hand: it becomes a dead letter of its own
			// key, rather than an error that stops every key.
			rec.Headers = nil
			m.broken = "headers are not a JSON object of strings: " + err.Error()
		}
	}
	if rec.Topic == "" {
		m.broken = "the topic is empty"
	}
	rec.Attempts = 0
	if v[9] != nil {
		rec.Attempts = int(int32(binary.BigEndian.Uint32(v[9])))
	}
	us := int64(binary.BigEndian.Uint64(v[10]))
	rec.CreatedAt = time.UnixMicro(pgEpoch + us)
	return nil
}
