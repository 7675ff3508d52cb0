// Package shadowtest is the test mode of shadowread: reader options that
// make every mismatch (and every comparator panic) a failure of the test,
// reported with its field-path diff when the Read that caused it returns.
//
// A service's tests build the same Reader as production, with
// [Strict] appended to its options, and run their usual scenarios through
// it; any read where the new store's answer differs from the old one's
// fails the test that made it:
//
//	r, err := shadowread.New("users_to_redis", stage, readOld, readNew, userID,
//		append(prodOptions, shadowtest.Strict(t)...)...)
//
// The comparison runs inside Read (shadowread.WithWait), so it cannot
// outlive the test or race with its clean-up, and transient mismatches fail
// too: in a test nothing should be in flight between the two reads.
package shadowtest
