// Package backfill copies the rows of an old table into the new side of a
// migration: keyset-chunked, checkpointed, resumable after a kill -9,
// idempotent, safe against live dual writes, throttled, spread over workers
// and processes, and verified.
//
// # A job
//
// A [Job] is a source (a Postgres table read in the order of its key: one or
// more columns of any ordered type — integers including ≤ 0 and the extremes,
// text in its collation, UUIDs), a transform ([Spec.Exprs], SQL run in the
// server, and/or a Go [Transform]) and a [Sink]. Without a Go transform and
// with the target in the same database, each chunk is copied inside the
// server, which is what makes a backfill nearly as fast as a hand-written
// INSERT INTO … SELECT. [PGSink] writes to another database and [RedisSink]
// to Redis hashes; any other store implements the three-method [Sink].
//
// # The fast path: plain inserts where nothing can be overwritten
//
// The version-guarded upsert costs about twice a plain INSERT (its
// speculative insertion), so a chunk lists the keys of its range the target
// already holds (an index probe), upserts those rows and inserts the others
// with a plain INSERT … SELECT inside a savepoint. A plain INSERT never
// overwrites anything: a dual write landing in the range meanwhile makes it
// fail with unique_violation, the chunk rolls back to the savepoint and is
// redone by the upsert alone ([Result.Fallbacks], metric
// dimmer.backfill.fallbacks); after a fallback a worker upserts its next
// chunks directly (4, doubling up to 64 while fallbacks keep coming), so a
// range the dual writes keep filling does not pay for two statements. When
// Spec.Exprs computes a key column the target's keys are not the source's,
// and every chunk is upserted.
//
// # Checkpoints, exactly once
//
// The key space up to an upper bound taken when the job starts is split
// into ranges (Config.Ranges; by default one per 100,000 rows, at least
// one per worker, at most 16 per worker), each with its cursor in the backfill tables
// ([Backfiller.Install], in a schema of the caller's choosing). When the
// sink is a table of the database holding the checkpoints, a chunk's writes
// and its cursor commit in one transaction: a resume repeats no chunk and
// skips none, whenever the process died; such a transaction commits with
// synchronous_commit off, since a server crash loses chunk and cursor
// together and a resume redoes them, which keeps the backfill's WAL flushes
// out of the way of the service's commits (an in-place fill commits
// synchronously: the service's commits, right behind its chunks, would
// flush their WAL themselves). Elsewhere the sink commits first
// and the cursor right after: a crash in between redoes one chunk, which
// the idempotent, version-guarded sink absorbs. A job resumed with another
// definition (its [Spec], sink or TransformVersion) is refused with a
// [*DefinitionChangedError]; transient errors (lost connections, a
// terminated backend, deadlocks) retry the chunk with backoff.
//
// # The contract with dualwrite
//
// A backfill runs while the migration's stage is dualwrite (Run refuses off
// and complete, [ErrStageNotReady]): from then on every instance writes new
// as well as old, so the rows created or changed after the upper bound are
// the dual writes' responsibility and the backfill terminates even under a
// high insert rate. Both write paths compare [Spec.VersionColumn] (a
// version number or timestamp) inside their upsert: the backfill's
//
//	ON CONFLICT (key) DO UPDATE … WHERE new.version <= EXCLUDED.version
//
// never replaces a newer dual write with an older copy, and the dual
// writer's own guard never replaces a newer row with its older one. A row
// deleted by a dual write while its chunk is being copied may come back;
// Config.LockSourceRows prevents it (the delete waits for the chunk), and
// verification finds and repairs it otherwise. Going back to off bumps the
// migration's epoch: new is stale, a running job stops ([ErrEpochChanged])
// and the next Run starts over.
//
// # Verification and the guard
//
// [Backfiller.Verify] compares old and new in key ranges by row count and a
// sum of row hashes over the compared columns. A row is hashed through its
// text form (ROW(…)::text, read under fixed TimeZone, DateStyle,
// IntervalStyle, extra_float_digits and bytea_output), which is injective:
// NULL, the string "null", JSON null and the empty string all differ, json
// is compared as written (key order, whitespace, duplicate keys), arrays
// with their bounds and NULL elements, numerics with their digits, floats
// exactly (NaN and -0 included). Any row that IS DISTINCT FROM its source
// fails verification; so do values SQL takes for equal but that are
// spelled differently (1.5 and 1.50, 'a' and 'A' under a case-insensitive
// collation). A source value whose type differs from its target column's
// is converted to the target's type first, as the copy converts it. Where source
// and target are read through the same pool, both sides of a range are
// summed in one statement, so one snapshot sees them; in different
// databases they take two statements, the side the dual writes write
// second read first.
//
// Verification runs under live dual writes, which update old and new in
// separate transactions: even in one snapshot a key written a moment ago
// differs. So a range whose sums differ is compared key by key (in one
// database one statement joining the sides on the key; otherwise both
// sides of the range are listed), and each differing key is looked at
// again after VerifyOptions.RecheckDelay, and once more if its source row
// changed in between. A key equal at a later look, or whose source keeps
// changing while its target holds at least the version the source had at
// the look before, had a dual write in flight: it counts in
// [Verification.InFlight] and fails nothing. A key whose source row did not
// change between two looks and whose target still differs is a lasting
// difference ([Verification.DifferingKeys], its range in
// [Verification.Differing]): it fails the verification, and with
// VerifyOptions.Repair its range is recopied (of the target rows the
// source lacks, only the differing keys' are deleted: another may be a
// create in flight, new side first) and its keys checked again.
// The rule errs on the safe side: a dual write whose second side lags its
// first by more than RecheckDelay is reported as a lasting difference,
// while a target that differs from a source row nothing is writing never
// passes. (A key written throughout the check is judged by its versions;
// its content is compared by the next verification that meets it at rest.)
//
// A lasting difference whose target row holds a greater version than its
// source row is reported apart ([Verification.NewerInTarget]): the target
// has a write the source lacks (from live on, a failed write to old
// waiting in the dual writes' repair log or dead-lettered there;
// otherwise a write that reached new only). The version guard keeps the
// copy from replacing it, so Repair cannot clear it and the verification
// fails until one of two ways out is taken: replay the repair log so the
// source catches up and verify again, or, when the source is right,
// repair with VerifyOptions.OverwriteNewer (`dimmer backfill verify
// --repair --overwrite-newer`), which copies the source's row over it.
//
// A [RedisSink] target is verified by reading it back: each chunk of the
// source is shaped as the copy shapes it, rendered as the sink writes it
// and compared field by field with the hashes HGETALL returns, its
// differing keys going through the same looks and repair as a table's.
// Redis has no key order, so a hash whose key the source never had is not
// found. Other sinks are not read back ([ErrNotVerifiable]).
//
// [BusinessCheck] aggregate queries run on both sides with a tolerance. The
// result is stored at the migration's epoch; [VerifiedGuard] (a flags.Guard
// applying when keys enter shadow) passes only when every job of the
// migration finished and was verified successfully at the current epoch.
//
// # Speed control, pause, scale out
//
// A chunk that holds locks the service's writes wait for until it commits
// — an in-place fill (Target is Source: every copied row is updated) or
// Config.LockSourceRows — follows Config.LockTime instead (50ms; 20ms for
// an in-place fill, whose rows are locked against every write), so a
// write meeting a chunk's row waits a few tens of milliseconds, not half
// a second. An in-place chunk also stays under 0.5% of the table's
// estimated rows (at least Config.MinChunk): the share of the service's
// writes that meet a locked row is the chunk's share of the table. An
// in-place chunk is one UPDATE of the columns Spec.Exprs
// computes, not the upsert: an upsert of a table into itself probes the
// key and locks each row (a WAL record of its own) before updating it,
// twice the work while the chunk's rows are held, and the version guard
// has nothing to compare (READ COMMITTED updates the newest version of a
// row the service wrote meanwhile, computed from it).
//
// Chunk sizes follow Config.TargetChunkTime by an EWMA of the time per row,
// within bounds; Config.RowsPerSecond caps the rate (every chunk is charged,
// a range's last one too, and a chunk holds at most a quarter second of the
// rate, so the rate holds to within a few per cent over any 5 s); [Signal]s hold the job
// back — [ReplicationLag] (pg_stat_replication.replay_lag) and [Latency]
// (the service's own latency) are built in. Signals are read before every
// chunk; a hold halves the chunk size and the job's duty cycle (the share
// of time its workers copy: each chunk is followed by a rest in
// proportion, and the target chunk time shrinks with it, since a chunk's
// WAL reaches the disk in one burst that the service's commits queue
// behind). The duty cycle starts at 1/8 and doubles every second until the
// first hold; after, every second without a hold wins back 1/16 (additive
// increase, multiplicative decrease, by time since a signal reports the
// harm of the last second or so), so the rate settles where the signals
// stop complaining instead of swinging between full speed and a hold.
// [Backfiller.Pause] and [Backfiller.Resume] (and `dimmer backfill
// pause|resume`) flip a flag on the job's row in the backfill tables,
// which every worker reads in the transaction of each chunk: the pause
// reaches every process within one chunk, costs no extra query, works
// whichever flag store (Postgres or Redis) serves the stage, and does not
// bump the stage flag's revision (which would trip the fleet barrier for
// nothing).
//
// Config.Workers copy disjoint ranges in one process; any number of
// processes running the same job share its ranges through leases in
// Postgres, renewed by every chunk and fenced by a token checked in the
// chunk's transaction, so a worker presumed dead cannot commit over its
// successor. A lease also holds a session-level advisory lock on a
// connection of the holder's own, which dies with the process: a range
// whose lock can be taken is free at once, so after a kill -9 the next
// claim (a restarted run, or another process's idle worker within
// Config.PollInterval) continues within a second or two, not after
// Config.LeaseTTL. The lease still expires for a holder whose session
// outlives it (stuck, or a half-open connection). The lock connection is
// opened with the pool's connection settings; behind a transaction-pooling
// proxy (PgBouncer in transaction mode) session locks mean nothing, so
// point the Backfiller at the server or a session-pooled port: otherwise a
// live holder's range may be taken over early (its next chunk then fails
// the token check and nothing is copied twice).
//
// Ranges are planned to hold about equal row counts: exactly on small
// tables, from a block sample of big ones (about 300 blocks per range:
// a table stored in about its key order holds neighbouring keys in each
// block, so the block is the sample's unit, not the row). A worker that
// finds no free range steals: it splits the leased range with the most
// rows left (counted from the holder's cursor, up to 64 chunks) when each
// half holds at least a quarter of its chunk, and leases the upper half as
// a new range, so no worker of any process sits idle while another has a
// long range to go (rows differ in cost and processes join late). The
// split takes the range row's lock that every chunk takes first, so it
// waits for the holder's chunk in flight; when that chunk passed the split
// key or most of the way to it, the split key is placed again halfway
// through what the holder has left. The holder reads its range's end again
// at the start of every chunk, so a chunk runs wholly before or wholly
// after a split, and no row is copied by both or by neither.
//
// # Progress
//
// Config.Progress receives a [Progress] after each chunk (rows, rows/s,
// ETA, per worker, why the job is held); OpenTelemetry metrics
// dimmer.backfill.rows, .chunk.duration, .held and .retries; and
// [Backfiller.Status] reads any job's state as every process sees it.
// [Backfiller.DryRun] shows what would be copied and writes nothing.
package backfill
