package main

import (
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/dimmer-dev/dimmer/dimmertest"
)

// TestFlagErrorsNameFlags: a value the relay's, the backfill's or the
// mirror's config refuses is reported as the flag the user typed, never as
// the Go field behind it; a zero that the config would read as "use the
// default" is refused rather than silently replaced.
func TestFlagErrorsNameFlags(t *testing.T) {
	t.Parallel()
	_, _, db := installOutbox(t, 4)
	relay := append([]string{"outbox", "relay", "--publisher", "redis", "--redis", dimmertest.RedisURL()}, db...)
	run := []string{"backfill", "run", "copy", "--migration", "m", "--source", "a", "--target", "b", "--key", "id", "--version-column", "v"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{slices.Concat(relay, []string{"--batch-size", "-5"}), "--batch-size: must be 1..10000, got -5"},
		{slices.Concat(relay, []string{"--batch-size", "0"}), "--batch-size 0: must be positive"},
		{slices.Concat(relay, []string{"--max-attempts", "0"}), "--max-attempts 0: must be positive"},
		{slices.Concat(relay, []string{"--max-attempts", "-1"}), "--max-attempts: must be at least 1"},
		{slices.Concat(relay, []string{"--lease-ttl", "5ms"}), "--lease-ttl: must be at least 100ms"},
		{slices.Concat(relay, []string{"--poll", "-1s"}), "--poll: must be at least 1ms"},
		{slices.Concat(run, []string{"--workers", "0"}), "--workers 0: must be positive"},
		{slices.Concat(run, []string{"--workers", "-2"}), "--workers: -2 is negative"},
		{slices.Concat(run, []string{"--chunk-time", "-1s"}), "--chunk-time: -1s is negative"},
		{slices.Concat(run, []string{"--chunk-time", "0s"}), "--chunk-time 0s: must be positive"},
		{slices.Concat(run, []string{"--rows-per-second", "-3"}), "--rows-per-second: -3"},
		{slices.Concat(run, []string{"--lease-ttl", "10ms"}), "--lease-ttl: 10ms is shorter than 1s"},
		{slices.Concat(run, []string{"--chunk-time", "2s", "--lease-ttl", "3s"}), "--lease-ttl: 3s is shorter than 4s (1s, and two --chunk-time)"},
		{[]string{"stream", "mirror", "orders", "--batch", "0"}, "--batch 0: must be positive"},
		{[]string{"stream", "mirror", "orders", "--batch", "-1"}, "--batch -1: must be positive"},
	} {
		r := dimmer(t, nil, tc.args...)
		assert.Equal(t, exitUsage, r.code, "%v\nstderr: %s", tc.args, r.stderr)
		assert.Contains(t, r.stderr, tc.want, "%v", tc.args)
		assert.NotRegexp(t, `Config|BatchSize|MaxAttempts|LeaseTTL|PollInterval|TargetChunkTime|Workers|MaxBatch`, r.stderr, "%v", tc.args)
	}
}
