package main

import (
	"bytes"
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/streams"
)

// TestStreamCommands drives `dimmer stream` against two in-process
// clusters: mirror (until its context ends), status, lag, translate and
// replay, and the exit codes of bad input.
func TestStreamCommands(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var seeds [3][]string
	for _, side := range []flags.Side{flags.Old, flags.New} {
		c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(2, "events"), kfake.SeedTopics(int32(side)+1, "odd"))
		require.NoError(t, err)
		t.Cleanup(c.Close)
		seeds[side] = c.ListenAddrs()
	}
	brokers := []string{"--old-brokers", strings.Join(seeds[flags.Old], ","), "--new-brokers", strings.Join(seeds[flags.New], ",")}
	stream := func(args ...string) result {
		return dimmer(t, nil, append(append([]string{"stream"}, args...), brokers...)...)
	}
	prod, err := kgo.NewClient(kgo.SeedBrokers(seeds[flags.Old]...), kgo.DefaultProduceTopic("events"))
	require.NoError(t, err)
	defer prod.Close()
	for i := range 20 {
		require.NoError(t, prod.ProduceSync(ctx, &kgo.Record{Key: fmt.Appendf(nil, "k%d", i%3), Value: fmt.Appendf(nil, "v%d", i)}).FirstErr())
	}

	// mirror runs until its context ends (a signal, in the binary).
	mctx, mstop := context.WithCancel(ctx)
	var mout, merr bytes.Buffer
	var wg sync.WaitGroup
	var mcode atomic.Int32
	wg.Go(func() {
		mcode.Store(int32(run(mctx, append([]string{"stream", "mirror", "events"}, brokers...), &mout, &merr)))
	})
	newCl, err := kgo.NewClient(kgo.SeedBrokers(seeds[flags.New]...))
	require.NoError(t, err)
	defer newCl.Close()
	require.Eventually(t, func() bool {
		ends, err := kadm.NewClient(newCl).ListEndOffsets(ctx, "events")
		var n int64
		ends.Each(func(o kadm.ListedOffset) { n += o.Offset })
		return err == nil && n == 20
	}, 30*time.Second, 20*time.Millisecond)
	mstop()
	wg.Wait()
	assert.Zero(t, mcode.Load(), merr.String())
	assert.Contains(t, mout.String(), "mirror stopped: 20 copied")

	// A consumer group reads new (live).
	var n atomic.Int64
	c, err := streams.NewConsumer(streams.ConsumerConfig{Migration: "events", Topic: "events", Group: "billing",
		Old: []kgo.Opt{kgo.SeedBrokers(seeds[flags.Old]...)}, New: []kgo.Opt{kgo.SeedBrokers(seeds[flags.New]...)},
		Source:  flags.StageFunc(func(context.Context, string, string) (flags.Stage, error) { return flags.Live, nil }),
		Handler: func(context.Context, *kgo.Record) error { n.Add(1); return nil }, PollTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	defer c.Close()
	cctx, cstop := context.WithCancel(ctx)
	wg.Go(func() { assert.NoError(t, c.Run(cctx)) })
	require.Eventually(t, func() bool { return n.Load() == 20 }, 30*time.Second, 20*time.Millisecond)
	cstop()
	wg.Wait()

	r := stream("status", "events", "--group", "billing")
	require.Zero(t, r.code, r.stderr)
	assert.Contains(t, r.stdout, "MIRROR LAG")
	assert.Equal(t, 3, strings.Count(r.stdout, "\n"), "a header and two partitions:\n%s", r.stdout)
	assert.Contains(t, r.stdout, "new")

	r = stream("lag", "events", "--group", "billing", "--max-lag", "0")
	require.Zero(t, r.code, r.stderr)
	assert.Contains(t, r.stdout, "group billing lag 0\nmirror dimmer-mirror.events from old lag 0")
	require.NoError(t, prod.ProduceSync(ctx, &kgo.Record{Value: []byte("late")}).FirstErr())
	r = stream("lag", "events", "--group", "billing", "--max-lag", "0")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "lag over --max-lag 0")

	r = stream("translate", "events", "--group", "billing", "--to", "old")
	require.Zero(t, r.code, r.stderr)
	assert.Contains(t, r.stdout, "NEXT ON OLD")

	r = stream("replay", "events", "--group", "billing", "--side", "new", "--from-offset", "0")
	require.Zero(t, r.code, r.stderr)
	assert.Contains(t, r.stdout, "RECORDS TO REDO")

	// After complete, producers write new and a mirror copies back to old
	// (its group, the same default name, commits on new): status and lag
	// show that mirror, behind new by what it has not copied back.
	newProd, err := kgo.NewClient(kgo.SeedBrokers(seeds[flags.New]...), kgo.DefaultProduceTopic("events"),
		kgo.RecordPartitioner(kgo.ManualPartitioner()))
	require.NoError(t, err)
	defer newProd.Close()
	for i := range 4 {
		require.NoError(t, newProd.ProduceSync(ctx, &kgo.Record{Partition: int32(i % 2), Value: fmt.Appendf(nil, "on new %d", i)}).FirstErr())
	}
	bctx, bstop := context.WithCancel(ctx)
	mout.Reset()
	wg.Go(func() {
		mcode.Store(int32(run(bctx, append([]string{"stream", "mirror", "events", "--from", "new"}, brokers...), &mout, &merr)))
	})
	oldCl, err := kgo.NewClient(kgo.SeedBrokers(seeds[flags.Old]...))
	require.NoError(t, err)
	defer oldCl.Close()
	require.Eventually(t, func() bool {
		ends, err := kadm.NewClient(oldCl).ListEndOffsets(ctx, "events")
		var n int64
		ends.Each(func(o kadm.ListedOffset) { n += o.Offset })
		return err == nil && n == 21+4 // the 20, "late" and the 4 copied back
	}, 30*time.Second, 20*time.Millisecond)
	bstop()
	wg.Wait()
	assert.Zero(t, mcode.Load(), merr.String())
	assert.Contains(t, mout.String(), "mirror stopped: 4 copied, 20 copies not copied back")
	for range 3 { // not copied back yet
		require.NoError(t, newProd.ProduceSync(ctx, &kgo.Record{Partition: 1, Value: []byte("later")}).FirstErr())
	}
	r = stream("status", "events")
	require.Zero(t, r.code, r.stderr)
	assert.Contains(t, r.stdout, "MIRROR FROM")
	// Partition 1 of new: its copies and 2 records copied back (at), 3 not yet (lag).
	p1 := regexp.MustCompile(`(?m)^1 +\d+ +(\d+) +(\w+) +(\d+) +(\d+) `).FindStringSubmatch(r.stdout)
	require.NotNil(t, p1, r.stdout)
	newEnd, _ := strconv.Atoi(p1[1])
	assert.Equal(t, "new", p1[2], "the mirror back reads new:\n%s", r.stdout)
	assert.Equal(t, strconv.Itoa(newEnd-3), p1[3], "its position on new:\n%s", r.stdout)
	assert.Equal(t, "3", p1[4], "behind new by the 3 records not copied back:\n%s", r.stdout)
	r = stream("lag", "events", "--group", "billing")
	require.Zero(t, r.code, r.stderr)
	assert.Contains(t, r.stdout, "mirror dimmer-mirror.events from new lag 3")

	for _, bad := range [][]string{
		{"status", "nothing"},
		{"status", "odd"},
		{"lag", "events", "--group", "nobody"},
		{"replay", "events", "--group", "billing", "--side", "mid", "--from-offset", "0"},
		{"replay", "events", "--group", "billing", "--side", "new"},
		{"translate", "events"},
		{"mirror", "events", "--from", "mid"},
		{"replay", "events", "--group", "billing", "--from-offset", "0"},
		{"replay", "events", "--group", "billing", "--side", "new", "--from-offset", "-5"},
		{"status", ""},
		{"mirror", "nothing"},
	} {
		r := stream(bad...)
		assert.Equal(t, exitUsage, r.code, "%v: %s", bad, r.stderr)
		assert.Empty(t, r.stdout, "%v: nothing that reads as done", bad)
	}
	r = dimmer(t, nil, "stream", "status", "events", "--old-brokers", strings.Join(seeds[flags.Old], ","), "--new-brokers", "")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "no new cluster")
}
