package expandcontract

import (
	"slices"
	"testing"
)

// TestLockConflictsAreSymmetric: the conflict table the runner uses to
// decide whether a long transaction still blocks it is the manual's, which
// is symmetric, and has all eight table lock modes.
func TestLockConflictsAreSymmetric(t *testing.T) {
	if len(conflicts) != 8 {
		t.Fatalf("%d modes, want 8", len(conflicts))
	}
	for m, cs := range conflicts {
		for _, c := range cs {
			if !slices.Contains(conflicts[c], m) {
				t.Errorf("%s conflicts with %s, but not the other way round", m, c)
			}
		}
	}
	if got := (blocked{modes: []string{"ShareUpdateExclusiveLock"}}).conflicting(); slices.Contains(got, "AccessShareLock") {
		t.Errorf("a long reader does not block VALIDATE CONSTRAINT's lock: %v", got)
	}
}
