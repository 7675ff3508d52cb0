package shadowread

import (
	"context"
	"log/slog"
	"time"

	"github.com/dimmer-dev/dimmer/flags"
)

// Report describes one mismatch.
type Report struct {
	Migration string
	Key       string
	Stage     flags.Stage
	// Served is the side whose result the caller got; Shadow the compared one.
	Served, Shadow flags.Side
	// Diff is the first comparison's difference. Unless the reader was
	// given [WithReportValues], it holds field paths only: Served and Shadow
	// of each [Difference] are empty, because results usually carry personal
	// data and reports leave the service (logs, tickets, dashboards).
	Diff Diff
	// Values: Diff carries the differing values (as redacted by the hook
	// given to [WithReportValues]).
	Values bool
	// Lasting: the re-read still differed (or could not tell).
	Lasting bool
	At      time.Time
}

// ReportSink receives sampled mismatch reports. It runs on a shadow worker:
// it may block briefly, never for long.
type ReportSink interface {
	Report(ctx context.Context, r Report)
}

// ReportSinkFunc adapts a function to ReportSink.
type ReportSinkFunc func(ctx context.Context, r Report)

// Report calls f.
func (f ReportSinkFunc) Report(ctx context.Context, r Report) { f(ctx, r) }

type slogSink struct{ l *slog.Logger }

// SlogSink logs each report at warn level with the paths that differ, and
// with the values ("diff") only when the report carries them
// ([WithReportValues]).
func SlogSink(l *slog.Logger) ReportSink { return slogSink{l} }

func (s slogSink) Report(ctx context.Context, r Report) {
	attrs := []slog.Attr{
		slog.String("migration", r.Migration), slog.String("key", r.Key), slog.String("stage", r.Stage.String()),
		slog.String("served", r.Served.String()), slog.String("shadow", r.Shadow.String()),
		slog.Bool("lasting", r.Lasting), slog.Any("paths", r.Diff.Paths()),
	}
	if r.Values {
		attrs = append(attrs, slog.String("diff", r.Diff.String()))
	}
	s.l.LogAttrs(ctx, slog.LevelWarn, "shadowread: mismatch", attrs...)
}

// withValues returns the report as it may leave the reader: paths only, or
// the values passed through redact. Diff is copied, never changed in place:
// the mismatch handler saw the same slice.
func (r Report) withValues(redact func(Difference) Difference) Report {
	diff := make(Diff, len(r.Diff))
	for i, d := range r.Diff {
		if redact == nil {
			diff[i] = Difference{Path: d.Path}
		} else {
			diff[i] = redact(d)
		}
	}
	r.Diff, r.Values = diff, redact != nil
	return r
}
