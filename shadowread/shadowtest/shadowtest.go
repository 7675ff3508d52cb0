package shadowtest

import (
	"testing"

	"github.com/dimmer-dev/dimmer/shadowread"
)

// Strict returns the options that fail t on any mismatch, transient ones
// included. The comparison runs inside Read (shadowread.WithWait), so the
// failure belongs to the read that caused it and cannot outlive the test.
func Strict(t testing.TB) []shadowread.Option {
	return []shadowread.Option{
		shadowread.WithWait(),
		shadowread.WithMismatchHandler(func(r shadowread.Report) {
			t.Helper()
			t.Errorf("shadowread: %s key %q (stage %s): %s side differs from %s side: %s",
				r.Migration, r.Key, r.Stage, r.Shadow, r.Served, r.Diff)
		}),
	}
}
