// Package kafkasink is the outbox's Kafka publisher: give it to an outbox
// relay when the events of a service go to Kafka.
//
//	producer, err := kgo.NewClient(kafkasink.ClientOptions(brokers...)...)
//	pub, err := kafkasink.New(producer)
//	ob, err := outbox.New(outbox.Config{RecordLimit: pub}) // Enqueue refuses what the broker would
//	relay, err := ob.NewRelay(pool, pub, outbox.RelayConfig{})
//	go relay.Run(ctx)
//
// The record key is the message key (nil for keyless messages), the value is
// the payload, and the headers are the message headers plus
// [outbox.HeaderMessageID] carrying the message ID for consumers'
// de-duplication (see package inbox). A record counts as published when the
// client's produce callback reports success; build the client with the
// franz-go defaults (idempotent producer, acks=all) or [ClientOptions], so
// that an acknowledgement means the write is durable on the in-sync
// replicas and a producer retry can never duplicate or reorder it. [New]
// refuses a client configured otherwise ([ErrWeakProducer]).
//
// The broker's record limit counts the key, the headers and the record's
// own overhead, not only the payload: [Publisher.MaxRecordBytes] and
// [RecordBytes] say what it accepts and what a message costs, the way
// franz-go counts it, so a message the broker would refuse is refused at
// Enqueue instead of holding back its key in the relay.
//
// Tests and the default example run against franz-go's in-process cluster
// (kfake) on loopback; the same code runs against a real cluster when its
// brokers are given (DIMMER_KAFKA_BROKERS in dimmer's own tests). The relay
// delivers at least once: consumers de-duplicate on the message-ID header
// with package inbox.
package kafkasink
