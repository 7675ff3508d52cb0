package backfill

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestSizerFollowsTargetChunkTime(t *testing.T) {
	s := newSizer(Config{TargetChunkTime: 500 * time.Millisecond, InitialChunk: 1000, MinChunk: 100, MaxChunk: 100000})
	// 10µs a row: 50,000 rows make 500ms, reached by doubling, never jumping.
	var sizes []int
	for range 10 {
		s.observe(s.size, time.Duration(s.size)*10*time.Microsecond)
		sizes = append(sizes, s.size)
	}
	assert.Equal(t, []int{2000, 4000, 8000, 16000, 32000, 50000, 50000, 50000, 50000, 50000}, sizes)
	// The server slows down tenfold: the EWMA brings the chunk down.
	for range 15 {
		s.observe(s.size, time.Duration(s.size)*100*time.Microsecond)
	}
	assert.InDelta(t, 5000, s.size, 100)
	s.backoff()
	assert.InDelta(t, 2500, s.size, 50)
	for range 20 {
		s.observe(s.size, time.Duration(s.size)*time.Second)
	}
	assert.Equal(t, 100, s.size, "bounded below")
}

func TestPacerHoldsRate(t *testing.T) {
	p := &pacer{rate: 1000}
	start := time.Now()
	for range 5 {
		// Instant chunks of 100 rows.
		time.Sleep(p.take(100, time.Now()))
	}
	// A limit must never be exceeded; a loaded machine may oversleep, which
	// only lowers the rate, so the upper bound is loose.
	elapsed := time.Since(start)
	assert.GreaterOrEqual(t, elapsed, 440*time.Millisecond, "500 rows at 1000/s went faster than the limit (a 50ms burst allowed)")
	assert.Less(t, elapsed, 1500*time.Millisecond, "500 rows at 1000/s")
	var nilPacer *pacer
	assert.Zero(t, nilPacer.take(1000, time.Now()))
}

func TestLatencySignal(t *testing.T) {
	cur := 5 * time.Millisecond
	s := Latency("p99", func() time.Duration { return cur }, 10*time.Millisecond)
	d, why, err := s.Hold(context.Background())
	assert.NoError(t, err)
	assert.Zero(t, d)
	assert.Empty(t, why)
	cur = 30 * time.Millisecond
	d, why, err = s.Hold(context.Background())
	assert.NoError(t, err)
	assert.Equal(t, 200*time.Millisecond, d, "4x the excess, at least 4x50ms")
	assert.Equal(t, "p99 at 30ms (limit 10ms)", why)
}

func TestDutyCycleAIMD(t *testing.T) {
	d := newDuty()
	clock := d.since
	d.now = func() time.Time { return clock }
	tick := func(dt time.Duration) { clock = clock.Add(dt) }

	tick(time.Second)
	rest, share := d.ran(50*time.Millisecond, false)
	assert.InDelta(t, 2*startDuty, share, 1e-9, "slow start: doubles every second until a signal holds")
	assert.InDelta(t, float64(50*time.Millisecond)*(1-share)/share, float64(rest), float64(time.Microsecond))
	tick(2 * time.Second)
	rest, share = d.ran(50*time.Millisecond, false)
	assert.Zero(t, rest, "no signal complained: full speed, no rest")
	assert.Equal(t, 1.0, share)

	d.cut()
	d.cut()
	tick(time.Second)
	rest, share = d.ran(50*time.Millisecond, true)
	assert.Equal(t, 0.25, share, "halved by each hold, nothing won while held")
	assert.Equal(t, 150*time.Millisecond, rest, "works a quarter of the time")
	tick(time.Second)
	_, share = d.ran(50*time.Millisecond, false)
	assert.InDelta(t, 0.25+dutyStep, share, 1e-9, "after a hold: a step per second without one")
	tick(100 * time.Millisecond)
	_, share = d.ran(50*time.Millisecond, false)
	assert.InDelta(t, 0.25+dutyStep*1.1, share, 1e-9, "won by time, not by chunk")
	d.cut()
	for range 10 {
		d.cut()
	}
	_, share = d.ran(time.Millisecond, true)
	assert.Equal(t, minDuty, share, "bounded below")
}
