// Package redissink publishes outbox records to Redis Streams with XADD: the
// [outbox.Publisher] to give an outbox relay when the events of a service
// go to Redis rather than Kafka.
//
//	pub, err := redissink.New(rdb, redissink.WithStreamPrefix("svc:"), redissink.WithMaxLen(100_000))
//	relay, err := ob.NewRelay(pool, pub, outbox.RelayConfig{})
//	go relay.Run(ctx)
//
// Each record becomes one stream entry in the stream named prefix+topic
// ([Publisher.Stream]), with the fields "id" (the message ID, for
// consumers' de-duplication through package inbox), "key", "payload" and
// one "h:<name>" field per header. A batch is sent as one pipeline; each
// XADD's own reply decides whether its record counts as published, so a
// failed entry is retried by the relay without re-sending the others. With
// [WithMaxLen], XADD trims the stream approximately (~), so it stays bounded
// without slowing every write; size it above the longest consumer lag.
//
// The relay delivers at least once (a crash between XADD and the outbox's
// acknowledgement sends the entry again): consumers de-duplicate on "id".
package redissink
