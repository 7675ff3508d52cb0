// Package inbox de-duplicates messages on the consumer side: a consumer
// records (consumer, message id) in the same transaction as the effect of
// the message, so a message delivered again (at-least-once: a relay crashed
// between publish and acknowledgement, a consumer crashed before committing
// its offset or XACK) is recognised and skipped, and the effect happens
// exactly once.
//
//	tx, _ := pool.Begin(ctx)
//	first, err := in.Mark(ctx, tx, "billing", msgID)
//	if first { apply(ctx, tx, msg) }
//	tx.Commit(ctx)          // then commit the offset / XACK
//
// The message id is the one the outbox gave the message: the Kafka header
// [outbox.HeaderMessageID] (package kafkasink) or the "id" field of the
// stream entry (package redissink). [Inbox.Install] creates the table;
// [Inbox.Prune] removes entries older than any redelivery can be.
//
// Two consumers handling the same message at once serialise on the row:
// the second waits for the first's transaction and then sees first=false
// (or first=true if the first rolled back).
package inbox
