package pgflags_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
)

// TestHeartbeatWhileAnotherPrunes: two instances whose rows expired more
// than an hour ago (a fleet scaled to zero overnight and started again
// under the same IDs, or cut off from the database for that long) beat at
// the same moment. Each beat upserts its own row and prunes the rows
// expired for an hour, the other's among them. The test plays instance
// "b": its row is locked by its own upsert when "a" beats, and once a's
// beat waits for that row (if it does), b prunes a's row. A beat that
// waited on the row of an instance beating meanwhile, while holding its
// own, deadlocked with it: PostgreSQL aborted one of the two beats (the
// first one fails an instance's start).
func TestHeartbeatWhileAnotherPrunes(t *testing.T) {
	t.Parallel()
	s, pool, schema := newStore(t)
	ctx := flagstest.Context(t)
	fleet := pgx.Identifier{schema, "fleet_instances"}.Sanitize()
	_, err := pool.Exec(ctx, `INSERT INTO `+fleet+` (id, doc, expires_at) VALUES
	('a', '{"id": "a"}', now() - interval '2 hours'), ('b', '{"id": "b"}', now() - interval '2 hours')`)
	require.NoError(t, err)

	// Connections of their own, not the store's pool.
	other, observer := dimmertest.Conn(t), dimmertest.Conn(t)

	tx, err := other.Begin(ctx)
	require.NoError(t, err)
	defer tx.Rollback(context.Background())
	_, err = tx.Exec(ctx, `INSERT INTO `+fleet+` (id, doc, expires_at) VALUES ('b', '{"id": "b"}', clock_timestamp() + interval '1 minute')
ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, expires_at = excluded.expires_at`)
	require.NoError(t, err)

	beat := make(chan error, 1)
	go func() { beat <- s.Heartbeat(ctx, flags.Instance{ID: "a"}, time.Minute) }()
	var beatErr error
	beatDone := false
	require.Eventually(t, func() bool {
		select {
		case beatErr = <-beat:
			beatDone = true
			return true
		default:
		}
		return dimmertest.LockWaiting(t, observer, schema, "fleet_instances")
	}, 10*time.Second, 5*time.Millisecond, "a's beat returns or waits for b's row")

	// b's prune, in the same transaction as its upsert.
	_, pruneErr := tx.Exec(ctx, `DELETE FROM `+fleet+` WHERE expires_at < clock_timestamp() - interval '1 hour' AND id <> 'b'`)
	if pruneErr == nil {
		pruneErr = tx.Commit(ctx)
	}
	if !beatDone {
		beatErr = <-beat
	}
	require.NoError(t, beatErr, "a's beat went through")
	require.NoError(t, pruneErr, "b's beat went through")

	rows, err := pool.Query(ctx, `SELECT id FROM `+fleet+` WHERE expires_at > clock_timestamp() ORDER BY id`)
	require.NoError(t, err)
	live, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Equal(t, []string{"a", "b"}, live, "both instances are registered")
}
