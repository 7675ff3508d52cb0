package dimmertest_test

import (
	"context"
	"fmt"
	"net/url"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
)

func tctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// adminConn connects as the configured (admin) test user.
func adminConn(t *testing.T) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(tctx(t), dimmertest.PostgresURL())
	if err != nil {
		dimmertest.Unavailable(t, "PostgreSQL", err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// restrictedUser creates a login role without CREATEDB (granted CREATE on
// the admin database when mayCreateSchemas), points DIMMER_POSTGRES_URL at
// it for the rest of the test and drops it at the end.
func restrictedUser(t *testing.T, mayCreateSchemas bool) string {
	t.Helper()
	admin := adminConn(t)
	role := dimmertest.Name("dimmer_r_")
	db := admin.Config().Database
	_, err := admin.Exec(tctx(t), "CREATE ROLE "+role+" LOGIN NOCREATEDB")
	require.NoError(t, err)
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := admin.Exec(c, "DROP OWNED BY "+role)
		assert.NoError(t, err)
		_, err = admin.Exec(c, "DROP ROLE "+role)
		assert.NoError(t, err)
	})
	if mayCreateSchemas {
		_, err = admin.Exec(tctx(t), "GRANT CREATE ON DATABASE "+pgx.Identifier{db}.Sanitize()+" TO "+role)
		require.NoError(t, err)
	}
	u, err := url.Parse(dimmertest.PostgresURL())
	require.NoError(t, err)
	u.User = url.User(role)
	t.Setenv("DIMMER_POSTGRES_URL", u.String())
	return role
}

func schemaExists(t *testing.T, admin *pgx.Conn, name string) bool {
	var n int
	require.NoError(t, admin.QueryRow(tctx(t), `SELECT count(*) FROM pg_namespace WHERE nspname = $1`, name).Scan(&n))
	return n == 1
}

// TestDatabaseIsAFreshDatabase: with CREATEDB, each test gets a database of
// its own, dropped at the end.
func TestDatabaseIsAFreshDatabase(t *testing.T) {
	admin := adminConn(t)
	var name string
	t.Run("test", func(t *testing.T) {
		pool := dimmertest.Pool(t, dimmertest.Database(t))
		require.NoError(t, pool.QueryRow(tctx(t), `SELECT current_database()`).Scan(&name))
		assert.NotEqual(t, admin.Config().Database, name)
	})
	var n int
	require.NoError(t, admin.QueryRow(tctx(t), `SELECT count(*) FROM pg_database WHERE datname = $1`, name).Scan(&n))
	assert.Zero(t, n, "dropped when the test ended")
}

// TestDatabaseFallsBackToASchemaWithoutCreateDB: a test user that may not
// create databases still gets a place of its own: a schema, set as the
// search_path of the URL Database returns, dropped when the test ends.
func TestDatabaseFallsBackToASchemaWithoutCreateDB(t *testing.T) {
	admin := adminConn(t)
	role := restrictedUser(t, true)
	var schema string
	t.Run("test", func(t *testing.T) {
		pool := dimmertest.Pool(t, dimmertest.Database(t))
		var user, db string
		require.NoError(t, pool.QueryRow(tctx(t), `SELECT current_user, current_database(), current_schema()`).Scan(&user, &db, &schema))
		assert.Equal(t, role, user)
		assert.Equal(t, admin.Config().Database, db)
		assert.Regexp(t, `^dimmer_t_[0-9a-f]{12}$`, schema)
		_, err := pool.Exec(tctx(t), `CREATE TABLE accounts (id text PRIMARY KEY)`)
		require.NoError(t, err, "unqualified tables go to the test's schema")
		var where string
		require.NoError(t, pool.QueryRow(tctx(t), `SELECT table_schema FROM information_schema.tables WHERE table_name = 'accounts'`).Scan(&where))
		assert.Equal(t, schema, where)

		s, name := dimmertest.Schema(t)
		require.NoError(t, s.Ping(tctx(t)), "Schema works for the same user")
		assert.True(t, schemaExists(t, admin, name))
	})
	assert.False(t, schemaExists(t, admin, schema), "dropped when the test ended")
}

// fatalT records the failure of a helper that calls Fatalf and stops the
// helper's goroutine, as testing.T does.
type fatalT struct {
	testing.TB
	mu  sync.Mutex
	msg string
}

func (f *fatalT) Helper()             {}
func (f *fatalT) Logf(string, ...any) {}
func (f *fatalT) Cleanup(fn func())   { f.TB.Cleanup(fn) }
func (f *fatalT) Fatalf(format string, args ...any) {
	f.mu.Lock()
	f.msg = fmt.Sprintf(format, args...)
	f.mu.Unlock()
	runtime.Goexit()
}

// TestDatabaseNamesTheMissingGrants: a user that may create neither a
// database nor a schema gets a failure saying which grant would do.
func TestDatabaseNamesTheMissingGrants(t *testing.T) {
	role := restrictedUser(t, false)
	// PUBLIC has no CREATE on a database by default: the role has none.
	ft := &fatalT{TB: t}
	done := make(chan struct{})
	go func() { defer close(done); dimmertest.Database(ft) }()
	<-done
	ft.mu.Lock()
	defer ft.mu.Unlock()
	require.NotEmpty(t, ft.msg, "Database failed the test")
	assert.Contains(t, ft.msg, "neither databases nor schemas")
	assert.Contains(t, ft.msg, "ALTER ROLE "+role+" CREATEDB")
	assert.Contains(t, ft.msg, "GRANT CREATE ON DATABASE")
}
