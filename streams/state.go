package streams

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/dimmer-dev/dimmer/flags"
)

// span is a half-open range of offsets [lo, hi).
type span struct{ lo, hi int64 }

// seen is what one consumer group processed of one origin partition: every
// offset below next, and the offsets in done (sorted, disjoint, all above
// next). Copies of one origin partition can reach the other cluster out of
// origin order (several producer instances, a repair replayed after a later
// record), so processing on the other cluster leaves holes that done keeps.
//
// A set with more holes than a commit carries spills its smallest spans to
// an [Overflow] and remembers only the region they were in: an offset in
// [next, spilled) that done does not hold is asked of the overflow.
type seen struct {
	next    int64
	spilled int64
	done    []span
}

// unsure reports whether off is in the spilled region and not known here:
// only the overflow can tell whether it was processed.
func (s *seen) unsure(off int64) bool {
	return off >= s.next && off < s.spilled && !s.has(off)
}

// settle drops the spilled region once the frontier passed it.
func (s *seen) settle() {
	if s.spilled <= s.next {
		s.spilled = 0
	}
}

// spill removes the smallest spans until keep remain and returns them;
// the region they were in is asked of the overflow from then on.
func (s *seen) spill(keep int) []span {
	if len(s.done) <= keep {
		return nil
	}
	bySize := slices.Clone(s.done)
	slices.SortStableFunc(bySize, func(a, b span) int { return int((a.hi - a.lo) - (b.hi - b.lo)) })
	out := bySize[:len(s.done)-keep]
	drop := map[span]bool{}
	for _, sp := range out {
		drop[sp] = true
		s.spilled = max(s.spilled, sp.hi)
	}
	s.done = slices.DeleteFunc(s.done, func(sp span) bool { return drop[sp] })
	slices.SortFunc(out, func(a, b span) int { return int(a.lo - b.lo) })
	return out
}

func (s *seen) has(off int64) bool {
	if off < s.next {
		return true
	}
	_, found := slices.BinarySearchFunc(s.done, off, func(sp span, off int64) int {
		switch {
		case sp.hi <= off:
			return -1
		case sp.lo > off:
			return 1
		}
		return 0
	})
	return found
}

// add marks off processed.
func (s *seen) add(off int64) {
	if off < s.next {
		return
	}
	if off == s.next {
		s.next++
	} else {
		i := 0
		for i < len(s.done) && s.done[i].hi < off {
			i++
		}
		switch {
		case i < len(s.done) && s.done[i].lo <= off && off < s.done[i].hi:
			return
		case i < len(s.done) && s.done[i].hi == off:
			s.done[i].hi++
			if i+1 < len(s.done) && s.done[i+1].lo == s.done[i].hi {
				s.done[i].hi = s.done[i+1].hi
				s.done = slices.Delete(s.done, i+1, i+2)
			}
		case i < len(s.done) && s.done[i].lo == off+1:
			s.done[i].lo--
		default:
			s.done = slices.Insert(s.done, i, span{off, off + 1})
		}
	}
	for len(s.done) > 0 && s.done[0].lo <= s.next {
		s.next = max(s.next, s.done[0].hi)
		s.done = s.done[1:]
	}
	s.settle()
}

// reachTo records that every offset below off was processed or skipped on
// purpose: the consumer read its native records there in offset order.
func (s *seen) reachTo(off int64) {
	if off <= s.next {
		return
	}
	s.next = off
	for len(s.done) > 0 && s.done[0].lo <= s.next {
		s.next = max(s.next, s.done[0].hi)
		s.done = s.done[1:]
	}
	s.settle()
}

// partState is what a group processed of one partition, whichever cluster
// it was read on: per origin side, a seen set. Epoch counts the group's
// moves between clusters; the commit with the higher epoch is the current
// one. Other is a bound on the cluster the state is not committed on: every
// record there below it has its origin in the set (0: nothing known), so a
// move there starts reading at Other rather than at the log start.
type partState struct {
	epoch uint64
	side  [3]seen // indexed by flags.Side
	other int64
}

// processed reports whether o is known processed; an origin in a spilled
// region is not known (see [seen.unsure]).
func (p *partState) processed(o Origin) bool { return p.side[o.Side].has(o.Offset) }

// maxSpans bounds the holes one commit carries (Kafka's default
// offset.metadata.max.bytes is 4096).
const maxSpans = 120

// A consumer with an [Overflow] spills a set past spillAt spans down to
// keepSpans, so that a set hovering there does not spill on every commit
// and both sides' sets fit the metadata together.
const (
	spillAt   = maxSpans / 2
	keepSpans = spillAt / 2
)

// ErrStateTooLarge is returned when a partition's processed set has more
// holes than a commit can carry and the consumer has no [Overflow].
var ErrStateTooLarge = errors.New("streams: processed set has too many holes to commit (set ConsumerConfig.Overflow)")

