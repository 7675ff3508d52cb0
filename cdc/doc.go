// Package cdc captures committed changes from the PostgreSQL write-ahead
// log, through a logical replication slot decoded by the built-in pgoutput
// plugin (github.com/jackc/pglogrepl), for two jobs that otherwise need
// polling or application dual writes.
//
// # Slots dimmer owns
//
// [CreateSlot] makes a slot and its publication and records them in a
// registry (<schema>.cdc_slots), so a slot or publication of the same name
// that someone else made is refused ([ErrSlotTaken],
// [ErrPublicationTaken]) and never adopted or dropped. A server without
// wal_level = logical ([ErrWalLevel]), a missing table ([ErrNoTable]) or a
// table whose updates and deletes cannot be keyed ([ErrNoReplicaIdentity])
// is refused before anything is created; a failure half-way undoes what was
// made. [DropSlot] (and `dimmer cdc drop`) removes a slot with its
// publication. A slot keeps WAL until its reader confirms it: [Slots],
// [ObserveSlots] (OpenTelemetry gauges of lag and retained WAL),
// [CheckSlots], [SlotGuard] (a flags.Guard) and `dimmer cdc status` watch
// that.
//
// # An outbox relay with no polling
//
// [Emitter] writes outbox messages (outbox.Message) into the log as
// transactional logical decoding messages (pg_logical_emit_message): a
// message exists if and only if the caller's transaction commits, and no
// table stores it, so there is nothing to delete or vacuum. It is an
// outbox.Enqueuer, so it stands in for the table outbox (which stays, with
// its own relay). [Emitter.EnqueueBatch] packs many messages into few log
// records; a WAL sender sends every decoded record as a message of its own,
// so packing is what drains bulk writes fast.
//
// Log messages were chosen over decoding the outbox table's inserts: the
// server decodes one message per outbox message about 1.1–2.4× as fast as
// the same number of table inserts, packed messages about 2.3–4.6× as fast
// (BenchmarkLogSourceDecode, measured on a loaded machine); and rows would
// still have to be deleted and vacuumed after publishing, and the table's
// per-key lock would still serialise same-key writers.
//
// A [Relay] reads the slot and publishes through any outbox.Publisher
// (outbox/kafkasink, outbox/redissink):
//
//   - Publication order is commit order: per key, a record is published only
//     after the key's previous one was acknowledged; distinct keys share
//     batches and several batches are in flight (RelayConfig.MaxInFlight).
//   - The slot's confirmed position advances to a transaction's end only once
//     the publisher acknowledged every message of it and of every earlier
//     transaction, and is reported every StatusInterval. A relay killed at
//     any point loses nothing; its successor re-sends at most what was
//     acknowledged since the last report (consumers de-duplicate on the
//     message ID, see outbox/inbox).
//   - A failed record is retried with backoff; only its key waits.
//   - One reader per slot: the server admits one, and the others wait as
//     standbys. Because the previous reader may still be inside a Publish
//     call when the server hands the slot over (its connection was cut), each
//     reader publishes only under a lease in the registry that it renews
//     while the server still shows its WAL sender on the slot; a new reader
//     waits out the previous lease (at most FenceTTL, none after a clean
//     shutdown), so two relays never publish at once. A relay that cannot
//     renew stops publishing when its lease runs out.
//
// # Table sync without dual writes
//
// [Sync] keeps a target table (in the same or another database) or a Go
// [ChangeSink] in step with a source table, without touching the
// application. It creates the slot first, then copies the table through
// package backfill (resumable, chunked, version-guarded upserts), then
// applies the stream: inserts and updates as version-guarded upserts by key,
// deletes by key, truncates; reading and applying overlap. Updates that leave
// a TOASTed value unchanged do not overwrite it; an update that changes the
// key moves the target row in place; a column added, dropped or
// retyped in the source stops the sync with [ErrSchemaChanged] naming it
// (nothing is silently dropped).
//
// A transaction larger than a batch is applied in parts and confirmed once
// whole, and reading waits for applying: the sync holds at most 4 ×
// BatchSize changes ([Sync.Buffered]) whatever the size of a source
// transaction (PostgreSQL itself spills a large one to disk before sending
// it). When the replication connection or the target's breaks (the
// network, a restarted server, a terminated WAL sender) Run reconnects with
// backoff (taking its direction mark again, see below) and resumes
// from the confirmed position; what was applied but not yet confirmed comes
// again and the version guard leaves it without effect.
//
// Refused before the slot, publication or copy exist: a key outside the
// REPLICA IDENTITY ([ErrNoReplicaIdentity]); a target missing a synced
// column or a unique index on the key ([*FieldError]); a target column that
// cannot hold the source column's type ([*ColumnTypeError]: values are
// written with INSERT's assignment rules, so an explicit-only conversion
// such as jsonb to integer needs a [ChangeSink] that converts it — the Go
// sink is the transform hook); and a sync started while another streams the
// other way between the same two tables ([ErrOppositeSync]).
//
// A table target is written from the bytes the WAL sender sent, untouched:
// each column of a batch is one array parameter of a multi-row upsert,
// cast to the target's types. Where every synced column's type is built in
// (with send and receive functions and an array type), the source runs
// PostgreSQL 14 or later and a table target the same major version, the
// slot is read with pgoutput's binary option and values travel in their
// types' binary form (no text round trip); otherwise, an enum or a domain
// column for instance, in text form, as the log says once, printed by the
// WAL sender in formats every server reads back the same (DateStyle ISO,
// IntervalStyle postgres, extra_float_digits 3, whatever the source's
// settings). Go values are decoded only for a [ChangeSink] or OnApplied.
//
// What bounds the streamed apply rate is the server's WAL sender:
// PostgreSQL 15 decodes a transaction only once it commits and sends every
// row as a message of its own. BenchmarkSyncApply logs, beside the sync's
// rate, that of a bare receive loop on the same slot options applying
// nothing ("the WAL sender alone"), and what the version-guarded upsert
// alone costs the target against a plain insert.
//
// SyncConfig.StreamInProgress (off by default; PostgreSQL 14 or later, a
// table target) asks the WAL sender for pgoutput protocol 2 with streaming,
// so a transaction larger than StreamWorkMem (the session's
// logical_decoding_work_mem) is sent while it runs. Each such source
// transaction is applied into a target transaction of its own (its own
// connection, at most MaxStreams at once: past that the sync reconnects
// reading whole transactions only, for the rest of Run), with a savepoint
// at the first change of each subtransaction: a subtransaction the source
// rolls back is rolled back to its savepoint (which drops the later,
// nested ones, as the source did), a source rollback rolls the target
// transaction back, and its commit commits it before the position is
// confirmed. Changes are applied in the order the server sent them, whole
// transactions on the pool in between. A relation message sent inside such
// a transaction holds for it alone until it commits, and one sent in a
// subtransaction goes when that subtransaction is rolled back, so a schema
// change that is rolled back (whole or to a savepoint) does not stop the
// sync. OnApplied is not called for changes applied this way. It is off
// by default because it did not raise the apply rate when measured
// against BenchmarkSyncApply on 2 cores: the WAL sender sees the log only
// as far as it is flushed, which during one long statement is every
// wal_writer_delay or so, and it shares the CPU with that statement, so
// most of its work, and the apply behind it, still come after the commit.
//
// The copy does not read the slot's exported snapshot: backfill copies in
// many short transactions, possibly from several processes, which cannot
// share one snapshot. Instead the slot exists before the copy starts, so
// every change committed after it is streamed, and changes the copy already
// saw are applied again without effect (the version guard keeps the newer
// row; a delete followed by a re-insert within a batch is applied as such).
// Nothing is missed; the overlap costs replay, not correctness.
//
// # Fenced cutover
//
// When the new side is in step, [Cutover] moves the stage to one that no
// longer writes the old side (complete by default; the flags routing table
// decides), the way the migration literature describes it, automated:
//
//  1. The step is planned with the flags.Controller first: a step its
//     rules or guards would refuse holds nothing.
//  2. The migration's [Fence] closes: a row per migration in the old
//     side's database ([InstallFence]) that every writer of the old side
//     locks shared in its write transaction ([Fence.Enter]); the cutover
//     locks it exclusively, so it waits for the writes already inside to
//     commit and holds new ones, each for at most FenceConfig.MaxWait
//     ([ErrWriteHeld] past that: the transaction is aborted, nothing
//     written).
//  3. It waits until the sync's lag is 0 ([Sync.CaughtUp]: every change
//     committed before is applied), flips the stage through the
//     controller (audited), and releases the fence as cut: the held
//     writers get [ErrCutOver], ask the flag again and write the new side.
//
// Every write acknowledged on the old side was committed before the sync
// caught up, so it is on the new side; every later one goes to the new side
// only: nothing lost, nothing applied twice. If the sync does not catch up
// within CutoverConfig.MaxPause, or the flip fails, the fence opens again
// and the stage stays. [CutoverResult] reports the pause (the longest any
// writer was held) and its parts. The sync is given in-process
// (CutoverConfig.Sync) or by its slot (CutoverConfig.Slot, when it runs in
// another process: the cutover then waits on the position the sync reported
// to the server); `dimmer cdc cutover` is the latter from the command line,
// on the fence [OpenFence] finds (it creates none) after waiting, writers
// not held, for the slot to catch up ([WaitSlot]). The fence holds writers, so the
// controller's store should not share their pool. Writers commit with
// synchronous_commit on (the default): the sync's lag is measured to the
// flushed end of the log, which an unflushed commit is not yet part of.
//
// # Reverse sync for rollback
//
// Stepping back from complete would lose every write made on the new side
// since the cutover, unless they are carried back. A reverse sync is a
// second [Sync] from the new side to the old with SkipCopy (the old side
// already holds everything up to the cutover), whose slot [Sync.Prepare]
// creates before the cutover, so no write to the new side is missed. After
// the cutover, stop the forward sync and run the reverse one (the two must
// not run at once: PostgreSQL 15's pgoutput cannot filter a sync's own
// writes by origin, so each would replay the other's). [ReverseGuard],
// given to the controller with flags.WithReconciliation, refuses leaving
// complete while the reverse sync is not streaming or has not applied
// every change committed on the new side, naming which. While a sync
// runs it marks its direction with an advisory lock in its target database
// held by its own session (gone with it, even after kill -9), and a sync
// the other way refuses to start while the mark is there
// ([ErrOppositeSync]).
//
// [StepBack] is the rollback, fenced like the cutover the other way round:
// writers of the new side enter a fence of their own (the same migration's
// [Fence], installed in the new side's database and given to the cutover
// as CutoverConfig.New); the step back holds them, waits until the reverse
// sync applied every change committed on the new side, opens the old
// side's fence, flips the stage back (rampdown by default) and releases the
// new side's fence as cut: held writers get [ErrCutOver], ask the flag
// again and write the old side. No write to the new side lands after the
// reverse sync caught up, so it can stop as soon as the step back returns.
package cdc
