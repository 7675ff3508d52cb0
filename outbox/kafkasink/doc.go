// Package kafkasink is the outbox's Kafka publisher: give it to an outbox
// relay when the events of a service go to Kafka.
//
//	producer, err := kgo.NewClient(kafkasink.ClientOptions(brokers...)...)
//	pub, err := kafkasink.New(producer)
//	relay, err := ob.NewRelay(pool, pub, outbox.RelayConfig{})
//	go relay.Run(ctx)
//
// Tests and the default example run against franz-go's in-process cluster
// (kfake) on loopback; the same code runs against a real cluster when its
// brokers are given (DIMMER_KAFKA_BROKERS in dimmer's own tests). The relay
// delivers at least once: consumers de-duplicate on the message-ID header
// with package inbox.
package kafkasink
