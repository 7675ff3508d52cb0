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
// to rolled back ([Registry.Rollback]) before contract, also from a failed
// expand. Every call is
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
// was applied, under a short lock_timeout ([WithLockTimeout], default
// 150ms): while DDL waits for a lock every later query on the table queues
// behind it, so the per-attempt timeout is the longest stall the service
// sees. The step then leaves the lock queue and is retried with jittered
// exponential backoff ([WithBackoff]) within a total lock-wait budget
// ([WithLockWaitBudget], default 5 minutes; [WithAttempts] caps the tries
// too). Each retry names the sessions holding the lock (pid, application,
// user, state, transaction age, lock mode) in the log and in the step's
// last error, and while a transaction older than the timeout still holds
// the table the runner waits without entering the queue. Out of budget the
// step fails with [ErrLockTimeout] leaving nothing of itself applied. A
// crash mid-step leaves the step unapplied and unrecorded; running the
// phase again resumes at it.
//
// A step marked Concurrently (CREATE/DROP INDEX CONCURRENTLY) runs outside
// a transaction. The index it builds is named in [Step.Index] or read from
// its SQL (quoted or not, any characters) and resolved by the server to its
// oid: before each attempt a valid one is recorded as applied and an
// invalid one — left by a crash or a failed build — is dropped; after each
// build the index must exist and be valid ([ErrInvalidIndex] otherwise); on
// resume, a step recorded as applied whose index is invalid runs again. A
// build waits for older transactions without queueing the service's reads
// and writes, so it may wait for the rest of the budget. The runner's
// connection sets client_connection_check_interval, so a runner that dies
// does not leave its DDL holding locks.
//
// Generated names (the helpers' constraints) are cut to Postgres's 63 bytes
// on a character boundary, and a plan must be valid UTF-8, so the stored
// definition is always the code's. Instances registering the same plan at
// once all succeed.
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
// complete on every key, or while the data is not verified: by the
// [VerificationChecker] (package backfill's jobs), or, for data copied with
// the plan's [Transform], by a [Registry.VerifyTransform] since the expand
// that found no row pending at the migration's current epoch.
// [Registry.Rollback] undoes the expand before contract only; after a
// contract step ran it is refused with [ErrWrongStage], and before that it
// waits until no instance needs the new shape and the migration is off. It
// also undoes an expand that failed or was interrupted, dropping the invalid
// indexes its unfinished concurrent steps left. Refusals and forced runs
// are audited.
package expandcontract
