package shadowread_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/shadowread"
)

// syncBuffer is a log destination safe for the reader's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// logLines decodes the JSON log lines of buf.
func logLines(t *testing.T, buf *syncBuffer) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		require.NoError(t, json.Unmarshal([]byte(line), &m), line)
		out = append(out, m)
	}
	return out
}

// TestReportsNamePathsNotValues: by default a mismatch report, and the log
// line SlogSink writes from it, names the differing fields and carries none
// of the values, not even an error text of a failed side; the test hook
// still sees everything.
func TestReportsNamePathsNotValues(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	s.put(t, "p1", "alice@old.example", "bob@new.example")
	failing := func(ctx context.Context, id string) (user, error) {
		if id == "p2" {
			return user{}, fmt.Errorf("no row for carol@secret.example: %w", errNotFound)
		}
		return s.readOld(ctx, id)
	}
	s.put(t, "p2", "x", "dave@new.example")

	buf := &syncBuffer{}
	logger := slog.New(slog.NewJSONHandler(buf, nil))
	var mu sync.Mutex
	var sunk, handled []shadowread.Report
	sink := shadowread.ReportSinkFunc(func(ctx context.Context, r shadowread.Report) {
		mu.Lock()
		sunk = append(sunk, r)
		mu.Unlock()
		shadowread.SlogSink(logger).Report(ctx, r)
	})
	r := newReaderFns(t, s, stageOf(flags.Shadow), failing, s.readNew, shadowread.WithWait(), shadowread.WithRecheck(0),
		shadowread.WithReports(sink, 0, nil),
		shadowread.WithMismatchHandler(func(r shadowread.Report) { mu.Lock(); handled = append(handled, r); mu.Unlock() }))
	for _, id := range []string{"p1", "p2"} {
		_, _ = r.Read(ctx(t), id)
	}

	mu.Lock()
	defer mu.Unlock()
	require.Len(t, sunk, 2)
	assert.Equal(t, []string{"Name"}, sunk[0].Diff.Paths())
	assert.Equal(t, []string{"<error>"}, sunk[1].Diff.Paths())
	for _, rep := range sunk {
		assert.False(t, rep.Values)
		for _, d := range rep.Diff {
			assert.Empty(t, d.Served, "no served value at %s", d.Path)
			assert.Empty(t, d.Shadow, "no shadow value at %s", d.Path)
		}
	}
	out := buf.String()
	for _, secret := range []string{"alice", "bob", "carol", "dave", "example"} {
		assert.NotContains(t, out, secret, "the log carries no value")
	}
	lines := logLines(t, buf)
	require.Len(t, lines, 2)
	assert.Equal(t, []any{"Name"}, lines[0]["paths"])
	assert.Equal(t, "p1", lines[0]["key"])
	assert.NotContains(t, lines[0], "diff")

	require.Len(t, handled, 2, "the test hook sees every mismatch")
	assert.Equal(t, "alice@old.example", handled[0].Diff[0].Served, "with values, for a test's failure message")
}

// TestReportValuesOptIn: with WithReportValues the report carries the
// values as the service's redaction left them, and SlogSink logs the diff.
func TestReportValuesOptIn(t *testing.T) {
	t.Parallel()
	s := newStores(t)
	s.put(t, "p1", "alice@old.example", "bob@new.example")
	buf := &syncBuffer{}
	logger := slog.New(slog.NewJSONHandler(buf, nil))
	reports := make(chan shadowread.Report, 1)
	sink := shadowread.ReportSinkFunc(func(ctx context.Context, r shadowread.Report) {
		reports <- r
		shadowread.SlogSink(logger).Report(ctx, r)
	})
	maskDomain := func(d shadowread.Difference) shadowread.Difference {
		cut := func(v string) string {
			if user, _, ok := strings.Cut(v, "@"); ok {
				return user + "@…"
			}
			return v
		}
		d.Served, d.Shadow = cut(d.Served), cut(d.Shadow)
		return d
	}
	r := newReader(t, s, stageOf(flags.Shadow), shadowread.WithWait(), shadowread.WithRecheck(0),
		shadowread.WithReports(sink, 0, nil), shadowread.WithReportValues(maskDomain))
	_, err := r.Read(ctx(t), "p1")
	require.NoError(t, err)
	var rep shadowread.Report
	select {
	case rep = <-reports:
	case <-time.After(10 * time.Second):
		t.Fatal("no report")
	}
	assert.True(t, rep.Values)
	require.Len(t, rep.Diff, 1)
	assert.Equal(t, shadowread.Difference{Path: "Name", Served: "alice@…", Shadow: "bob@…"}, rep.Diff[0])
	lines := logLines(t, buf)
	require.Len(t, lines, 1)
	assert.Equal(t, "Name: alice@… != bob@…", lines[0]["diff"])
	assert.NotContains(t, buf.String(), "example", "the redaction ran before the log")

	_, err = shadowread.New("users_to_redis", stageOf(flags.Shadow), s.readOld, s.readNew, idKey, shadowread.WithReportValues(nil))
	require.ErrorContains(t, err, "WithReportValues")
}
