// Package ordersvc is the orders service of examples/orders: an HTTP JSON
// API whose data moves from the legacy table orders_legacy (lines embedded
// as JSON) to orders + order_lines under the dimmer migration [Migration].
//
// [Open] builds what every instance shares (flag store, schema registry,
// backfiller, the events and repairs outboxes) and [Shared.Install] creates
// it; [Plan] is the expand/contract plan, [BackfillJobs] the history's copy
// and [Shared.Guards] the controller's go/no-go checks. [Start] runs one
// instance: it refuses a schema stage outside [Needs], then evaluates the
// stage through the Postgres provider, writes through a dualwrite.Writer,
// reads through shadowread.Readers, feeds its flags.Watchdog, heartbeats
// into the fleet registry and runs a repair relay and an events relay.
// [Instance.Handler] is the API.
package ordersvc
