package streams

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/flags"
)

// The processed set against a plain map, under random adds, removes and
// native progress, through an encode/decode round trip.
func TestSeenMatchesAMap(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for round := range 200 {
		var s seen
		want := map[int64]bool{}
		for range 300 {
			off := r.Int64N(200)
			switch r.IntN(5) {
			case 0:
				s.remove(off)
				delete(want, off)
			case 1:
				s.reachTo(off)
				for i := int64(0); i < off; i++ {
					want[i] = true
				}
			default:
				s.add(off)
				want[off] = true
			}
		}
		p := partState{epoch: uint64(round)}
		p.side[flags.New] = s
		md, err := p.encode()
		if err != nil {
			require.ErrorIs(t, err, ErrStateTooLarge)
			continue
		}
		back, ok, err := decodeState(md)
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, p.epoch, back.epoch)
		for off := int64(0); off < 220; off++ {
			require.Equal(t, want[off], back.side[flags.New].has(off), "round %d offset %d in %s", round, off, md)
		}
		for i := 1; i < len(s.done); i++ {
			require.Greater(t, s.done[i].lo, s.done[i-1].hi, "spans disjoint and apart")
		}
	}
}

func TestDecodeStateRefusesOthers(t *testing.T) {
	_, ok, err := decodeState("")
	assert.NoError(t, err)
	assert.False(t, ok)
	for _, md := range []string{"x", "dimmer1 e=1 old=3", "dimmer1 e=x old=0 new=0", "dimmer1 e=1 old=0,5-3 new=0", "dimmer1 e=1 old=5~3 new=0", "dimmer1 e=1 old=0 new=0 y=3"} {
		_, _, err := decodeState(md)
		assert.ErrorIs(t, err, ErrBadState, md)
	}
}

func TestParseOrigin(t *testing.T) {
	o, err := ParseOrigin("new/2/77")
	require.NoError(t, err)
	assert.Equal(t, Origin{Side: flags.New, Partition: 2, Offset: 77}, o)
	assert.Equal(t, "new/2/77", o.String())
	for _, v := range []string{"", "old/1", "mid/1/2", "old/-1/2", "old/1/x"} {
		_, err := ParseOrigin(v)
		assert.ErrorIs(t, err, ErrBadOrigin, v)
	}
}

func TestParseMirrorCheckpoint(t *testing.T) {
	for _, c := range []struct {
		md   string
		want int64
		ok   bool
	}{
		{mirrorMetaPrefix + "42", 42, true},
		{"dimmer-mirror1 new=7", 7, true}, // written before mirrors could copy back
		{"dimmer-mirror1 to=x", 0, false},
		{"dimmer1 e=1 old=3", 0, false},
		{"", 0, false},
	} {
		got, ok := ParseMirrorCheckpoint(c.md)
		assert.Equal(t, c.ok, ok, c.md)
		assert.Equal(t, c.want, got, c.md)
	}
}
