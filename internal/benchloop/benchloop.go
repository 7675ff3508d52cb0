// Package benchloop is the hand-written polling loop that dimmer's relays are
// measured against: a table of messages read 500 at a time in order,
// produced to Kafka synchronously and deleted, with no leases, no per-key
// lanes and no fencing. The table-mode relay (package outbox) and the
// log-mode relay (package cdc) both report their throughput as a ratio to
// this one loop, so the two ratios share a baseline.
package benchloop

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/outbox/kafkasink"
)

// Drain fills table (created here, in pool's database) with messages rows
// over keys distinct keys, then drains it to topic and returns the rate in
// messages per second, timed from the first read. The producer is built
// with kafkasink.ClientOptions, as the relays' publishers are.
func Drain(tb testing.TB, ctx context.Context, pool *pgxpool.Pool, seeds []string, table, topic string, messages, keys int, payload []byte) float64 {
	tb.Helper()
	_, err := pool.Exec(ctx, fmt.Sprintf(`DROP TABLE IF EXISTS %[1]s; CREATE TABLE %[1]s (seq bigserial PRIMARY KEY, key text, payload bytea)`,
		pgx.Identifier{table}.Sanitize()))
	require.NoError(tb, err)
	rows := make([][]any, messages)
	for i := range rows {
		rows[i] = []any{fmt.Sprint("k", i%keys), payload}
	}
	_, err = pool.CopyFrom(ctx, pgx.Identifier{table}, []string{"key", "payload"}, pgx.CopyFromRows(rows))
	require.NoError(tb, err)
	cl, err := kgo.NewClient(kafkasink.ClientOptions(seeds...)...)
	require.NoError(tb, err)
	defer cl.Close()
	sel := fmt.Sprintf(`SELECT seq, key, payload FROM %s ORDER BY seq LIMIT 500`, pgx.Identifier{table}.Sanitize())
	del := fmt.Sprintf(`DELETE FROM %s WHERE seq = ANY($1)`, pgx.Identifier{table}.Sanitize())
	start := time.Now()
	for {
		rs, err := pool.Query(ctx, sel)
		require.NoError(tb, err)
		var seqs []int64
		var recs []*kgo.Record
		var seq int64
		var key string
		var p []byte
		_, err = pgx.ForEachRow(rs, []any{&seq, &key, &p}, func() error {
			seqs = append(seqs, seq)
			recs = append(recs, &kgo.Record{Topic: topic, Key: []byte(key), Value: slices.Clone(p)})
			return nil
		})
		require.NoError(tb, err)
		if len(seqs) == 0 {
			break
		}
		require.NoError(tb, cl.ProduceSync(ctx, recs...).FirstErr())
		_, err = pool.Exec(ctx, del, seqs)
		require.NoError(tb, err)
	}
	return float64(messages) / time.Since(start).Seconds()
}
