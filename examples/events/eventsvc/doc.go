// Package eventsvc is the events example as a library: an order-events
// topic moved from one Kafka cluster to another under load with package
// streams. A producer service writes order events per customer through a
// streams.Producer, a consumer service keeps per-customer totals through a
// streams.Consumer, and the topic's stage flag (Postgres provider) goes
// off -> dualwrite -> shadow -> live, where the new cluster stops
// answering: the shadow comparison feeds the watchdog, which rolls the flag
// back to shadow; once the cluster is healed and the repairs replayed, the
// flag goes on to complete.
//
// [Run] performs the move and returns a [Report]: records produced and
// consumed, skipped and processed twice (in total and after each of the
// consumer's moves between clusters, [Move]), per-key order violations,
// and the consumer group's lag at each [Step]. examples/events runs it on
// its own; examples/demo runs it after the orders migration.
//
// Every event carries the customer's sequence number, so the consumer's
// ledger checks exactness itself, not through dimmer's counters: after a
// move, each customer's first event must be the successor of the last one
// it handled before the move.
package eventsvc
