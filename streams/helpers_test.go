package streams_test

import (
	"context"
	"fmt"
	"os"
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

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
)

// clusters returns the old and the new cluster's seed brokers:
// DIMMER_KAFKA_BROKERS and DIMMER_KAFKA_BROKERS_NEW when both are set,
// else two in-process kfake clusters on loopback.
func clusters(t testing.TB) (old, new []string) {
	t.Helper()
	o, n := os.Getenv("DIMMER_KAFKA_BROKERS"), os.Getenv("DIMMER_KAFKA_BROKERS_NEW")
	if o != "" && n != "" {
		return strings.Split(o, ","), strings.Split(n, ",")
	}
	seeds := func() []string {
		c, err := kfake.NewCluster(kfake.NumBrokers(1))
		require.NoError(t, err)
		t.Cleanup(c.Close)
		return c.ListenAddrs()
	}
	return seeds(), seeds()
}

// topic creates a uniquely named topic with n partitions on the cluster
// and deletes it after the test.
func topic(t testing.TB, seeds []string, name string, n int32) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
	require.NoError(t, err)
	t.Cleanup(cl.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := kadm.NewClient(cl).CreateTopic(ctx, n, 1, nil, name)
	require.NoError(t, err)
	require.NoError(t, resp.Err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = kadm.NewClient(cl).DeleteTopics(ctx, name)
	})
}

func uniqueTopic(prefix string) string { return dimmertest.Name(prefix) }

// stageVar is a stage source tests flip.
type stageVar struct{ v atomic.Int32 }

func newStage(s flags.Stage) *stageVar { v := &stageVar{}; v.set(s); return v }
func (s *stageVar) set(st flags.Stage) { s.v.Store(int32(st)) }
func (s *stageVar) Stage(context.Context, string, string) (flags.Stage, error) {
	return flags.Stage(s.v.Load()), nil
}

// ledger records what a handler processed: per value, how many times, and
// per key, the sequence numbers in processing order.
type ledger struct {
	mu    sync.Mutex
	times map[string]int
	seqs  map[string][]int
	n     atomic.Int64
}

func newLedger() *ledger { return &ledger{times: map[string]int{}, seqs: map[string][]int{}} }

func (l *ledger) handle(_ context.Context, rec *kgo.Record) error {
	var key string
	var seq int
	if _, err := fmt.Sscanf(string(rec.Value), "%s %d", &key, &seq); err != nil {
		return fmt.Errorf("bad value %q: %w", rec.Value, err)
	}
	l.mu.Lock()
	l.times[string(rec.Value)]++
	l.seqs[key] = append(l.seqs[key], seq)
	l.mu.Unlock()
	l.n.Add(1)
	return nil
}

// check asserts every one of want values was processed exactly once, and
// each key's sequence numbers in increasing order. It returns the counts.
func (l *ledger) check(t testing.TB, want []string) (skipped, twice, disorder int) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, v := range want {
		switch n := l.times[v]; {
		case n == 0:
			skipped++
		case n > 1:
			twice += n - 1
		}
	}
	for _, seqs := range l.seqs {
		for i := 1; i < len(seqs); i++ {
			if seqs[i] <= seqs[i-1] {
				disorder++
			}
		}
	}
	return skipped, twice, disorder
}

// assertExact asserts every record of want was processed exactly once,
// in per-key order.
func (l *ledger) assertExact(t testing.TB, want []string) {
	t.Helper()
	skipped, twice, disorder := l.check(t, want)
	assert.Zero(t, skipped, "skipped")
	assert.Zero(t, twice, "processed twice")
	assert.Zero(t, disorder, "per-key order violations")
}

// writer produces "key seq" values, keyed, to one cluster in the
// background, as producers that cannot be changed would.
type writer struct {
	cl     *kgo.Client
	topic  string
	keys   int
	mu     sync.Mutex
	values []string
	seq    map[string]int
}

func newWriter(t testing.TB, seeds []string, topic string, keys int) *writer {
	cl, err := kgo.NewClient(kgo.SeedBrokers(seeds...), kgo.DefaultProduceTopic(topic))
	require.NoError(t, err)
	t.Cleanup(cl.Close)
	return &writer{cl: cl, topic: topic, keys: keys, seq: map[string]int{}}
}

func (w *writer) next(i int) (key, value string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	key = fmt.Sprintf("k%03d", i%w.keys)
	w.seq[key]++
	value = fmt.Sprintf("%s %d", key, w.seq[key])
	w.values = append(w.values, value)
	return key, value
}

// produce writes n records synchronously.
func (w *writer) produce(t testing.TB, ctx context.Context, n int) {
	recs := make([]*kgo.Record, n)
	for i := range recs {
		k, v := w.next(i)
		recs[i] = &kgo.Record{Key: []byte(k), Value: []byte(v)}
	}
	require.NoError(t, w.cl.ProduceSync(ctx, recs...).FirstErr())
}

func (w *writer) all() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.values...)
}

// eventually waits for cond, failing the test after d.
func eventually(t testing.TB, d time.Duration, msg string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for: %s", d, msg)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// goRun runs run in wg until the returned stop is called; run must then
// return nil (a Consumer, Mirror or Shadow stopped by its context does).
func goRun(t testing.TB, wg *sync.WaitGroup, ctx context.Context, run func(context.Context) error) (stop context.CancelFunc) {
	ctx, stop = context.WithCancel(ctx)
	wg.Go(func() { assert.NoError(t, run(ctx)) })
	return stop
}