const stateVersion = "dimmer1"

// encode renders the state as commit metadata:
// "dimmer1 e=<epoch> old=<next>[~<spilled>][,lo-hi...] new=... x=<other>".
func (p *partState) encode() (string, error) {
	var b strings.Builder
	b.WriteString(stateVersion)
	b.WriteString(" e=")
	b.WriteString(strconv.FormatUint(p.epoch, 10))
	for _, side := range []flags.Side{flags.Old, flags.New} {
		s := p.side[side]
		if len(s.done) > maxSpans {
			return "", fmt.Errorf("%w: %s origin has %d", ErrStateTooLarge, side, len(s.done))
		}
		b.WriteString(" ")
		b.WriteString(side.String())
		b.WriteString("=")
		b.WriteString(strconv.FormatInt(s.next, 10))
		if s.spilled > s.next {
			b.WriteString("~")
			b.WriteString(strconv.FormatInt(s.spilled, 10))
		}
		for _, sp := range s.done {
			fmt.Fprintf(&b, ",%d-%d", sp.lo, sp.hi)
		}
	}
	b.WriteString(" x=")
	b.WriteString(strconv.FormatInt(p.other, 10))
	return b.String(), nil
}

// ErrBadState matches commit metadata that is not a state this package wrote.
var ErrBadState = errors.New("streams: commit metadata is not a consumer state")

// decodeState parses commit metadata written by encode. Empty metadata is
// ok=false (a commit made by something else).
func decodeState(md string) (p partState, ok bool, err error) {
	if md == "" {
		return p, false, nil
	}
	fields := strings.Fields(md)
	// A state written before the other cluster's bound existed has four
	// fields: its bound is 0.
	if (len(fields) != 4 && len(fields) != 5) || fields[0] != stateVersion {
		return p, false, fmt.Errorf("%w: %q", ErrBadState, md)
	}
	e, found := strings.CutPrefix(fields[1], "e=")
	if !found {
		return p, false, fmt.Errorf("%w: %q: no epoch", ErrBadState, md)
	}
	if p.epoch, err = strconv.ParseUint(e, 10, 64); err != nil {
		return p, false, fmt.Errorf("%w: %q: epoch: %v", ErrBadState, md, err)
	}
	for i, side := range []flags.Side{flags.Old, flags.New} {
		v, found := strings.CutPrefix(fields[2+i], side.String()+"=")
		if !found {
			return p, false, fmt.Errorf("%w: %q: no %s", ErrBadState, md, side)
		}
		parts := strings.Split(v, ",")
		s := &p.side[side]
		next, spilled, hasSpilled := strings.Cut(parts[0], "~")
		if s.next, err = strconv.ParseInt(next, 10, 64); err != nil {
			return p, false, fmt.Errorf("%w: %q: %s next: %v", ErrBadState, md, side, err)
		}
		if hasSpilled {
			if s.spilled, err = strconv.ParseInt(spilled, 10, 64); err != nil || s.spilled <= s.next {
				return p, false, fmt.Errorf("%w: %q: %s spilled region %q", ErrBadState, md, side, parts[0])
			}
		}
		for _, r := range parts[1:] {
			lo, hi, found := strings.Cut(r, "-")
			l, err1 := strconv.ParseInt(lo, 10, 64)
			h, err2 := strconv.ParseInt(hi, 10, 64)
			if !found || err1 != nil || err2 != nil || l >= h {
				return p, false, fmt.Errorf("%w: %q: bad span %q", ErrBadState, md, r)
			}
			s.done = append(s.done, span{l, h})
		}
	}
	if len(fields) == 5 {
		x, found := strings.CutPrefix(fields[4], "x=")
		if !found {
			return p, false, fmt.Errorf("%w: %q: no other-cluster bound", ErrBadState, md)
		}
		if p.other, err = strconv.ParseInt(x, 10, 64); err != nil || p.other < 0 {
			return p, false, fmt.Errorf("%w: %q: other-cluster bound %q", ErrBadState, md, x)
		}
	}
	return p, true, nil
}

// remove marks off unprocessed again.
func (s *seen) remove(off int64) {
	if off < s.next {
		if off+1 < s.next {
			s.done = slices.Insert(s.done, 0, span{off + 1, s.next})
		}
		s.next = off
		return
	}
	for i, sp := range s.done {
		if sp.lo <= off && off < sp.hi {
			switch {
			case sp.hi-sp.lo == 1:
				s.done = slices.Delete(s.done, i, i+1)
			case off == sp.lo:
				s.done[i].lo++
			case off == sp.hi-1:
				s.done[i].hi--
			default:
				s.done = slices.Insert(s.done, i+1, span{off + 1, sp.hi})
				s.done[i].hi = off
			}
			return
		}
	}
}
