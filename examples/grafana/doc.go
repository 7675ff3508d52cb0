// Package grafana holds dimmer-migrations.json, a Grafana dashboard over the
// figures `dimmer ui` serves at /metrics (package console's
// RegisterMetrics through OpenTelemetry's Prometheus exporter): each
// migration's stage over time, rollout share, instances behind, and the
// fleet's watchdog windows (error rate, lasting mismatch rate, p99,
// comparisons). Import it in Grafana and point it at the Prometheus that
// scrapes the console (with the console's token as bearer credentials).
//
// The test beside it checks that every metric the dashboard queries is one
// the console actually serves.
package grafana
