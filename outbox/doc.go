// Package outbox is a transactional outbox for Postgres (pgx v5) with a
// relay that runs on several instances at once and still publishes each
// key's messages in commit order, to Kafka (package kafkasink) or Redis
// Streams (package redissink) or any [Publisher]. It is also the durable
// repair log of package dualwrite.
//
// # Writing
//
// [Outbox.Install] creates the tables (idempotent, versioned in
// <table>_meta, any schema and table name, identifiers quoted).
// [Outbox.Enqueue] writes a [Message] in the caller's pgx.Tx in one
// statement; [Outbox.EnqueueBatch] writes many in one COPY with the same
// per-key order and locking; [Outbox.EnqueuePool] writes one outside a
// caller transaction.
// Bad input is a [*FieldError] wrapping [ErrInvalidMessage] and writes
// nothing. Config.MaxPayload bounds the payload alone; a broker bounds the
// whole record (Kafka's message.max.bytes counts key, headers and framing
// too), so set Config.RecordLimit to the publisher (kafkasink.Publisher
// implements [RecordLimit]) and Enqueue refuses a message the broker would
// refuse with a [*RecordTooLargeError] ([ErrRecordTooLarge]), instead of
// the relay dead-lettering it later, where it would hold back its key.
//
// # The ordering guarantee
//
// For one non-empty key, messages are first published in the order their
// transactions committed (within a transaction, in Enqueue order). How:
//
//   - Enqueue takes a transaction-scoped advisory lock on the key (class:
//     the table, object: a hash of the key) before the row draws its seq
//     from the table's identity, in the same statement. The lock is held to
//     commit, so a second writer of the key draws its seq only after the
//     first has committed (or rolled back): per key, seq order is commit
//     order, and when a row is visible every earlier-seq row of its key is
//     too. Unrelated keys never wait on each other (a hash collision only
//     makes two keys wait); a long transaction holds back writers of its
//     own keys only. Transactions writing several keys should enqueue them
//     in a consistent order, or retry a deadlock error.
//   - No cursor and no snapshot fence: the relay publishes, per key, the
//     oldest remaining row (its head), so a transaction that commits late
//     is simply picked up when it commits, and a transaction left idle
//     elsewhere in the database holds back nothing but its own keys.
//
// Delivery is at least once: a relay that dies between the broker's
// acknowledgement and its own may cause a message to be published again;
// consumers de-duplicate with package inbox on the message ID carried in
// [HeaderMessageID]. A repeat is always of a message already published, so
// the first deliveries per key keep commit order. For the same reason the
// relay's own acknowledgement (the deletion of published rows) commits
// without waiting for its WAL to reach disk (synchronous_commit off for
// that transaction alone): a database crash can undo the last fraction of
// a second of acknowledgements, and those messages are published again,
// never lost. Enqueue is untouched: a message is as durable as the
// transaction that wrote it.
//
// # The relay
//
// Keys are hashed into Config.Buckets buckets ([Outbox.Bucket]: XXH64 of the
// key mod buckets). Each [Relay] leases a fair share of the buckets in
// <table>_leases (buckets / live relays, one more for the first
// buckets % live of them by ID, so the shares add up exactly), renews every
// LeaseTTL/3, and takes over expired ones; a lease carries an epoch bumped
// on every takeover. Fencing: a relay publishes only before its lease's
// local deadline (taken before the renewal was sent, minus a margin, so it
// ends before the database expiry), and the statement that deletes published
// rows (or records a failure) checks in its own snapshot that the relay
// still owns each bucket at the epoch it published under, so once a
// takeover has committed the stale relay can neither publish nor
// acknowledge; its rows stay for the new owner. An acknowledgement locks
// no lease row: racing a takeover, it deletes only rows the broker already
// acknowledged, which at worst the new owner publishes again. Recording a
// failure does lock them (FOR SHARE), so it waits for a takeover in
// progress and then counts nothing: an attempt counted under a lost lease
// would delay, or dead-letter, a message the new owner is publishing.
//
// Hand-offs are immediate. A relay registers in <table>_relays on a
// connection of its own that holds a session-level advisory lock keyed by
// its backend pid for as long as the relay runs, and listens on a control
// channel. Joining, releasing surplus buckets and leaving are announced on
// that channel, so the relays concerned rebalance at once instead of at
// their next lease tick. A relay whose registration session ends (killed,
// crashed, its connection reset) is recognised as dead by the others within
// LivenessInterval (they look in pg_locks for its lock): its row is removed,
// so it no longer counts toward the fair share, and its buckets are freed
// and taken over with a new epoch, without waiting for LeaseTTL. A relay
// that loses its own registration connection stops publishing for its
// buckets at once and registers again; only a relay that hangs with its
// session still open keeps its buckets until their leases lapse. Taking
// over from a dead session cannot weaken ordering: a relay publishes only
// a key's oldest remaining message and the next one only after the broker
// acknowledged it, so whatever a dying relay still had in flight can only
// be a repeat.
//
// Each cycle reads the first BatchSize rows of the leased buckets in seq
// order (one walk of the primary key, like a hand-written relay loop).
// Within one snapshot, per key, the first row of a lane in that prefix is
// its head, so the relay publishes the ready heads all at once (one
// message in flight per key, pipelined across keys) and deletes the
// acknowledged rows in one statement: by walking their range of seqs and
// picking them out of it with a bitmap, when the range is short (a backlog
// of distinct keys, or several relays sharing the table), so a row that
// came into the range since the read is not taken; by a list of seqs
// otherwise. When a few lanes crowd the prefix (a
// hot key, or a backlog held behind a backing-off or dead message) the
// relay also walks the buckets' lanes (a loose index scan with a
// round-robin cursor per bucket, one index probe per lane) to find the
// other lanes' heads. The next batch is fetched once this one is
// acknowledged, not while it is published: overlapped, the fetch and the
// acknowledgement slowed each other more than the overlap saved, most of
// all with several relays on one table. A failed publish is retried with exponential backoff
// and jitter (BackoffMin..BackoffMax); after MaxAttempts it becomes a dead
// letter that holds back only its own key until [Outbox.RetryDead] or
// [Outbox.SkipDead] ([Outbox.DeadLetters] lists them; after a broker
// outage longer than the attempts, [Outbox.RetryAllDead] retries them all). Relays wake on LISTEN/NOTIFY (Enqueue notifies) and poll
// every PollInterval as a fallback.
//
// How many relays, and the table's layout. On one plain table, relays
// share heap pages: each reads, and deletes by range, past the other
// relays' rows, and prunes the pages they deleted from, so several relays
// cost the database more per message than one, and their drain rate does
// not add up (on 2 cores, 4 relays spent twice one relay's database CPU
// per message). Config.Partitions splits the table by bucket range, and
// each relay's share is then a range of buckets of its own (the shares laid
// end to end in ID order; buckets outside its range go back at once to the
// relay whose range they are in, after relays join or leave, so relays
// should keep their IDs across restarts), so with as many relays as
// partitions (or a divisor of them) each relay holds whole partitions, and
// its reads and writes touch only those. Over 4 separate tables, 4 relays
// each cost one relay's database CPU per message; in
// BenchmarkRelayThroughput, 2 relays on 2 partitions and 4 on 4 drained a
// backlog 1.3-1.7 times as fast as one relay on a plain table. One relay
// on a partitioned table reads its partitions in step (a merge of their
// indexes) and is slower than on a plain one, so choose Partitions for the
// relays a service runs. The relay's statements that write name its
// buckets' ranges, so the planner leaves the other partitions out of them.
//
// Retention: delivered rows are deleted in bulk by the acknowledging
// statement; the relay runs VACUUM on the table (on a partitioned one, on
// the partitions of its buckets) every VacuumEvery deletions, one relay at
// a time per table or partition, without truncating (that would take a
// lock every writer waits for), and the table is installed with a low
// autovacuum threshold, so dead tuples and the heap stay bounded under
// steady load.
// Dead letters stay until handled.
//
// Metrics (OpenTelemetry, no-op unless a provider is set):
// dimmer.outbox.published, publish_errors, retries, dead_letters,
// commit_to_ack (seconds, row insert to broker acknowledgement), and the
// gauges backlog, oldest_age and dead for the buckets each relay leases.
// Logs go to log/slog.
//
// Operating an outbox a service installed, from a tool: [Installed] reads
// its configuration; the dimmer CLI's "outbox" commands (relay, status,
// dead list|retry|skip) are built on it.
//
// [Relay.Run] runs until its context ends (an abrupt stop, like a crash:
// the other relays take its buckets over once they see its session gone)
// or [Relay.Shutdown] (the batch in flight completes and the leases are
// handed back at once; called after Run's context ended, it still hands
// them back and deregisters).
package outbox
