// Package dimmertest gives each test its own slice of the real PostgreSQL
// and Redis servers named by DIMMER_POSTGRES_URL and DIMMER_REDIS_URL
// (defaults: postgres://postgres@127.0.0.1:5432/postgres and
// redis://127.0.0.1:6379/0): a fresh database ([Database]) or schema
// ([Schema]), or a Redis key prefix ([Redis]), removed when the test ends,
// so tests run in parallel and leave nothing behind. dimmer's own modules
// test with it, and so can a service testing its migration against real
// stores.
//
//	func TestAccountsMigration(t *testing.T) {
//		t.Parallel()
//		pool, schema := dimmertest.Schema(t)  // search_path is the schema
//		rdb, prefix := dimmertest.Redis(t)    // keys go under prefix
//		...
//	}
//
// The test user needs CREATE on the database of DIMMER_POSTGRES_URL for
// [Schema]. [Database] also needs CREATEDB; without it, it falls back to a
// schema of its own (see there), so the same tests run on a server where
// the test user cannot create databases.
//
// [NewHangingProxy] stands between a client and a server on loopback and,
// once told to [HangingProxy.Hang], stops answering without closing
// anything: how a test shows that a call returns at its ctx when the
// database or broker goes quiet mid-run. [HangingPool] opens a pool on the
// test database through one.
//
// When a server does not answer, the test is skipped, unless CI=true, where it
// fails: `make test` always starts the servers, so a skip there would hide a
// broken set-up.
package dimmertest
