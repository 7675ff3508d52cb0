package cdc

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/uuid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/outbox"
)

func TestEncodingRoundTrip(t *testing.T) {
	msgs := []outbox.Message{
		{ID: uuid.Must(uuid.NewV7()), Topic: "orders", Key: "order-1", Payload: []byte("p1"), Headers: map[string]string{"b": "2", "a": "1"}},
		{ID: uuid.Must(uuid.NewV7()), Topic: "orders", Payload: []byte{}}, // keyless, empty payload
		{ID: uuid.Must(uuid.NewV7()), Topic: "t", Key: strings.Repeat("k", 300), Payload: make([]byte, 70000)},
	}
	for _, m := range msgs {
		got, err := decodeRecord(encodeMessage(m))
		require.NoError(t, err)
		require.Len(t, got, 1)
		assert.Equal(t, m.ID, got[0].ID)
		assert.Equal(t, m.Topic, got[0].Topic)
		assert.Equal(t, m.Key, got[0].Key)
		assert.Equal(t, len(m.Payload), len(got[0].Payload))
		assert.Equal(t, len(m.Headers), len(got[0].Headers))
		for k, v := range m.Headers {
			assert.Equal(t, v, got[0].Headers[k])
		}
	}
	var body []byte
	for _, m := range msgs {
		enc := encodeMessage(m)
		body = appendUvarint(body, len(enc))
		body = append(body, enc...)
	}
	got, err := decodeRecord(packFrame(body, len(msgs)))
	require.NoError(t, err)
	require.Len(t, got, 3)
	for i := range msgs {
		assert.Equal(t, msgs[i].ID, got[i].ID, "frame keeps the order")
	}
	// Truncated or foreign content is refused, not misread.
	for _, bad := range [][]byte{nil, {9, 1, 2}, encodeMessage(msgs[0])[:20], packFrame(body[:len(body)-5], 3)} {
		_, err := decodeRecord(bad)
		assert.True(t, errors.Is(err, errBadEncoding), "%v", err)
	}
}

func appendUvarint(b []byte, n int) []byte {
	for n >= 0x80 {
		b = append(b, byte(n)|0x80)
		n >>= 7
	}
	return append(b, byte(n))
}

func TestEmitterRefusesBadMessages(t *testing.T) {
	e, err := NewEmitter(WithMaxPayload(10))
	require.NoError(t, err)
	for field, m := range map[string]outbox.Message{
		"Topic":   {Payload: []byte("x")},
		"Payload": {Topic: "t", Payload: make([]byte, 11)},
		"Headers": {Topic: "t", Headers: map[string]string{"": "v"}},
	} {
		err := e.validate(&m)
		var fe *FieldError
		require.ErrorAs(t, err, &fe, field)
		assert.Equal(t, field, fe.Field)
		assert.ErrorIs(t, err, ErrInvalidMessage)
	}
	_, err = NewEmitter(WithPrefix(""))
	assert.ErrorIs(t, err, ErrInvalidConfig)
	_, err = e.Enqueue(t.Context(), nil, outbox.Message{Topic: "t"})
	assert.ErrorIs(t, err, ErrInvalidMessage)
}
