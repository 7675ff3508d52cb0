// Package flags is the stage model every dimmer package is composed around:
// one OpenFeature flag per migration whose string value is its [Stage].
//
// # Stages and routing
//
// A migration moves through six stages, named as LaunchDarkly names its
// migration flags so such a flag served by any OpenFeature provider works
// unchanged: [Off], [DualWrite], [Shadow], [Live], [RampDown], [Complete].
// The routing table (which side is written, which is authoritative, which is
// read, which is compared in the background) lives here once, as methods of
// Stage: [Stage.Writes], [Stage.Authoritative], [Stage.Secondary],
// [Stage.Reads] and [Stage.Compared]. Packages dualwrite and shadowread ask
// these methods and never re-encode the table.
//
// # Evaluating the stage
//
// A [Source] evaluates a migration's stage through an *openfeature.Client
// with the operation's entity key as the targeting key, so a provider can
// serve live to 5 % of keys and shadow to the rest: canary by key, sticky,
// the same on every instance. A flag never set reads as [Off], without an
// error. Evaluation never fails the caller: a wrong type, an unknown value or
// a provider that cannot answer gives the caller's fallback stage and an
// error wrapping [ErrFlagUnavailable], counted.
//
// The dimmer providers (packages pgflags and redisflags) store a [State]
// document per migration, evaluate it from a local snapshot without I/O, and
// split keys between stages with the documented sticky hash [Bucket].
//
// # Moving the stage
//
// A [Controller] changes a migration's state by the rules: one step forward
// at a time; any step back before complete (old was written all along;
// going back to off bumps [State.Epoch], marking new as stale); leaving
// complete only with proof that old was reconciled ([WithReconciliation]) or
// by force with a reason. Forward steps run the [Guard]s; a refusal is a
// [*RefusedError] naming every failed check. Every change and every refusal
// is written to the audit log ([AuditEntry]). Changes are optimistic: of two
// racing operators one wins, the other gets a [*ConflictError].
//
// [Controller.Rollout] serves a stage to a percentage of keys; [Transition]
// computes exactly which keys move where, so rules and guards judge real
// moves ([Transition.Moves]).
//
// # The fleet and the watchdog
//
// Each service instance runs a [Heartbeater] that reports the flag revisions
// it evaluates into the fleet registry ([FleetStore]); [FleetGuard] refuses
// the next step until every live instance has applied the current one.
//
// Packages dualwrite and shadowread report each side's calls as
// [Observation]s. A [Watchdog] keeps rolling windows of the new side's error
// rate, latency and the lasting mismatch rate per migration and stage and,
// over a threshold with a minimum sample, steps the migration back through
// the controller (live -> shadow, shadow -> dualwrite) and audits why: a
// rollback is a flag flip, never a deploy. Its windows travel in the
// heartbeat, so [HealthGuard] judges the whole fleet before live and
// rampdown, and [CanaryGuard] lets a rollout finish only once the keys it
// moved ahead gave the fleet enough operations under the thresholds.
package flags
