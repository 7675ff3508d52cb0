package streams_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox/inbox"
	"github.com/dimmer-dev/dimmer/streams"
)

// A range replayed through the inbox applies each record's effect once:
// again on old, or on new where the same records are copies, nothing is
// applied twice; a range older than retention is refused with nothing
// applied.
func TestReplayThroughInbox(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("replay")
	topic(t, oldSeeds, name, 2)
	topic(t, newSeeds, name, 2)
	w := newWriter(t, oldSeeds, name, 5)
	w.produce(t, ctx, 30)
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}
	m, err := streams.NewMirror(streams.MirrorConfig{Topic: name, Old: oldOpts, New: newOpts})
	require.NoError(t, err)
	mctx, mstop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { assert.NoError(t, m.Run(mctx)) })
	eventually(t, 30*time.Second, "mirrored", func() bool { return m.Stats().Copied >= 30 })
	mstop()
	wg.Wait()

	pool, schema := dimmertest.Schema(t)
	in, err := inbox.New(schema, "inbox")
	require.NoError(t, err)
	require.NoError(t, in.Install(ctx, pool))
	_, err = pool.Exec(ctx, `CREATE TABLE effects (value text PRIMARY KEY, n int NOT NULL)`)
	require.NoError(t, err)
	cfg := streams.ReplayConfig{Topic: name, Side: flags.Old, Opts: oldOpts, Consumer: "totals", Inbox: in, Pool: pool,
		Handler: func(ctx context.Context, tx pgx.Tx, rec *kgo.Record) error {
			_, err := tx.Exec(ctx, `INSERT INTO effects VALUES ($1, 1) ON CONFLICT (value) DO UPDATE SET n = effects.n + 1`, string(rec.Value))
			return err
		}}
	st, err := streams.Replay(ctx, cfg)
	require.NoError(t, err)
	assert.Equal(t, streams.ReplayStats{Read: 30, Applied: 30}, st)
	st, err = streams.Replay(ctx, cfg)
	require.NoError(t, err)
	assert.Equal(t, streams.ReplayStats{Read: 30, Skipped: 30}, st, "replayed again: nothing applied twice")
	onNew := cfg
	onNew.Side, onNew.Opts, onNew.FromTime = flags.New, newOpts, time.Now().Add(-time.Hour)
	st, err = streams.Replay(ctx, onNew)
	require.NoError(t, err)
	assert.Equal(t, streams.ReplayStats{Read: 30, Skipped: 30}, st, "the copies on new are the same records")
	var twice int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM effects WHERE n <> 1`).Scan(&twice))
	assert.Zero(t, twice)

	// Retention: delete old's first records, then ask for them.
	cl, err := kgo.NewClient(oldOpts...)
	require.NoError(t, err)
	defer cl.Close()
	var del kadm.Offsets
	del.Add(kadm.Offset{Topic: name, Partition: 0, At: 2})
	_, err = kadm.NewClient(cl).DeleteRecords(ctx, del)
	require.NoError(t, err)
	cfg.Consumer = "fresh"
	_, err = streams.Replay(ctx, cfg)
	require.ErrorIs(t, err, streams.ErrOutOfRetention)
	assert.ErrorContains(t, err, "/0 on the old cluster starts at offset 2")
	var fresh int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM inbox WHERE consumer = 'fresh'`).Scan(&fresh))
	assert.Zero(t, fresh, "nothing applied")

	cfg.Topic = "no-such-topic"
	_, err = streams.Replay(ctx, cfg)
	require.ErrorIs(t, err, streams.ErrUnknownTopic)
}

func TestGroupStatus(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("status")
	topic(t, oldSeeds, name, 2)
	topic(t, newSeeds, name, 2)
	w := newWriter(t, oldSeeds, name, 4)
	w.produce(t, ctx, 40)
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}
	m, err := streams.NewMirror(streams.MirrorConfig{Topic: name, Old: oldOpts, New: newOpts})
	require.NoError(t, err)
	var wg sync.WaitGroup
	mstop := goRun(t, &wg, ctx, m.Run)
	eventually(t, 30*time.Second, "mirrored", func() bool { return m.Stats().Copied >= 40 })
	mstop()
	stage := newStage(flags.Live)
	l := newLedger()
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: name, Group: "g", Old: oldOpts, New: newOpts,
		Source: stage, Handler: l.handle, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	cstop := goRun(t, &wg, ctx, c.Run)
	eventually(t, 30*time.Second, "consumed", func() bool { return l.n.Load() >= 40 })
	cstop()
	wg.Wait()
	w.produce(t, ctx, 10) // not mirrored, not consumed

	ocl, err := kgo.NewClient(oldOpts...)
	require.NoError(t, err)
	defer ocl.Close()
	ncl, err := kgo.NewClient(newOpts...)
	require.NoError(t, err)
	defer ncl.Close()
	st, err := streams.GroupStatus(ctx, kadm.NewClient(ocl), kadm.NewClient(ncl), name, "g", "dimmer-mirror."+name)
	require.NoError(t, err)
	require.Len(t, st.Partitions, 2)
	var oldEnd, newEnd, mirrorLag, lag int64
	for _, p := range st.Partitions {
		assert.Equal(t, flags.New, p.GroupOn, "the group reads new")
		oldEnd += p.OldEnd
		newEnd += p.NewEnd
		mirrorLag += p.MirrorLag
		lag += p.Lag
	}
	assert.EqualValues(t, 50, oldEnd)
	assert.EqualValues(t, 40, newEnd)
	assert.EqualValues(t, 10, mirrorLag, "the mirror has not copied the last 10")
	assert.Zero(t, lag, "the group consumed all of new")

	_, err = streams.GroupStatus(ctx, kadm.NewClient(ocl), kadm.NewClient(ncl), name, "nobody", "")
	require.ErrorIs(t, err, streams.ErrUnknownGroup)
	assert.ErrorContains(t, err, `"nobody"`)
	_, err = streams.GroupStatus(ctx, kadm.NewClient(ocl), kadm.NewClient(ncl), "nothing", "g", "")
	require.ErrorIs(t, err, streams.ErrUnknownTopic)
}
