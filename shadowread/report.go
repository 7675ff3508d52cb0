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
	// Diff is the first comparison's difference.
	Diff Diff
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

// SlogSink logs each report at warn level with its diff.
func SlogSink(l *slog.Logger) ReportSink { return slogSink{l} }

func (s slogSink) Report(ctx context.Context, r Report) {
	s.l.LogAttrs(ctx, slog.LevelWarn, "shadowread: mismatch",
		slog.String("migration", r.Migration), slog.String("key", r.Key), slog.String("stage", r.Stage.String()),
		slog.String("served", r.Served.String()), slog.String("shadow", r.Shadow.String()),
		slog.Bool("lasting", r.Lasting), slog.Any("paths", r.Diff.Paths()), slog.String("diff", r.Diff.String()))
}
