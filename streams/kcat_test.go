package streams_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/streams"
)

// kcat returns the kcat binary; without it the test skips, or fails under
// CI=true (make test installs it: scripts/need-kcat.sh).
func kcat(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("kcat")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("kcat is missing (Debian package kcat; scripts/need-kcat.sh installs it): %v", err)
		}
		t.Skipf("kcat is missing (Debian package kcat; scripts/need-kcat.sh installs it): %v", err)
	}
	return path
}

// What dimmer wrote to the new cluster, read by librdkafka through kcat:
// every copy in its origin partition, key and value intact, its origin
// header naming the old record.
func TestKcatReadsCopies(t *testing.T) {
	t.Parallel()
	bin := kcat(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldSeeds, newSeeds := clusters(t)
	name := uniqueTopic("kcat")
	topic(t, oldSeeds, name, 3)
	topic(t, newSeeds, name, 3)
	log, _, _ := repairLog(t, "events")
	p, err := streams.NewProducer("events", name, newStage(flags.DualWrite),
		[]kgo.Opt{kgo.SeedBrokers(oldSeeds...)}, []kgo.Opt{kgo.SeedBrokers(newSeeds...)}, streams.WithRepairLog(log))
	require.NoError(t, err)
	want := map[string]string{} // origin -> "partition|key|value"
	for i := range 40 {
		k, v := fmt.Sprintf("k%d", i%7), fmt.Sprintf("v%d", i)
		o, err := p.Produce(ctx, &kgo.Record{Key: []byte(k), Value: []byte(v)})
		require.NoError(t, err)
		want[o.String()] = fmt.Sprintf("%d|%s|%s", o.Partition, k, v)
	}
	require.NoError(t, p.Close(ctx))

	out, err := exec.CommandContext(ctx, bin, "-C", "-b", strings.Join(newSeeds, ","), "-t", name, "-e", "-q",
		"-f", "%p|%k|%s|%h\n").CombinedOutput()
	require.NoError(t, err, "kcat: %s", out)
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		parts := strings.SplitN(line, "|", 4)
		require.Len(t, parts, 4, "kcat line %q", line)
		origin := ""
		for _, h := range strings.Split(parts[3], ",") {
			if v, ok := strings.CutPrefix(h, streams.HeaderOrigin+"="); ok {
				origin = v
			}
		}
		require.NotEmpty(t, origin, "kcat line %q has no origin header", line)
		got[origin] = strings.Join(parts[:3], "|")
	}
	assert.Equal(t, want, got)
}
