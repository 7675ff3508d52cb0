// Package pgflags keeps dimmer's stage flags, their audit log and the fleet
// registry in PostgreSQL, and serves the flags to OpenFeature with a provider
// that evaluates from a local snapshot.
//
// # Store
//
// [NewStore] returns a [Store], which implements [flags.Store] and
// [flags.FleetStore] over a *pgxpool.Pool. [Store.Install] creates (or
// upgrades) the tables in a schema, "dimmer" unless [WithSchema] says
// otherwise. It is idempotent, records its [SchemaVersion] in schema_version,
// refuses tables of a newer build, and is safe when several processes install
// at once (they queue on a transaction-scoped advisory lock).
//
// The tables:
//
//	stage_flags(migration text PRIMARY KEY, doc jsonb, revision bigint, updated_at)
//	stage_audit(id bigserial, migration, at, entry jsonb)      -- newest = highest id
//	fleet_instances(id text PRIMARY KEY, doc jsonb, expires_at) -- expiry on the database clock
//
// doc is exactly the JSON of [flags.State] (see [flags.State.Encode]); an
// audit entry is the JSON of [flags.AuditEntry], an instance that of
// [flags.Instance].
//
// [Store.Swap] is one transaction: the row is updated only if its revision
// still equals the expected one (a migration never set is revision 0, and two
// operators inserting it race on the primary key), so exactly one of several
// racing operators wins and the others get a *[flags.ConflictError]. The same
// transaction appends the audit entry and calls pg_notify, which PostgreSQL
// delivers exactly when the transaction commits, never for a rolled-back one.
//
// # Notifications
//
// The channel is "<schema>.stage_flags" ([Channel]), so stores in different
// schemas of one database do not hear each other. The payload is
// "<migration>\n<document>"; a document too large for a notification (8000
// bytes) is sent as the migration name alone and listeners load it.
//
// # Provider
//
// [NewProvider] returns a [Provider], an OpenFeature FeatureProvider with
// state handling and events. It loads every flag when the OpenFeature API
// initialises it, then holds one dedicated connection (taken out of the pool,
// application_name [ListenerApplicationName]) that LISTENs on the channel.
// Evaluation reads the snapshot only: no I/O, no lock.
//
// The string value of a flag is its stage for the evaluation's targeting key,
// per [flags.State.StageFor]: keys whose [flags.Bucket] of (flag key,
// targeting key) falls under the rollout's share get the rollout stage. The
// hash depends on the two strings only, so every instance and every process
// serves a key the same stage.
//
// Healing: every [WithResyncInterval] (default 5s) the provider reloads all
// flags, so a lost notification is visible for at most one interval; when the
// listening connection breaks (a restart, pg_terminate_backend) the provider
// turns STALE, keeps serving the last known stages, reconnects with backoff
// and reloads everything as soon as it listens again, then turns READY.
// Each change emits PROVIDER_CONFIGURATION_CHANGED naming the flag.
//
// A stored document that does not decode (written by hand, say) affects only
// its flag: evaluating it is a PARSE_ERROR naming the flag and the problem,
// so [flags.Source] serves its fallback; every other flag is served as usual.
package pgflags
