package main

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// frames counts redraws and cancels the command once a frame after the
// first shows until.
type frames struct {
	mu     sync.Mutex
	buf    strings.Builder
	n      int
	cancel context.CancelFunc
	until  string
	onDraw func(n int)
}

func (f *frames) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.buf.Write(p)
	if strings.Contains(string(p), clearScreen) {
		f.n++
		if f.onDraw != nil {
			f.onDraw(f.n)
		}
	}
	if f.n >= 2 && strings.Contains(string(p), f.until) {
		f.cancel()
	}
	return len(p), nil
}

func TestStatusWatchRedrawsInPlace(t *testing.T) {
	t.Parallel()
	s := stores(t)["postgres"]
	register(t, s.fleet, "api-1", 0)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f := &frames{cancel: cancel, until: "migration orders: dualwrite"}
	// Between the frames the migration moves: the watch shows it.
	f.onDraw = func(n int) {
		if n == 1 {
			go func() { dimmer(t, s.args, "stage", "set", "orders", "dualwrite", "--reason", "start") }()
		}
	}
	code := run(ctx, append(append([]string{"--actor", "tester"}, s.args...), "status", "orders", "--watch", "300ms"), f, &strings.Builder{})
	require.Equal(t, exitOK, code, "an interrupted watch ends cleanly")
	out := f.buf.String()
	assert.GreaterOrEqual(t, strings.Count(out, clearScreen), 2)
	assert.Equal(t, strings.Count(out, clearScreen), strings.Count(out, "verdict: "), "every frame is whole")
	first := out[:strings.Index(out[1:], clearScreen)+1]
	assert.Contains(t, first, "migration orders: off")
	assert.Contains(t, first, "verdict: GO")
	last := out[strings.LastIndex(out, clearScreen):]
	assert.Contains(t, last, "migration orders: dualwrite", "the last frame shows the change")
	assert.Contains(t, last, "verdict: NO-GO")

	r := dimmer(t, s.args, "status", "--watch", "1ms")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "use at least 100ms")
}
