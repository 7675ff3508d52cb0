package outbox_test

import (
	"context"
	"errors"
	"fmt"
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
		{outbox.Config{Buckets: 64, Partitions: 3}, "Partitions"},
		{outbox.Config{Buckets: 4, Partitions: 8}, "Partitions"},
		{outbox.Config{Partitions: -1}, "Partitions"},
		{outbox.Config{Buckets: 4096, Partitions: 512}, "Partitions"},
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

// TestPartitionedInstall: Config.Partitions splits the table by bucket
// range; each message lands in the partition of its bucket; the layout is
// fixed, and the CLI's view of the installed outbox reports it.
func TestPartitionedInstall(t *testing.T) {
	t.Parallel()
	pool, schema := dimmertest.Schema(t)
	ctx := tctx(t, 30*time.Second)
	o, err := outbox.New(outbox.Config{Schema: schema, Buckets: 8, Partitions: 4})
	require.NoError(t, err)
	require.NoError(t, o.Install(ctx, pool))
	require.NoError(t, o.Install(ctx, pool), "idempotent")

	keys := map[string]int{}
	for i := range 40 {
		key := fmt.Sprint("k", i)
		_, err := o.EnqueuePool(ctx, pool, outbox.Message{Topic: "t", Key: key})
		require.NoError(t, err)
		keys[key] = o.Bucket(key)
	}
	rows, err := pool.Query(ctx, `SELECT c.relname, t.key, t.bucket FROM `+schema+`.outbox t JOIN pg_class c ON c.oid = t.tableoid`)
	require.NoError(t, err)
	perPartition := map[string]int{}
	for rows.Next() {
		var part, key string
		var bucket int
		require.NoError(t, rows.Scan(&part, &key, &bucket))
		assert.Equal(t, keys[key], bucket)
		assert.Equal(t, fmt.Sprintf("outbox_p%d", bucket/2), part, "bucket %d of key %s", bucket, key)
		perPartition[part]++
	}
	require.NoError(t, rows.Err())
	assert.Len(t, perPartition, 4, "40 keys reach every partition")

	cfg, err := outbox.Installed(ctx, pool, schema, outbox.DefaultTable)
	require.NoError(t, err)
	assert.Equal(t, 4, cfg.Partitions)
	assert.Equal(t, 8, cfg.Buckets)

	for _, parts := range []int{1, 2} {
		other, err := outbox.New(outbox.Config{Schema: schema, Buckets: 8, Partitions: parts})
		require.NoError(t, err)
		err = other.Install(ctx, pool)
		require.ErrorIs(t, err, outbox.ErrSchemaMismatch)
		assert.Contains(t, err.Error(), fmt.Sprintf("installed with 4 partitions, Config.Partitions is %d", parts))
	}
	// A relay-only process (no Install) configured for another layout, or
	// another bucket count, refuses to relay the table.
	for _, cfg := range []outbox.Config{{Schema: schema, Buckets: 8}, {Schema: schema, Buckets: 16, Partitions: 4}} {
		other, err := outbox.New(cfg)
		require.NoError(t, err)
		r, err := other.NewRelay(pool, outbox.PublisherFunc(func(_ context.Context, b []outbox.Record) []error { return make([]error, len(b)) }),
			outbox.RelayConfig{Logger: quiet(t)})
		require.NoError(t, err)
		err = r.Run(ctx)
		require.ErrorIs(t, err, outbox.ErrSchemaMismatch)
		assert.Empty(t, r.Buckets(), "it leased nothing")
	}
	// A plain table is not made partitioned by a later install either.
	plainPool, plainSchema := dimmertest.Schema(t)
	plain, err := outbox.New(outbox.Config{Schema: plainSchema})
	require.NoError(t, err)
	require.NoError(t, plain.Install(ctx, plainPool))
	split, err := outbox.New(outbox.Config{Schema: plainSchema, Partitions: 4})
	require.NoError(t, err)
	require.ErrorIs(t, split.Install(ctx, plainPool), outbox.ErrSchemaMismatch)
	cfg, err = outbox.Installed(ctx, plainPool, plainSchema, outbox.DefaultTable)
	require.NoError(t, err)
	assert.Equal(t, 1, cfg.Partitions)
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
