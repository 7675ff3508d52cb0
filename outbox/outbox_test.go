package outbox_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/outbox"
)

func TestConfigValidation(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		cfg   outbox.Config
		field string
	}{
		{outbox.Config{Buckets: -1}, "Buckets"},
		{outbox.Config{Buckets: outbox.MaxBuckets + 1}, "Buckets"},
		{outbox.Config{Table: strings.Repeat("x", 57)}, "Table"},
		{outbox.Config{MaxPayload: -5}, "MaxPayload"},
	} {
		_, err := outbox.New(tc.cfg)
		require.ErrorIs(t, err, outbox.ErrInvalidConfig)
		var fe *outbox.FieldError
		require.ErrorAs(t, err, &fe)
		assert.Equal(t, tc.field, fe.Field)
	}
}

func TestInstallIdempotentAndQuoted(t *testing.T) {
	t.Parallel()
	pool, schema := dimmertest.Schema(t)
	ctx := tctx(t, 30*time.Second)
	// A name that needs quoting must still work and must not inject.
	cfg := outbox.Config{Schema: schema, Table: `Out"box; DROP TABLE x`, Buckets: 8}
	o, err := outbox.New(cfg)
	require.NoError(t, err)
	errs := make(chan error, 4)
	for range 4 { // concurrent installs serialise
		go func() { errs <- o.Install(ctx, pool) }()
	}
	for range 4 {
		require.NoError(t, <-errs)
	}
	require.NoError(t, o.Install(ctx, pool))
	var version, buckets, leases int
	require.NoError(t, pool.QueryRow(ctx, `SELECT version, buckets FROM "`+schema+`"."Out""box; DROP TABLE x_meta"`).Scan(&version, &buckets))
	assert.Equal(t, outbox.SchemaVersion, version)
	assert.Equal(t, 8, buckets)
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM "`+schema+`"."Out""box; DROP TABLE x_leases"`).Scan(&leases))
	assert.Equal(t, 8, leases)

	// Another bucket count against the same table is refused.
	cfg.Buckets = 16
	o2, err := outbox.New(cfg)
	require.NoError(t, err)
	err = o2.Install(ctx, pool)
	require.ErrorIs(t, err, outbox.ErrSchemaMismatch)
	assert.Contains(t, err.Error(), "8 buckets")
}

func TestEnqueueValidation(t *testing.T) {
	t.Parallel()
	pool, o := setup(t, outbox.Config{MaxPayload: 10})
	ctx := tctx(t, 30*time.Second)

	_, err := o.Enqueue(ctx, nil, outbox.Message{Topic: "t"})
	require.ErrorIs(t, err, outbox.ErrInvalidMessage)
	assert.Contains(t, err.Error(), "tx")

	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(ctx)
	for _, tc := range []struct {
		m     outbox.Message
		field string
	}{
		{outbox.Message{Key: "k"}, "Topic"},
		{outbox.Message{Topic: "t", Payload: make([]byte, 11)}, "Payload"},
		{outbox.Message{Topic: "t", Headers: map[string]string{"": "v"}}, "Headers"},
	} {
		_, err := o.Enqueue(ctx, tx, tc.m)
		require.ErrorIs(t, err, outbox.ErrInvalidMessage)
		var fe *outbox.FieldError
		require.ErrorAs(t, err, &fe)
		assert.Equal(t, tc.field, fe.Field)
	}
	// The refused messages wrote nothing, and the transaction is still usable.
	id, err := o.Enqueue(ctx, tx, outbox.Message{Topic: "t", Key: "k", Payload: []byte("0123456789")})
	require.NoError(t, err)
	assert.Equal(t, uuid.Version(7), id.Version())
	var n int
	require.NoError(t, tx.QueryRow(ctx, `SELECT count(*) FROM `+o.Config().Schema+`.outbox`).Scan(&n))
	assert.Equal(t, 1, n)
	require.NoError(t, tx.Rollback(ctx))
	assert.Equal(t, 0, pending(t, pool, o), "a rolled-back enqueue must vanish")

	// A given ID is kept; EnqueuePool commits on its own.
	want := uuid.New()
	got, err := o.EnqueuePool(ctx, pool, outbox.Message{ID: want, Topic: "dimmer.repair.m1", Key: "user:1", Headers: map[string]string{"op": "upsert"}})
	require.NoError(t, err)
	assert.Equal(t, want, got)
	assert.Equal(t, 1, pending(t, pool, o))
	_, err = o.EnqueuePool(ctx, nil, outbox.Message{Topic: "t"})
	require.True(t, errors.Is(err, outbox.ErrInvalidMessage))
}
