package flags

import (
	"fmt"
	"slices"
)

// Transition is a proposed change of a migration's state, as guards see it.
type Transition struct {
	Migration string
	From, To  State
	Actor     string
	Reason    string
	Force     bool
}

// Move is what happens to the keys in one slice of the key space.
type Move struct {
	From, To Stage
	// Percent of keys making this move.
	Percent float64
}

// Moves splits the key space into slices that each go from one stage to one
// stage. Because rollouts are keyed by the same sticky bucket, this is exact:
// no key is assumed to make a move it does not make.
func (t Transition) Moves() []Move {
	bounds := []uint32{0, BucketCount}
	if t.From.Rollout != nil {
		bounds = append(bounds, t.From.Rollout.threshold())
	}
	if t.To.Rollout != nil {
		bounds = append(bounds, t.To.Rollout.threshold())
	}
	slices.Sort(bounds)
	bounds = slices.Compact(bounds)
	var moves []Move
	for i := 0; i+1 < len(bounds); i++ {
		lo, hi := bounds[i], bounds[i+1]
		m := Move{From: stageAt(&t.From, lo), To: stageAt(&t.To, lo), Percent: float64(hi-lo) * 100 / BucketCount}
		if n := len(moves); n > 0 && moves[n-1].From == m.From && moves[n-1].To == m.To {
			moves[n-1].Percent += m.Percent
			continue
		}
		moves = append(moves, m)
	}
	return moves
}

func stageAt(s *State, bucket uint32) Stage {
	if s.Rollout != nil && bucket < s.Rollout.threshold() {
		return s.Rollout.Stage
	}
	return s.Stage
}

// Forward reports whether some keys move to a later stage. Guards judge only
// forward transitions: going back is always allowed before complete, because
// old was written all along.
func (t Transition) Forward() bool {
	for _, m := range t.Moves() {
		if m.To > m.From {
			return true
		}
	}
	return false
}

// Entering reports whether some keys move into stage s from an earlier stage.
func (t Transition) Entering(s Stage) bool {
	for _, m := range t.Moves() {
		if m.To == s && m.From < s {
			return true
		}
	}
	return false
}

// LeavingComplete reports whether some keys leave complete.
func (t Transition) LeavingComplete() bool {
	for _, m := range t.Moves() {
		if m.From == Complete && m.To != Complete {
			return true
		}
	}
	return false
}

// skips lists the forward moves that skip a stage: they are never allowed.
func (t Transition) skips() []Move {
	var bad []Move
	for _, m := range t.Moves() {
		if m.To > m.From+1 {
			bad = append(bad, m)
		}
	}
	return bad
}

func (m Move) String() string {
	return fmt.Sprintf("%s -> %s (%s%% of keys)", m.From, m.To, trimFloat(m.Percent))
}
