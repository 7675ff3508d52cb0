package cdc

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Values travel from the WAL sender to the target as the bytes the server
// sent: each column of a batch becomes one array parameter in binary
// format whose elements are those bytes (the type's send format when the
// slot is read with pgoutput's binary option, else its text form as text
// elements), so the sync neither decodes nor re-encodes a value on its way.

// rowMsg is an insert, update or delete message of pgoutput, read in
// place: the tuples point into the message.
type rowMsg struct {
	op       Op
	xid      uint32 // in a stream block (protocol 2): the (sub)transaction
	relID    uint32
	tuple    []byte // the new row (insert, update) or the old key or row (delete)
	oldTuple []byte // an update's old key or row ('K' or 'O'), when sent
}

var errShortMessage = errors.New("cdc: truncated pgoutput message")

// parseRow reads an insert ('I'), update ('U') or delete ('D') message;
// ok is false for any other message. withXid: the message is in a stream
// block and carries its transaction.
func parseRow(data []byte, withXid bool) (m rowMsg, ok bool, err error) {
	if len(data) == 0 {
		return m, false, nil
	}
	switch data[0] {
	case 'I':
		m.op = OpInsert
	case 'U':
		m.op = OpUpdate
	case 'D':
		m.op = OpDelete
	default:
		return m, false, nil
	}
	p := 1
	if withXid {
		if len(data) < p+4 {
			return m, true, errShortMessage
		}
		m.xid = binary.BigEndian.Uint32(data[p:])
		p += 4
	}
	if len(data) < p+5 {
		return m, true, errShortMessage
	}
	m.relID = binary.BigEndian.Uint32(data[p:])
	p += 4
	tuple := func() ([]byte, error) {
		n, err := tupleLen(data[p:])
		if err != nil {
			return nil, err
		}
		t := data[p : p+n]
		p += n
		return t, nil
	}
	kind := data[p]
	p++
	switch {
	case m.op == OpInsert && kind == 'N':
		m.tuple, err = tuple()
	case m.op == OpDelete && (kind == 'K' || kind == 'O'):
		m.tuple, err = tuple()
	case m.op == OpUpdate && (kind == 'K' || kind == 'O'):
		if m.oldTuple, err = tuple(); err != nil {
			break
		}
		if len(data) < p+1 || data[p] != 'N' {
			return m, true, fmt.Errorf("cdc: update message without its new row")
		}
		p++
		m.tuple, err = tuple()
	case m.op == OpUpdate && kind == 'N':
		m.tuple, err = tuple()
	default:
		err = fmt.Errorf("cdc: %s message with tuple kind %q", m.op, kind)
	}
	return m, true, err
}

// tupleLen is the length of the TupleData at the start of b.
func tupleLen(b []byte) (int, error) {
	if len(b) < 2 {
		return 0, errShortMessage
	}
	n, p := int(binary.BigEndian.Uint16(b)), 2
	for range n {
		if len(b) < p+1 {
			return 0, errShortMessage
		}
		k := b[p]
		p++
		switch k {
		case 'n', 'u', 't', 'b':
		default:
			return 0, fmt.Errorf("cdc: pgoutput column of unknown kind %q", k)
		}
		if k == 't' || k == 'b' {
			if len(b) < p+4 {
				return 0, errShortMessage
			}
			l := int(binary.BigEndian.Uint32(b[p:]))
			p += 4
			if l < 0 || len(b) < p+l {
				return 0, errShortMessage
			}
			p += l
		}
	}
	return p, nil
}

// tupleCol is one column of a TupleData: its kind ('n' null, 'u'
// unchanged TOAST value, 't' text, 'b' binary) and value.
type tupleCol struct {
	kind byte
	data []byte
}

// eachCol calls fn for every column of a TupleData that tupleLen accepted.
func eachCol(t []byte, fn func(i int, c tupleCol) error) error {
	n, p := int(binary.BigEndian.Uint16(t)), 2
	for i := range n {
		c := tupleCol{kind: t[p]}
		p++
		if c.kind == 't' || c.kind == 'b' {
			l := int(binary.BigEndian.Uint32(t[p:]))
			p += 4
			c.data = t[p : p+l]
			p += l
		}
		if err := fn(i, c); err != nil {
			return err
		}
	}
	return nil
}

// arena holds the values read from the stream: a message's bytes are the
// connection's buffer, reused by the next read, so each value is copied
// once, into blocks that are only ever appended to (a batch the applier
// still holds is never overwritten).
type arena struct{ block []byte }

func (a *arena) copy(b []byte) []byte {
	if cap(a.block)-len(a.block) < len(b) {
		a.block = make([]byte, 0, max(64<<10, len(b)))
	}
	n := len(a.block)
	a.block = append(a.block, b...)
	return a.block[n:len(a.block):len(a.block)]
}

// vals hands out a change's column values from a shared block.
func (a *arena) vals(slab *[]colVal, n int) []colVal {
	if len(*slab) < n {
		*slab = make([]colVal, max(4096, n))
	}
	v := (*slab)[:n:n]
	*slab = (*slab)[n:]
	return v
}

