package flags_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/cespare/xxhash/v2"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
)

func TestParseStageRoundTrip(t *testing.T) {
	for _, s := range flags.Stages() {
		got, err := flags.ParseStage(s.String())
		require.NoError(t, err)
		assert.Equal(t, s, got)
	}
}

func TestParseStageUnknownNamesValidStages(t *testing.T) {
	for _, in := range []string{"", "LIVE", "on", "shadow "} {
		_, err := flags.ParseStage(in)
		require.ErrorIs(t, err, flags.ErrUnknownStage, "input %q", in)
		assert.Contains(t, err.Error(), fmt.Sprintf("%q", in))
		assert.Contains(t, err.Error(), "off, dualwrite, shadow, live, rampdown, complete")
	}
}

func TestStageJSON(t *testing.T) {
	b, err := json.Marshal(struct{ S flags.Stage }{flags.RampDown})
	require.NoError(t, err)
	assert.JSONEq(t, `{"S":"rampdown"}`, string(b))
	var v struct{ S flags.Stage }
	require.ErrorIs(t, json.Unmarshal([]byte(`{"S":"bogus"}`), &v), flags.ErrUnknownStage)
}

// The routing table of the stage model, row by row.
func TestRoutingTable(t *testing.T) {
	type row struct {
		writesOld, writesNew bool
		auth, secondary      flags.Side
		reads, compared      flags.Side
	}
	want := map[flags.Stage]row{
		flags.Off:       {true, false, flags.Old, flags.NoSide, flags.Old, flags.NoSide},
		flags.DualWrite: {true, true, flags.Old, flags.New, flags.Old, flags.NoSide},
		flags.Shadow:    {true, true, flags.Old, flags.New, flags.Old, flags.New},
		flags.Live:      {true, true, flags.New, flags.Old, flags.New, flags.Old},
		flags.RampDown:  {true, true, flags.New, flags.Old, flags.New, flags.NoSide},
		flags.Complete:  {false, true, flags.New, flags.NoSide, flags.New, flags.NoSide},
	}
	require.Len(t, want, len(flags.Stages()))
	for s, w := range want {
		got := row{s.Writes(flags.Old), s.Writes(flags.New), s.Authoritative(), s.Secondary(), s.Reads(), s.Compared()}
		assert.Equal(t, w, got, "stage %s", s)
	}
}

func TestBucketIsStableAndUniform(t *testing.T) {
	// Pinned values: the hash is a documented contract other processes and
	// languages reproduce, so it must never change silently.
	assert.Equal(t, uint32(9632), flags.Bucket("orders", "customer-42"))
	assert.Equal(t, uint32(3761), flags.Bucket("orders", "customer-43"))
	assert.Equal(t, uint32(3355), flags.Bucket("users-email", "1"))
	// And it is the documented formula.
	for _, k := range []string{"", "a", "customer-42", "ключ"} {
		assert.Equal(t, uint32(xxhash.Sum64String("orders/"+k)%flags.BucketCount), flags.Bucket("orders", k))
	}
	counts := make([]int, 10)
	const n = 100_000
	for i := range n {
		counts[flags.Bucket("orders", fmt.Sprintf("key-%d", i))/1000]++
	}
	for i, c := range counts {
		assert.InDelta(t, n/10, c, n/100, "decile %d", i)
	}
}

func TestStateStageForSplit(t *testing.T) {
	st := flags.State{Migration: "orders", Stage: flags.Shadow, Rollout: &flags.Rollout{Stage: flags.Live, Percent: 5}}
	const n = 100_000
	live := 0
	for i := range n {
		switch st.StageFor(fmt.Sprintf("user-%d", i)) {
		case flags.Live:
			live++
		case flags.Shadow:
		default:
			t.Fatalf("unexpected stage")
		}
	}
	assert.InDelta(t, 0.05, float64(live)/n, 0.01)
	assert.Equal(t, flags.Shadow, st.StageFor(""), "no entity key gets the base stage")

	// Growing the share only adds keys.
	wider := st
	wider.Rollout = &flags.Rollout{Stage: flags.Live, Percent: 10}
	for i := range 20_000 {
		k := fmt.Sprintf("user-%d", i)
		if st.StageFor(k) == flags.Live {
			require.Equal(t, flags.Live, wider.StageFor(k), "key %s left the rollout when it grew", k)
		}
	}
}

