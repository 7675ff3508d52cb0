// Package expandcontract changes a Postgres schema under a busy service
// without downtime, as plans of three phases: expand (add the new shape
// beside the old), migrate (move the data under a dimmer migration: dual
// writes, shadow reads, a backfill) and contract (remove the old shape).
//
// # Plans are code
//
// A [Plan] names its Expand, Contract and Rollback [Step]s and links the
// dimmer migration and backfill moving its data. Helpers build the common
// changes with their [Transform] (the backfill's per-chunk rule):
// [RenameColumn], [ChangeType], [SplitColumn], [AddNotNull],
// [ExtractTable]. The helpers only change the schema; the service's reads
// and writes stay with packages dualwrite and shadowread.
//
// # The stage registry
//
// A [Registry] keeps each plan's [Stage] (pending, expanded, migrating,
// contracted, rolled back), per-step progress and an audit trail
// ([AuditEntry]) in Postgres, in the schema the flag store uses ("dimmer").
// A service calls [Registry.Register] at start-up with the plans its code
// carries; the definition, SQL included, is stored, so any process — the
// `dimmer schema` CLI in particular — applies a plan by name without the
// service's code. The session's search_path is stored with the plan and set
// wherever its steps run, so unqualified table names resolve as they do in
// the service. A registered plan cannot be edited in a phase that has run
// ([ErrPlanChanged]).
//
// The stages move pending -> expanded ([Registry.Expand]) -> migrating
// ([Registry.Migrate], which runs no DDL: it records that dual writes and
// the backfill are under way) -> contracted ([Registry.Contract]), or back
// to rolled back ([Registry.Rollback]) before contract. Every call is
// idempotent: a plan already there is left as it is, so a service may call
// Expand at every start.
//
// Plans are independent: each is applied under its own advisory lock
// ([ErrBusy] names the session holding it), so several are in flight at
// once; the registry's own tables are always named with their schema.
//
// # DDL safety
//
// Every transactional step runs in one transaction with the record that it
// was applied, under lock_timeout ([WithLockTimeout]): while DDL waits for a
// lock every later query on the table queues behind it, so a short timeout
// bounds the stall; the step is retried with jittered exponential backoff
// ([WithAttempts], [WithBackoff]) and, out of attempts, fails with
// [ErrLockTimeout] leaving nothing of itself applied. A crash mid-step
// leaves the step unapplied and unrecorded; running the phase again resumes
// at it. A step marked Concurrently (CREATE/DROP INDEX CONCURRENTLY) runs
// outside a transaction; before each attempt the index it builds is looked
// up, a valid one is recorded as applied and an invalid one — left by a
// crash or a timed-out build — is dropped and built again. The runner's
// connection sets client_connection_check_interval, so a runner that dies
// does not leave its DDL holding locks.
//
// # Guards
//
// A build declares the [Range] of stages it can run with and calls
// [Registry.Check] at start-up: outside the range (or, while a phase is in
// progress, if the range does not cover both ends) it is refused with an
// [*IncompatibleError] naming the plan, the stage and the range. The same
// ranges are published to the fleet registry through the heartbeat
// ([Attributes] with flags.WithAttributes).
//
// [Registry.Contract] is refused, with a *flags.RefusedError listing every
// failed check ([Registry.ContractChecks]), while a live instance declares a
// range that needs the pre-contract shape (an instance declaring nothing
// for the plan counts as needing it), while the linked migration is not
// complete on every key, or while the backfill is not verified
// ([VerificationChecker]). [Registry.Rollback] undoes the expand before
// contract only; after a contract step ran it is refused with
// [ErrWrongStage], and before that it waits until no instance needs the new
// shape and the migration is off. Refusals and forced runs are audited.
package expandcontract
