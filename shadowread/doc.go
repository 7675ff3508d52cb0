// Package shadowread routes a migration's reads by its stage flag and, in the
// stages that compare (shadow: new read behind old; live: old read behind
// new), reads the other side in the background and compares the results
// (the stage model of the README). The routing comes from
// [flags.Stage.Reads] and [flags.Stage.Compared]; this package holds no copy
// of the stage table.
//
//	r, err := shadowread.New("users_to_redis", source, readOld, readNew, userID,
//		shadowread.WithComparator(shadowread.DeepCompare[User](shadowread.IgnorePaths("UpdatedAt"))),
//		shadowread.WithObserver(watchdog))
//	u, err := r.Read(ctx, id)
//
// The caller's result, error and latency are the served side's alone. When
// the key is compared, the shadow read is queued for a bounded pool
// ([WithPool]) before the served read starts and runs concurrently with it
// and with the rest of the caller's work; it is detached from the caller's
// cancellation (context.WithoutCancel) and bounded by its own deadline
// ([WithShadowTimeout]). The caller only pays for the hand-off, an append to
// a list: queued reads are handed to the workers every millisecond, so the
// caller never wakes a thread (on a small machine waking one right before
// its own read cost the caller ~10% at p99). A full queue sheds the
// comparison (counted), it never waits.
// Panics in read functions and comparators are recovered and counted.
//
// # Comparing
//
// [DeepCompare] is the default comparator: a reflection walk listing every
// differing leaf by field path ("Items[2].Price"), using a type's own
// Equal method (time.Time), with ignore rules ([IgnorePaths]), normalisers by
// type ([Normalize]), [EquateEmpty] and [FloatTolerance]. It is written here
// rather than taken from github.com/google/go-cmp because go-cmp is meant for
// tests (its docs say so: it panics on unexported fields without options and
// does not aim at speed) while this comparator runs in production on every
// sampled read. A comparison where a side failed is judged by an
// [ErrorPolicy] ([DefaultErrorPolicy], [ErrorsEqual]).
//
// A mismatch is re-read once on both sides after a short delay ([WithRecheck],
// 100ms): when the re-read matches, the mismatch was transient (the row
// changed between the two reads, a dual write in flight) and is counted
// apart from a lasting one. A re-read that cannot decide keeps the mismatch
// lasting. The delay runs on a timer, not on a pool worker, so mismatches do
// not make a busy pool shed; the re-read keeps the stage of the first read,
// and pending re-reads are bounded (past the bound a mismatch stays lasting,
// counted in dimmer.shadowread.rechecks_skipped).
//
// # Sampling
//
// Whether a key is compared is a sticky hash of migration and key against a
// rate ([WithSampleRate]; [FlagSampleRate] reads it from an OpenFeature float
// flag): every instance compares the same keys, and raising the rate only
// adds keys.
//
// # Observations, metrics, reports
//
// The served read and each shadow read (with Compared, Mismatch, Lasting) go
// to a [flags.Observer] ([WithObserver]), usually the [flags.Watchdog], which
// steps the stage back when lasting mismatches or shadow errors pass its
// thresholds. OpenTelemetry metrics ([WithMeterProvider], no-op by default):
// dimmer.shadowread.calls {migration, origin, role, outcome},
// dimmer.shadowread.latency in microseconds {migration, origin, role},
// dimmer.shadowread.comparisons {migration, result: match, mismatch (lasting),
// transient, shadow_error, shed, panic}, dimmer.shadowread.stage_errors,
// dimmer.shadowread.rechecks_skipped and dimmer.shadowread.reports_dropped. Mismatch [Report]s go, at most one per
// interval and through a user cleaner, to a [ReportSink] ([SlogSink] by
// default; [WithReports]). A report names the differing field paths, never
// their values: results are the service's data, often personal, and reports
// leave the service. A service that wants values opts in with
// [WithReportValues] and its own redaction of each [Difference].
//
// # Tests
//
// The shadowtest sub-package's Strict options make every mismatch a test
// failure, reported when the Read that found it returns ([WithWait],
// [WithMismatchHandler]).
package shadowread