// keyOf joins key values into one comparable string: the value itself for
// a single column, else each prefixed by its length.
func keyOf(vals []colVal) string {
	if len(vals) == 1 {
		return string(vals[0].data)
	}
	var b []byte
	for _, v := range vals {
		b = binary.BigEndian.AppendUint32(b, uint32(len(v.data)))
		b = append(b, v.data...)
	}
	return string(b)
}

// appendArray appends a one-dimensional array in PostgreSQL's binary format
// with n elements of type elem, value(i) giving each (nil: NULL).
func appendArray(b []byte, elem uint32, n int, value func(i int) ([]byte, bool)) []byte {
	size := 20
	hasNull := int32(0)
	for i := range n {
		v, null := value(i)
		size += 4 + len(v)
		if null {
			hasNull = 1
		}
	}
	b = slices.Grow(b, size)
	b = binary.BigEndian.AppendUint32(b, 1) // dimensions
	b = binary.BigEndian.AppendUint32(b, uint32(hasNull))
	b = binary.BigEndian.AppendUint32(b, elem)
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	b = binary.BigEndian.AppendUint32(b, 1) // lower bound
	for i := range n {
		v, null := value(i)
		if null {
			b = binary.BigEndian.AppendUint32(b, 0xFFFFFFFF)
			continue
		}
		b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
		b = append(b, v...)
	}
	return b
}

const (
	textOID      = 25
	textArrayOID = 1009
	// firstNormalOID: types below it are built in, with the same OID in
	// every database of every server.
	firstNormalOID = 16384
)

// binaryValues is binaryColumns, logging why values travel as text.
func (s *Sync) binaryValues(ctx context.Context, src *pgxpool.Pool, sh *tableShape) (bool, error) {
	if s.textValues {
		return false, nil
	}
	ok, why, err := s.binaryColumns(ctx, src, sh)
	if err == nil && !ok {
		s.log.Info("cdc sync: values travel in text form", "why", why)
	}
	return ok, err
}

// binaryColumns decides whether the sync reads values in binary: when
// every synced column's type is built in (its OID, and its array type's,
// mean the same in every database), has send and receive functions and an
// array type, the source runs PostgreSQL 14 or later (pgoutput's binary
// option), a table target runs the source's major version (the binary
// format of a built-in type is the same within one), and — when Go values
// are wanted — pgx can decode it. Otherwise values travel as text, as
// they always did; why is returned for the log.
func (s *Sync) binaryColumns(ctx context.Context, src *pgxpool.Pool, sh *tableShape) (ok bool, why string, err error) {
	oids := make([]uint32, len(sh.cols))
	for i, c := range sh.cols {
		oids[i] = c.oid
	}
	var srcVersion int
	var unfit *string
	if err := src.QueryRow(ctx, `SELECT current_setting('server_version_num')::int,
	(SELECT string_agg(format_type(t.oid, NULL), ', ') FROM unnest($1::oid[]) o LEFT JOIN pg_type t ON t.oid = o
	 WHERE t.oid IS NULL OR t.oid >= $2 OR t.typsend = 0 OR t.typreceive = 0 OR t.typarray = 0)`, oids, firstNormalOID).Scan(&srcVersion, &unfit); err != nil {
		return false, "", fmt.Errorf("cdc: sync %s: look up the source's column types: %w", s.cfg.Name, err)
	}
	switch {
	case srcVersion < 140000:
		return false, "the source runs PostgreSQL before 14", nil
	case unfit != nil:
		return false, "column types without a built-in binary form or array type: " + *unfit, nil
	}
	if s.cfg.Sink != nil || s.cfg.OnApplied != nil {
		m := pgtype.NewMap()
		for _, c := range sh.cols {
			if _, known := m.TypeForOID(c.oid); !known {
				return false, fmt.Sprintf("pgx cannot decode column %q (%s) from binary", c.name, c.typ), nil
			}
		}
	}
	if s.cfg.Sink == nil {
		var dstVersion int
		var missing int
		if err := s.target.QueryRow(ctx, `SELECT current_setting('server_version_num')::int,
	(SELECT count(*) FROM unnest($1::oid[]) o LEFT JOIN pg_type t ON t.oid = o WHERE t.oid IS NULL OR t.typreceive = 0 OR t.typarray = 0)`, oids).Scan(&dstVersion, &missing); err != nil {
			return false, "", fmt.Errorf("cdc: sync %s: look up the target's column types: %w", s.cfg.Name, err)
		}
		if dstVersion/10000 != srcVersion/10000 {
			return false, fmt.Sprintf("the target runs another PostgreSQL major version (%d, the source %d)", dstVersion/10000, srcVersion/10000), nil
		}
		if missing > 0 {
			return false, "the target lacks a column's type", nil
		}
	}
	for i := range sh.cols {
		var arr uint32
		if err := src.QueryRow(ctx, `SELECT typarray FROM pg_type WHERE oid = $1`, sh.cols[i].oid).Scan(&arr); err != nil {
			return false, "", fmt.Errorf("cdc: sync %s: look up the source's column types: %w", s.cfg.Name, err)
		}
		sh.cols[i].arrayOID = arr
	}
	return true, "", nil
}
