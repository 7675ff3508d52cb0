// Package dualwrite routes a migration's writes by its stage flag: to the old
// store, to both, or to the new one, with the authoritative side deciding the
// caller's result (the stage model of the README). The routing comes from the
// stage's own methods ([flags.Stage.Authoritative], [flags.Stage.Secondary]);
// this package holds no copy of the stage table.
//
// A [Writer] is generic over the input and the result of a write:
//
//	w, err := dualwrite.New("accounts_to_redis", source, writeOld, writeNew, accountID,
//		dualwrite.WithRepairLog(log), dualwrite.WithObserver(watchdog))
//	n, err := w.Write(ctx, acct)
//
// [Writer.Write]:
//
//   - evaluates the stage for the input's entity key ([StageSource]; an
//     evaluation error is counted and the returned fallback stage is used,
//     and when that stage writes one side only a repair for the other side
//     is recorded ([ReasonStageUnavailable]): the real stage may write both);
//   - writes the authoritative side under the caller's context. Its result
//     and error are the caller's. When it fails the secondary is not
//     written: it would hold what the authoritative store refused;
//   - writes the secondary side, if the stage has one, either in the call
//     ([WithSync]) or on a bounded worker pool ([WithAsync], the default:
//     8 workers, 1024 queued), detached from the caller's cancellation by
//     context.WithoutCancel and bounded by its own timeout
//     ([WithSecondaryTimeout]). A key's async writes run on one worker, in
//     the order of their authoritative writes: out of order, a later write
//     could be overwritten by an earlier one on the secondary, a divergence
//     no repair would record. Each side's secondary writes go through a
//     circuit breaker (github.com/sony/gobreaker), one per side;
//   - turns every secondary write that did not happen into a [Repair] in the
//     [RepairLog]: an error, a timeout, a recovered panic, a shed write (full
//     queue), an open breaker, a write after Shutdown. The caller never sees
//     these. A repair that cannot be recorded is logged at error level with
//     everything needed to redo it, and counted (dimmer.dualwrite.repairs,
//     outcome=record_failed).
//
// A panic in a user function is recovered: on the secondary it is a repair
// with [ReasonPanic]; on the authoritative side it is returned to the
// caller as a *[PanicError] (matching [ErrPanic]) with the stack.
//
// # Transactions
//
// [Writer.WriteTx] takes the caller's pgx.Tx (user functions get it with
// [TxFrom]) and records the repair intent inside that transaction with a
// [TxRepairLog], so the intent commits exactly with the authoritative write.
// No secondary write runs before the commit; the [Repairer] brings the
// secondary up to date from the committed state when the intent is
// delivered. The durable log is the outbox: [NewOutboxRepairLog] writes
// each repair as an outbox message ([DecodeRepair] reads it back).
//
// # Repairs
//
// A [Repair] carries no payload: a [Repairer] re-reads the key's current
// state from the side that is authoritative now (the stage may have moved
// since the write) and stores it on the other side, so repairs are
// idempotent and a late or duplicated one never writes stale data. Its
// StoreFunc must be an upsert that does not overwrite a newer version (a
// live dual write can land between the repairer's read and its write).
// Where the stage now writes one side only (off, complete) the repair is
// [Skipped]. While the stage cannot be evaluated (the source's fallback
// comes with an error) the repair fails and is retried: the fallback is a
// guess, and skipping on it would drop a repair still needed. [Repairer.RepairAll] reports each repair it could not do.
//
// # The repair loop
//
// Repairs are outbox messages on [RepairTopic] ("dimmer.repair.<migration>"),
// keyed by migration and entity key. The loop that replays them is an
// outbox relay whose publisher is a [RepairPublisher]: delivering a message
// means handing it to the migration's [Repairer]. One call builds it:
//
//	relay, err := dualwrite.NewRepairRelay(ob, pool, outbox.RelayConfig{}, repairer)
//	go relay.Run(ctx) // and relay.Shutdown(ctx) on the way out
//
// A relay rather than a loop of this package's own, because the relay already
// has what a repair loop needs: the repairs of one key are delivered one at
// a time in the order they were recorded, several instances share the work
// (leased buckets, fencing), a failed repair is retried with exponential
// backoff, and after RelayConfig.MaxAttempts it becomes a dead letter that
// holds back its own key only, until an operator retries or skips it. Keep
// the repair log in an outbox table of its own (outbox.Config{Table:
// "repairs"}), or forward business topics to their broker with
// [WithOtherTopics].
//
// [NoPendingRepairsGuard] is the controller's go/no-go check "no pending
// repairs before complete": entering complete stops writing old for good,
// so it is refused while the migration's repair topic holds undelivered or
// dead messages, with their counts.
//
// # Observations and metrics
//
// Every side's write is reported to a [flags.Observer] ([WithObserver]; the
// [flags.Watchdog] steps the stage back when the new side fails too often)
// and to OpenTelemetry ([WithMeterProvider], no-op by default):
// dimmer.dualwrite.calls {migration, origin, role, outcome},
// dimmer.dualwrite.latency in microseconds {migration, origin, role},
// dimmer.dualwrite.repairs {migration, outcome, reason} and
// dimmer.dualwrite.stage_errors {migration}. Attribute sets of the hot path
// are built once, so routing in off and complete does not allocate.
package dualwrite
