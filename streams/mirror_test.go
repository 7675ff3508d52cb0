package streams_test

import (
	"context"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/streams"
)

// TestMirrorChildProcess is the mirror process TestMirrorSurvivesKill9
// starts and kills; it does nothing in a normal run.
func TestMirrorChildProcess(t *testing.T) {
	env := os.Getenv("DIMMER_STREAMS_MIRROR_CHILD")
	if env == "" {
		t.Skip("runs only as the child of TestMirrorSurvivesKill9")
	}
	parts := strings.Split(env, "|") // old seeds | new seeds | topic | batch
	batch, err := strconv.Atoi(parts[3])
	require.NoError(t, err)
	m, err := streams.NewMirror(streams.MirrorConfig{Topic: parts[2], MaxBatch: batch,
		Old: []kgo.Opt{kgo.SeedBrokers(strings.Split(parts[0], ",")...)},
		New: []kgo.Opt{kgo.SeedBrokers(strings.Split(parts[1], ",")...)}})
	require.NoError(t, err)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	require.NoError(t, m.Run(ctx))
}

// The mirror runs in its own process, which is killed with SIGKILL in the
// middle of the stream and started again: new ends with a copy of every
// record, each partition in origin order; the re-sent tail is counted.
func TestMirrorSurvivesKill9(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("kill9")
	topic(t, oldSeeds, name, 3)
	topic(t, newSeeds, name, 3)
	w := newWriter(t, oldSeeds, name, 25)
	w.produce(t, ctx, 2000)

	start := func() *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^TestMirrorChildProcess$", "-test.count=1")
		cmd.Env = append(os.Environ(), "DIMMER_STREAMS_MIRROR_CHILD="+strings.Join(oldSeeds, ",")+"|"+strings.Join(newSeeds, ",")+"|"+name+"|200")
		require.NoError(t, cmd.Start())
		return cmd
	}
	newCl, err := kgo.NewClient(kgo.SeedBrokers(newSeeds...))
	require.NoError(t, err)
	defer newCl.Close()
	copies := func() int64 {
		ends, err := kadm.NewClient(newCl).ListEndOffsets(ctx, name)
		if err != nil {
			return -1
		}
		var n int64
		ends.Each(func(o kadm.ListedOffset) { n += o.Offset })
		return n
	}

	child := start()
	eventually(t, 60*time.Second, "the mirror copied part of the topic", func() bool { return copies() >= 400 })
	require.NoError(t, child.Process.Signal(syscall.SIGKILL))
	_ = child.Wait()
	atKill := copies()
	w.produce(t, ctx, 500)

	child = start()
	defer func() { _ = child.Process.Signal(syscall.SIGKILL); _ = child.Wait() }()
	eventually(t, 60*time.Second, "the restarted mirror caught up", func() bool { return copies() >= 2500 })
	olds := readAll(t, oldSeeds, name)
	var dups int
	eventually(t, 30*time.Second, "every record copied", func() bool {
		news := readAll(t, newSeeds, name)
		seen := map[string]bool{}
		for _, r := range news {
			seen[headerOf(r, streams.HeaderOrigin)] = true
		}
		return len(seen) == len(olds)
	})
	require.NoError(t, child.Process.Signal(syscall.SIGTERM))
	require.NoError(t, child.Wait(), "the mirror stops cleanly on SIGTERM")
	dups = checkCopies(t, olds, readAll(t, newSeeds, name))
	assert.Less(t, int64(dups), atKill+1, "only a tail is copied again")
	t.Logf("copies at kill %d, records %d, re-sent after the kill %d", atKill, len(olds), dups)
}

func headerOf(r *kgo.Record, key string) string {
	for _, h := range r.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}

// Bad input: nothing is produced to new and nothing committed on old.
func TestMirrorRefusesBadTopics(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name, wide := uniqueTopic("narrow"), uniqueTopic("wide")
	topic(t, oldSeeds, name, 3)
	topic(t, newSeeds, name, 4)
	topic(t, newSeeds, wide, 3)
	newWriter(t, oldSeeds, name, 3).produce(t, ctx, 10)
	oldOpts, newOpts := []kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}

	m, err := streams.NewMirror(streams.MirrorConfig{Topic: name, Old: oldOpts, New: newOpts})
	require.NoError(t, err)
	err = m.Run(ctx)
	require.ErrorIs(t, err, streams.ErrPartitionMismatch)
	assert.ErrorContains(t, err, "has 3 on the old cluster")
	assert.ErrorContains(t, err, "has 4 on the new one")

	m, err = streams.NewMirror(streams.MirrorConfig{Topic: "no-such-topic", TargetTopic: wide, Old: oldOpts, New: newOpts})
	require.NoError(t, err)
	err = m.Run(ctx)
	require.ErrorIs(t, err, streams.ErrUnknownTopic)
	assert.ErrorContains(t, err, `"no-such-topic" on the old cluster`)

	assert.Empty(t, readAll(t, newSeeds, name), "nothing produced")
	cl, err := kgo.NewClient(oldOpts...)
	require.NoError(t, err)
	defer cl.Close()
	groups, err := kadm.NewClient(cl).ListGroups(ctx)
	require.NoError(t, err)
	assert.NotContains(t, groups.Groups(), "dimmer-mirror."+name, "nothing committed")

	_, err = streams.NewMirror(streams.MirrorConfig{Topic: name, Old: oldOpts})
	require.ErrorIs(t, err, streams.ErrMissingCluster)
	assert.ErrorContains(t, err, "MirrorConfig.New")
}
