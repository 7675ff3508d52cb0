// Package profilesvc is the profile store of examples/profiles: profiles
// (one small struct per id) moving from a Postgres table (old) to Redis
// hashes (new) under the dimmer migration [Migration].
//
// [Open] creates the table and dimmer's stores in the service's schema and
// returns a [Service]: writes go through a dualwrite.Writer (a missed
// secondary write becomes a repair in an outbox table, replayed by
// dualwrite.NewRepairRelay), reads through a shadowread.Reader comparing
// the two kinds of store, the stage comes from the Postgres flag provider
// through flags.Source and every observation feeds a flags.Watchdog.
//
// Every profile carries a version. A write names the version it creates and
// never replaces an equal or newer one on either side ([ErrStale] for the
// caller when the authoritative side already holds it), so a late secondary
// write, a repair or the copy of the history can never bring a key back.
package profilesvc
