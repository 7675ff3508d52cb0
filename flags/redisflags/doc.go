// Package redisflags keeps dimmer's stage flags, their audit log and the fleet
// registry in Redis, and serves the flags to OpenFeature with a provider that
// evaluates from a local snapshot.
//
// # Store
//
// [NewStore] returns a [Store], which implements [flags.Store] and
// [flags.FleetStore] over a redis.UniversalClient. Nothing needs installing.
// Every key starts with the prefix ("dimmer:" unless [WithPrefix] says
// otherwise):
//
//	<prefix>{stage}:flags            hash  migration -> flag document
//	<prefix>{stage}:revisions        hash  migration -> revision
//	<prefix>{stage}:audit:<migration> list  audit entries, newest first
//	<prefix>{fleet}:instances        hash  instance id -> instance document
//	<prefix>{fleet}:expiry           zset  instance id scored by expiry (ms, server clock)
//
// The flag document is exactly the JSON of [flags.State] (see
// [flags.State.Encode]); an audit entry is the JSON of [flags.AuditEntry], an
// instance that of [flags.Instance]. The hash tags keep each group in one
// Cluster slot.
//
// [Store.Swap] is one Lua script: it compares the stored revision with the
// expected one (a migration never set is revision 0), writes the document and
// revision, pushes the audit entry and publishes the change, all or nothing,
// so exactly one of several racing operators wins and the others get a
// *[flags.ConflictError]. Fleet expiry uses Redis's clock (TIME), and
// [Store.Instances] prunes expired instances as it reads.
//
// # Messages
//
// Changes are published on "<prefix>stage_flags" ([Channel]) with the payload
// "<migration>\n<document>".
//
// # Provider
//
// [NewProvider] returns a [Provider], an OpenFeature FeatureProvider with
// state handling and events. It loads every flag when the OpenFeature API
// initialises it, then subscribes to the channel on a connection of its own
// (name the client with redis.Options.ClientName to find it in CLIENT LIST).
// Evaluation reads the snapshot only: no I/O, no lock.
//
// The string value of a flag is its stage for the evaluation's targeting key,
// per [flags.State.StageFor]: keys whose [flags.Bucket] of (flag key,
// targeting key) falls under the rollout's share get the rollout stage. The
// hash depends on the two strings only, so every instance and every process
// serves a key the same stage.
//
// Healing: every [WithResyncInterval] (default 5s) the provider reloads all
// flags, so a lost message is visible for at most one interval; when the
// subscription breaks (a restart, CLIENT KILL) the provider turns STALE, keeps
// serving the last known stages, resubscribes with backoff and reloads
// everything once subscribed (pub/sub keeps no backlog), then turns READY.
// Each change emits PROVIDER_CONFIGURATION_CHANGED naming the flag.
//
// A stored document that does not decode affects only its flag: evaluating
// it is a PARSE_ERROR naming the flag and the problem, so [flags.Source]
// serves its fallback; every other flag is served as usual.
package redisflags
