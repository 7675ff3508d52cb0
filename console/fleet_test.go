package console_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/flags"
)

// countingFleet counts the reads of a real registry.
type countingFleet struct {
	flags.FleetStore
	reads atomic.Int64
}

func (c *countingFleet) Instances(ctx context.Context) ([]flags.Instance, error) {
	c.reads.Add(1)
	return c.FleetStore.Instances(ctx)
}

// A data request reads the fleet registry once for the console and every
// fleet guard of the next step; a transition outside a request still reads
// it afresh for each guard.
func TestShareFleetReadsOncePerRequest(t *testing.T) {
	t.Parallel()
	base := newEnv(t)
	walk(t, base)
	raw := &countingFleet{FleetStore: base.store}
	fleet := console.ShareFleet(raw)
	ctrl, err := flags.NewController(base.store, flags.WithFleet(fleet),
		flags.WithGuards(flags.HealthGuard(fleet, flags.WatchdogConfig{MinSamples: 100}), flags.CanaryGuard(fleet, flags.WatchdogConfig{})),
		flags.WithControllerLogger(quiet))
	require.NoError(t, err)
	srv, err := console.New(ctrl, fleet, token, console.WithLogger(quiet))
	require.NoError(t, err)
	e := *base
	e.http = httptest.NewServer(srv)
	t.Cleanup(e.http.Close)

	r := e.do(t, nil, "GET", "/api/m/orders", nil, true, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	var m console.Migration
	require.NoError(t, json.Unmarshal([]byte(r.body), &m))
	assert.Len(t, m.Instances, 1)
	assert.Equal(t, int64(1), raw.reads.Load(), "console, barrier and health guard share one read")
	r = e.do(t, nil, "GET", "/api/overview", nil, true, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	assert.Equal(t, int64(2), raw.reads.Load())

	// Outside a console request every guard reads what the registry holds.
	raw.reads.Store(0)
	_, err = ctrl.Status(ctx(t), "orders", nil)
	require.NoError(t, err)
	assert.Equal(t, int64(2), raw.reads.Load(), "barrier and health guard each read")
}

// The timeline a page shows follows the audit log: an entry appended after
// a request (a refusal changes no revision) is on the next one.
func TestTimelineFollowsTheAuditLog(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	walk(t, e)
	get := func() console.Migration {
		r := e.do(t, nil, "GET", "/api/m/orders", nil, true, nil)
		require.Equal(t, http.StatusOK, r.status, r.body)
		var m console.Migration
		require.NoError(t, json.Unmarshal([]byte(r.body), &m))
		return m
	}
	first := get()
	require.Len(t, first.Timeline, 3)
	assert.Equal(t, get().Timeline, first.Timeline)
	_, err := e.ctrl.Advance(ctx(t), "orders", "carol", "go live now")
	require.ErrorIs(t, err, flags.ErrRefused)
	again := get()
	require.Len(t, again.Timeline, 4)
	assert.Equal(t, "go live now", again.Timeline[0].Reason)
	assert.NotEmpty(t, again.Timeline[0].Failed)
	assert.Equal(t, first.Timeline, again.Timeline[1:])
}