func TestDecodeStateRejectsBadDocuments(t *testing.T) {
	for doc, want := range map[string]string{
		`{"migration":"orders","stage":"sideways"}`:                                     `unknown stage "sideways"`,
		`{"migration":"Orders!","stage":"off"}`:                                         `invalid migration name "Orders!"`,
		`{"migration":"orders","stage":"off","rollout":{"stage":"live","percent":120}}`: "percent 120",
		`not json`:                            "decode stage flag document",
		`{"migration":"orders","revision":1}`: `it has no "stage"`,
		`{"migration":"orders","stage":null,"revision":1}`: `it has no "stage"`,
		`null`: "the document is null",
	} {
		_, err := flags.DecodeState([]byte(doc))
		require.Error(t, err, doc)
		assert.Contains(t, err.Error(), want)
	}
	st := flags.State{Migration: "orders", Stage: flags.Live, Rollout: &flags.Rollout{Stage: flags.RampDown, Percent: 12.5}, Revision: 4, Epoch: 1}
	b, err := st.Encode()
	require.NoError(t, err)
	back, err := flags.DecodeState(b)
	require.NoError(t, err)
	assert.Equal(t, st, back)
	assert.Equal(t, "live (rampdown 12.5%)", back.String())
	assert.False(t, math.IsNaN(back.Rollout.Percent))
}

func TestTransitionMovesAreExact(t *testing.T) {
	from := flags.State{Migration: "m", Stage: flags.DualWrite, Rollout: &flags.Rollout{Stage: flags.Shadow, Percent: 5}}
	to := flags.State{Migration: "m", Stage: flags.Shadow, Rollout: &flags.Rollout{Stage: flags.Live, Percent: 5}}
	tr := flags.Transition{Migration: "m", From: from, To: to}
	assert.Equal(t, []flags.Move{
		{From: flags.Shadow, To: flags.Live, Percent: 5},
		{From: flags.DualWrite, To: flags.Shadow, Percent: 95},
	}, tr.Moves())
	assert.True(t, tr.Forward())
	assert.True(t, tr.Entering(flags.Live))
	assert.False(t, tr.LeavingComplete())

	back := flags.Transition{Migration: "m", From: to, To: flags.State{Migration: "m", Stage: flags.Off}}
	assert.False(t, back.Forward())
}

// The topic table: consumers move to new one stage before the
// producers' acknowledgement does.
func TestTopicRoutingTable(t *testing.T) {
	type row struct {
		auth, secondary   flags.Side
		consume, compared flags.Side
	}
	want := map[flags.Stage]row{
		flags.Off:       {flags.Old, flags.NoSide, flags.Old, flags.NoSide},
		flags.DualWrite: {flags.Old, flags.New, flags.Old, flags.NoSide},
		flags.Shadow:    {flags.Old, flags.New, flags.Old, flags.New},
		flags.Live:      {flags.Old, flags.New, flags.New, flags.Old},
		flags.RampDown:  {flags.New, flags.Old, flags.New, flags.NoSide},
		flags.Complete:  {flags.New, flags.NoSide, flags.New, flags.NoSide},
	}
	require.Len(t, want, len(flags.Stages()))
	for s, w := range want {
		got := row{s.ProduceAuthoritative(), s.ProduceSecondary(), s.Reads(), s.Compared()}
		assert.Equal(t, w, got, "stage %s", s)
	}
}

// SplitCorrupt picks the corrupt flags out of a store's joined error and
// keeps the rest as an error of its own.
func TestSplitCorrupt(t *testing.T) {
	a := &flags.CorruptFlagError{Migration: "a", Err: errors.New("x")}
	b := &flags.CorruptFlagError{Migration: "b", Err: errors.New("y")}
	other := errors.New("connection reset")
	corrupt, rest := flags.SplitCorrupt(errors.Join(fmt.Errorf("store: %w", a), b))
	assert.Equal(t, []*flags.CorruptFlagError{a, b}, corrupt)
	assert.NoError(t, rest)
	corrupt, rest = flags.SplitCorrupt(errors.Join(a, other))
	assert.Equal(t, []*flags.CorruptFlagError{a}, corrupt)
	assert.ErrorIs(t, rest, other)
	corrupt, rest = flags.SplitCorrupt(nil)
	assert.Nil(t, corrupt)
	assert.NoError(t, rest)
}
