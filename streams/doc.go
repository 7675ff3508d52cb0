// Package streams moves a Kafka topic, its producers and its consumers from
// one cluster (old) to another (new) under a migration's stage flag
// (DESIGN §5), with consumers moving first and at an exact position.
//
// The routing comes from package flags and nowhere else: producers write to
// the sides of [flags.Stage.Writes] and take the acknowledgement of
// [flags.Stage.ProduceAuthoritative]; consumers read [flags.Stage.Reads].
//
//	stage      produce to  ack from  consume from
//	off        old         old       old
//	dualwrite  old+new     old       old
//	shadow     old+new     old       old
//	live       old+new     old       new        (consumers first)
//	rampdown   old+new     new       new
//	complete   new         new       new
//
// The new cluster is filled in one of two ways: a [Producer] that services
// use instead of their franz-go client (dual produce), or a [Mirror] that
// copies the topic for producers that cannot be changed.
//
// # Record identity
//
// Every record has an [Origin]: the cluster that acknowledged it first,
// with the partition and offset it got there. A record read without a
// [HeaderOrigin] header is native to the cluster it is read from, and its
// origin is where it is read; every copy, whether made by the [Mirror] or
// by the [Producer]'s second write or a replayed repair, carries its
// origin in the header and sits in the same partition. An origin names one
// record for good: offsets are never reused within a partition.
//
// # Why the cutover is exact
//
// A [Consumer] keeps, per partition and per origin cluster, the set of
// origin offsets it processed: a frontier (every offset below it) plus a
// short list of spans above it (copies can reach the other cluster out of
// origin order: several producer instances, a repair replayed after a later
// record). It processes a record only if its origin is not in the set, and
// it commits the set as the commit metadata of its position, so the set and
// the position move together, durably, on the cluster being read.
//
// To move from cluster A to cluster B it commits on A, leaves A's group,
// and commits on B the same set one epoch up at a lower bound L of B's
// unprocessed records: the highest of the group's earlier commit on B, the
// bound on B its state carries, and B's log start. Then it joins B's group
// and reads from L.
//
// The bound on B is what keeps a first move onto a cluster the group never
// read from scanning the whole log. While a consumer reads A and the stage
// writes B too, it follows B's copies of its partitions: it reads them in
// offset order and raises the bound over each record whose origin its set
// holds, and stops at the first one it does not (until the consumer
// processes that origin on A). The bound is committed with the set, in the
// same metadata, so it is always checked against a set the commit holds.
// A move then reads on B only what was copied since the follower last
// caught up (BENCH streams_cutover_long_topic_rescanned_max), whatever the
// length of the topic. A move also records the position it leaves on A as
// the state's bound on A.
//
//   - Nothing is skipped: every record on B at or after L is read; one is
//     dropped only when its origin is in the set, that is, when the same
//     record (from whichever cluster) was processed. Before L every record
//     is processed: L is an earlier commit on B (processed then, and the set
//     only grows), a bound every record below which was checked against the
//     set (which only grows), or the log start.
//   - Nothing is processed twice: the set holds every origin processed on
//     either cluster; a record is processed only when its origin is absent,
//     and is added as it is processed. A mirror that re-sends a tail after
//     a crash makes copies with the same origin, dropped the same way.
//   - A crash anywhere in a move is finished by the next run: the commit
//     with the highest epoch is the current state, so a consumer restarted
//     on B after committing on A (and before committing on B) redoes the
//     move, and one that committed on B resumes there.
//
// A record whose origin header does not parse cannot be placed: it is
// counted (ConsumerStats.Unknown) and, with
// ConsumerConfig.UnknownOrigin, de-duplicated another way, e.g. through
// the inbox.
//
// The processed set stays small while the copies are in origin order. When
// they arrive far out of order its holes can outgrow the commit metadata
// (Kafka's offset.metadata.max.bytes, 4096 by default): a consumer with a
// ConsumerConfig.Overflow ([PostgresOverflow]) then spills the smallest
// spans there before the commit, durably, and keeps in the metadata only
// the region they came from; a record whose origin falls in that region
// and not in a span still held is asked of the overflow (counted,
// ConsumerStats.Lookups). The set stays exact, so the argument above holds;
// the cost is a lookup per record of the region, which only late or
// repeated copies fall in. Without an overflow such a set stops the
// consumer with [ErrStateTooLarge] rather than commit a set that lies.
// [Rewind] refuses a range reaching into a spilled region.
//
// # A group moves as a whole
//
// Every instance of a group evaluates the stage with the group id as the
// targeting key, but flag providers see a change at different times. So an
// instance joins a cluster only when no member of its group consumes the
// other one: it waits before joining, and checks again once it is a member
// and before it moves or loads any state, so of two instances joining
// opposite clusters at once at least one sees the other and backs off
// (ConsumerStats.Fenced). The first instance to see a change leaves; the
// others, still on the former stage, take over its partitions there and
// consume every record until they see the change too; the group then moves.
// No record is processed on both clusters, and the group does not stop
// meanwhile. A killed instance holds the move until its session times out
// (10s by default). The consumer's stage stays per group rather than per
// record key: keys of one partition are read in one offset order on one
// cluster, and the exactness above is per partition, so a share of keys
// cannot read another cluster without giving up per-key order across the
// move; producers, whose flag is per key, are where a canary moves keys.
//
// # Dual produce and repairs
//
// [Producer.Produce] returns the authoritative cluster's acknowledgement
// ([flags.Stage.ProduceAuthoritative]: old until rampdown). The copy is
// queued, in the acknowledgement's promise, so copies of a partition queue
// in origin order, and produced to the other cluster in the same partition
// with the idempotent producer and acks from all in-sync replicas. A copy
// that fails or is not acknowledged within the copy timeout becomes a
// [Repair] in the [RepairLog] (the outbox: [NewOutboxRepairLog]), and so do
// the partition's later copies, until the log has been replayed
// ([NewRepairRelay]: one key's repairs one at a time, in order).
// Should a timed-out copy land after all, it is a duplicate consumers drop.
//
// # The mirror
//
// [Mirror] copies old to new for producers that cannot be changed. Its
// position is a commit on old made after new acknowledged the round; killed
// at any point it resumes there and re-sends at most a round. A target with
// another partition count is refused ([ErrPartitionMismatch]).
//
// # Comparison, guards, operations
//
// [Shadow] reads both clusters while the stage compares one and matches
// records by origin: a verdict per record (match, missing, extra, out of
// order, payload), counted as dimmer.streams.shadow.records and observed
// as a compared read, so a [flags.Watchdog] steps the flag back when new
// goes wrong. [MirrorCaughtUpGuard], [RepairsGuard] and [ConsumerLagGuard]
// are the topic's go/no-go checks beside [flags.FleetGuard].
// [GroupStatus] and [Translate] say where a group stands on both clusters
// (and a mirror on the one it copies from, new for a mirror back);
// [Rewind] moves a stopped group back so it processes a range again, once;
// [Replay] applies a range through the inbox, keyed by origin, so an
// effect applied on one cluster is not applied again from the other. The
// operator's commands are `dimmer stream status|lag|mirror|translate|replay`.
package streams
