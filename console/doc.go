// Package console is the operator console of dimmer (the CLI's `dimmer ui`):
// a web page per migration and an overview, for the people who drive a
// migration and keep one screen open during a game day.
//
// A [Server] is an http.Handler built with [New] from the same
// [flags.Controller] (and so the same store and guards) and fleet registry
// the CLI uses. It shows, refreshed in place without reloading the page:
//
//   - the overview: every migration with its stage and rollout share, the
//     next step's go/no-go verdict and alerts (instances behind, lasting
//     mismatches and new-side errors the fleet published, an automatic
//     rollback in the last hour);
//   - a migration page: the stage, every check of the next step with its
//     verdict and figure, the fleet's instances with their build, the
//     revision and stage they observe and their last heartbeat, the fleet's
//     watchdog windows per stage, and the timeline from the audit log with
//     refusals (every failed check) and automatic rollbacks marked;
//   - with [WithBackfills], the migration's backfill jobs (progress, rate,
//     ETA, last verification and whether it is stale); with [WithRepairs],
//     its repair backlog and dead letters; with [WithSchemaPlans], the
//     expand/contract plans naming it, with every step's state;
//   - with [WithSlots], on both pages, the replication slots of change data
//     capture (reader, lag, retained WAL) and a critical alert for a slot
//     past the retained-WAL bound, lost or gone, as [cdc.CheckSlots] fails;
//   - charts over time of the fleet's error rate, lasting and transient
//     mismatch rate and p99, from samples of the windows the instances
//     publish with their heartbeat (as they already do for the guards),
//     taken by [Server.Run] ([WithHistory]) and, with [WithSampleStore],
//     kept beside the flags ([PostgresSamples], [RedisSamples]; one per
//     interval, bounded), so a console started mid-migration draws the
//     last hour and not an empty chart;
//   - the same data as JSON: GET /api/overview and GET /api/m/{name};
//   - with [WithMetrics] and [Server.RegisterMetrics], the same figures as
//     OpenTelemetry gauges, read from the store at collection (dimmer ui
//     serves them through the Prometheus exporter at /metrics).
//
// Pages are html/template with their script and style embedded (package
// embed): no build step, nothing fetched from elsewhere, and a
// Content-Security-Policy that allows only the console's own script. The
// script polls a fragment of the page (?part=live) rendered and escaped by
// the same templates, so no untrusted text is ever assembled into HTML in
// the browser. With [WithChanges] the pages also open a server-sent event
// stream (GET /api/events) fed by the store's notifications through an
// OpenFeature provider (pgflags' LISTEN/NOTIFY or redisflags' pub/sub), and
// refresh as soon as a stage changes; polling stays for what changes
// without a notification (heartbeats, refusals, backfills).
//
// # Speed and load
//
// A page's data request reads the state, the fleet, the audit log and the
// configured panels at the same time. With [ShareFleet] the console and the
// next step's fleet guards share one read of the registry per request, and
// the timeline is reused while the audit log's newest entry is unchanged
// (it only grows at its head), so a refresh on a long game day reads one
// audit entry, not a hundred, and the page reuses the timeline's rendered
// list. Everything the console reads are plain reads
// of the store and the backfill, outbox and slot tables: no lock, no write
// on the services' paths; its only writes are the audit entries of its
// actions and, once per interval, a chart sample.
//
// # Security
//
// Every request carries the token given to [New]: as Authorization:
// Bearer, or through a session cookie (HttpOnly, SameSite=Strict) set by the
// login form, which also asks who the operator is for the audit log. Wrong
// tokens are limited per client ([WithLoginLimit]): past the allowance the
// next guess is not even compared and gets 429 with Retry-After.
// Actions are off unless [WithActions]; each needs a reason, and a login
// session's form must carry its CSRF token. Cross-origin POSTs are refused
// beforehand by net/http's CrossOriginProtection. A bearer client needs no
// CSRF token: browsers never attach an Authorization header on their own.
//
// # Actions
//
// Advance, roll back and set a rollout percentage go through the
// [flags.Controller], so the guards refuse exactly as they do for the CLI
// and a refusal lists every failed check; the controller audits the request
// as "<operator> (console)". An action names the revision the page showed,
// and is refused when the migration changed meanwhile. An advance refused
// by its checks can be forced, as with dimmer stage set … --force (never
// skipping a stage): the form needs a reason, the revision and the
// migration's name typed as confirmation, and the controller audits it as
// forced with the checks it overrode. Pausing and resuming a backfill job
// and retrying or skipping a dead letter act only on the migration's own
// jobs and repair log, and are recorded in the migration's audit log
// ([ActionOutcome]: what was acted on, what became of it, operator and
// reason), so its timeline shows every hand on the migration.
package console
