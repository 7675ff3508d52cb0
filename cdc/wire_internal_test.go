package cdc

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// tupleData builds a pgoutput TupleData of the given columns: nil is
// NULL, "\x00u" an unchanged TOAST value, anything else a text value.
func tupleData(cols ...[]byte) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(len(cols)))
	for _, c := range cols {
		switch {
		case c == nil:
			b = append(b, 'n')
		case string(c) == "\x00u":
			b = append(b, 'u')
		default:
			b = append(b, 't')
			b = binary.BigEndian.AppendUint32(b, uint32(len(c)))
			b = append(b, c...)
		}
	}
	return b
}

func TestParseRowWholeAndTruncated(t *testing.T) {
	rel := binary.BigEndian.AppendUint32(nil, 16384)
	newRow := tupleData([]byte("1"), nil, []byte("\x00u"), []byte("héllo"))
	oldKey := tupleData([]byte("1"))
	msgs := map[string][]byte{
		"insert":         append(append(append([]byte{'I'}, rel...), 'N'), newRow...),
		"update":         append(append(append([]byte{'U'}, rel...), 'N'), newRow...),
		"update old key": append(append(append(append(append([]byte{'U'}, rel...), 'K'), oldKey...), 'N'), newRow...),
		"delete":         append(append(append([]byte{'D'}, rel...), 'K'), oldKey...),
	}
	for name, msg := range msgs {
		m, ok, err := parseRow(msg, false)
		require.NoError(t, err, name)
		require.True(t, ok, name)
		assert.Equal(t, uint32(16384), m.relID, name)
		var kinds []byte
		require.NoError(t, eachCol(m.tuple, func(_ int, c tupleCol) error { kinds = append(kinds, c.kind); return nil }), name)
		if name == "delete" {
			assert.Equal(t, "t", string(kinds), name)
		} else {
			assert.Equal(t, "tnut", string(kinds), name)
		}
		// Every cut of the message is refused with an error, never read
		// past its end.
		for n := 1; n < len(msg); n++ {
			_, ok, err := parseRow(msg[:n], false)
			assert.True(t, ok, "%s cut at %d", name, n)
			assert.Error(t, err, "%s cut at %d", name, n)
		}
	}
	bad := append(append(append([]byte{'I'}, rel...), 'N'), 0, 1, 'x')
	_, _, err := parseRow(bad, false)
	assert.ErrorContains(t, err, "unknown kind")
	_, ok, err := parseRow([]byte{'B', 0, 0}, false)
	assert.False(t, ok, "not a row message")
	assert.NoError(t, err)
}
