package console_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/flags"
)

func migrationData(t *testing.T, e *env) console.Migration {
	t.Helper()
	r := e.do(t, nil, "GET", "/api/m/orders", nil, true, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	var m console.Migration
	require.NoError(t, json.Unmarshal([]byte(r.body), &m))
	return m
}

func TestChartsFollowThePublishedWindows(t *testing.T) {
	t.Parallel()
	e := newEnv(t, console.WithHistory(time.Hour, 3))
	walk(t, e)
	for i, lasting := range []int64{0, 5, 20, 40} {
		e.beat(t, "api-1", "orders", 2, health("orders", flags.Shadow, flags.Health{Ops: 1000, Errors: int64(i), Compared: 1000, Mismatches: lasting + 3, Lasting: lasting}))
		require.NoError(t, e.srv.SampleOnce(ctx(t)))
	}
	m := migrationData(t, e)
	require.Len(t, m.History, 3, "the ring keeps the newest 3 samples; a page request within the interval adds none")
	var lasting []int64
	for i, s := range m.History {
		require.Len(t, s.Stages, 1)
		assert.Equal(t, "shadow", s.Stages[0].Stage)
		assert.Equal(t, int64(3), s.Stages[0].Transient)
		lasting = append(lasting, s.Stages[0].Lasting)
		if i > 0 {
			assert.False(t, s.At.Before(m.History[i-1].At), "oldest first")
		}
	}
	assert.Equal(t, []int64{5, 20, 40}, lasting)

	page := e.do(t, nil, "GET", "/m/orders?part=live", nil, true, nil)
	assert.Equal(t, 3, strings.Count(page.body, `<svg class="chart"`), "error rate, mismatch rate, p99")
	assert.Contains(t, page.body, `<polyline class="line stage-shadow"`)
	assert.Contains(t, page.body, `<polyline class="line stage-shadow transient"`)
}

func TestRunSamplesUntilCancelled(t *testing.T) {
	t.Parallel()
	e := newEnv(t, console.WithHistory(10*time.Millisecond, 100))
	walk(t, e)
	e.beat(t, "api-1", "orders", 2, health("orders", flags.Shadow, flags.Health{Ops: 10, Compared: 10}))
	c, cancel := context.WithCancel(ctx(t))
	done := make(chan error, 1)
	go func() { done <- e.srv.Run(c) }()
	require.Eventually(t, func() bool { return len(migrationData(t, e).History) >= 3 }, 20*time.Second, 10*time.Millisecond)
	cancel()
	select {
	case err := <-done:
		assert.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
}
