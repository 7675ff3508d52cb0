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

	"github.com/dimmer-dev/dimmer/cdc"
	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/dimmertest"
)

// A slot nobody reads keeps the WAL written after it: past the bound the
// overview and the migration page raise a critical alert naming it, as
// `dimmer cdc status --max-retained` fails; a slot registered but gone is
// critical too.
func TestSlotsRetainedWALAlerts(t *testing.T) {
	t.Parallel()
	src := dimmertest.Pool(t, dimmertest.LogicalDatabase(t))
	c := ctx(t)
	slot := dimmertest.Name("s_")
	gone := dimmertest.Name("s_")
	for _, name := range []string{slot, gone} {
		require.NoError(t, cdc.CreateSlot(c, src, cdc.SlotSpec{Slot: name, Purpose: "relay"}))
		t.Cleanup(func() {
			dc, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			assert.NoError(t, cdc.DropSlot(dc, src, "", name, true))
		})
	}
	_, err := src.Exec(c, `SELECT pg_drop_replication_slot($1)`, gone)
	require.NoError(t, err)
	_, err = src.Exec(c, `CREATE TABLE filler AS SELECT i, repeat('x', 200) AS pad FROM generate_series(1, 20000) i`)
	require.NoError(t, err)

	e := newEnv(t, console.WithSlots(console.CDCSlots(src, ""), 1<<20))
	e.beat(t, "api-0", "orders", 0, nil)
	_, err = e.ctrl.Advance(c, "orders", "alice", "start")
	require.NoError(t, err)

	var ov console.Overview
	r := e.do(t, nil, "GET", "/api/overview", nil, true, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	require.NoError(t, json.Unmarshal([]byte(r.body), &ov))
	require.NotNil(t, ov.Slots)
	require.Len(t, ov.Slots.Slots, 2)
	byName := map[string]console.SlotView{}
	for _, s := range ov.Slots.Slots {
		byName[s.Slot] = s
	}
	kept := byName[slot]
	assert.True(t, kept.Exists)
	assert.False(t, kept.Active)
	assert.Greater(t, kept.RetainedBytes, int64(1<<20), "20k rows of WAL retained")
	assert.True(t, kept.Over)
	assert.False(t, byName[gone].Exists)
	assert.True(t, byName[gone].Over)
	texts := func(as []console.Alert) map[string]string {
		m := map[string]string{}
		for _, a := range as {
			m[a.Text] = a.Level
		}
		return m
	}
	assertSlotAlerts := func(as []console.Alert) {
		t.Helper()
		var retained, missing bool
		for text, level := range texts(as) {
			switch {
			case level == "critical" && strings.Contains(text, slot) && strings.Contains(text, "retains") && strings.Contains(text, "bound 1.0 MiB"):
				retained = true
			case level == "critical" && strings.Contains(text, gone) && strings.Contains(text, "does not exist"):
				missing = true
			}
		}
		assert.True(t, retained, "retained-WAL alert for %s in %v", slot, as)
		assert.True(t, missing, "missing-slot alert for %s in %v", gone, as)
	}
	assertSlotAlerts(ov.Alerts)

	var m console.Migration
	r = e.do(t, nil, "GET", "/api/m/orders", nil, true, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	require.NoError(t, json.Unmarshal([]byte(r.body), &m))
	require.NotNil(t, m.Slots)
	assert.Len(t, m.Slots.Slots, 2)
	assertSlotAlerts(m.Alerts)

	for _, path := range []string{"/", "/m/orders"} {
		r = e.do(t, nil, "GET", path, nil, true, nil)
		require.Equal(t, http.StatusOK, r.status)
		assert.Contains(t, r.body, `<tr class="slot over" data-slot="`+slot+`">`, path)
		assert.Contains(t, r.body, "retains", path)
	}

	// Under a generous bound the idle slot is only a warning.
	e2 := newEnv(t, console.WithSlots(console.CDCSlots(src, ""), 1<<40))
	r = e2.do(t, nil, "GET", "/api/overview", nil, true, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	ov = console.Overview{}
	require.NoError(t, json.Unmarshal([]byte(r.body), &ov))
	got := texts(ov.Alerts)
	var idle bool
	for text, level := range got {
		assert.NotContains(t, text, "bound", "no retained-WAL alert under a 1 TiB bound")
		if level == "warning" && strings.Contains(text, slot) && strings.Contains(text, "no reader connected") {
			idle = true
		}
	}
	assert.True(t, idle, "idle-slot warning in %v", got)
}

func TestWithSlotsRefusesBadInput(t *testing.T) {
	e := newEnv(t)
	_, err := console.New(e.ctrl, e.store, token, console.WithSlots(nil, 0))
	require.ErrorContains(t, err, "WithSlots: nil")
	_, err = console.New(e.ctrl, e.store, token, console.WithSlots(console.CDCSlots(e.pool, ""), -1))
	require.ErrorContains(t, err, "maxRetained -1")
}
