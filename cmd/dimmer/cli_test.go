package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
	"github.com/dimmer-dev/dimmer/flags/redisflags"
)

type result struct {
	code           int
	stdout, stderr string
}

func dimmer(t *testing.T, store []string, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code := run(ctx, append(append([]string{"--actor", "tester"}, store...), args...), &out, &errOut)
	return result{code, out.String(), errOut.String()}
}

// stores returns CLI store arguments for a fresh Postgres schema and a fresh
// Redis prefix, with a fleet store for each to register instances in.
func stores(t *testing.T) map[string]struct {
	args  []string
	fleet flags.FleetStore
} {
	pool, schema := dimmertest.Schema(t)
	pg, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, pg.Install(context.Background()))
	client, prefix := dimmertest.Redis(t)
	rs, err := redisflags.NewStore(client, redisflags.WithPrefix(prefix))
	require.NoError(t, err)
	return map[string]struct {
		args  []string
		fleet flags.FleetStore
	}{
		"postgres": {[]string{"--store", dimmertest.PostgresURL(), "--schema", schema}, pg},
		"redis":    {[]string{"--store", dimmertest.RedisURL(), "--prefix", prefix}, rs},
	}
}

// register heartbeats one instance that has applied revision rev of orders.
func register(t *testing.T, fleet flags.FleetStore, id string, rev int64) {
	t.Helper()
	require.NoError(t, fleet.Heartbeat(context.Background(), flags.Instance{
		ID: id, Build: "v1", Applied: map[string]int64{"orders": rev}, SeenAt: time.Now(),
	}, time.Minute))
}

func TestCLIWalk(t *testing.T) {
	t.Parallel()
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			r := dimmer(t, s.args, "stage", "get", "orders")
			require.Equal(t, exitOK, r.code, r.stderr)
			assert.Equal(t, "off\n", r.stdout, "a migration never set reads as off")

			r = dimmer(t, s.args, "status", "orders")
			require.Equal(t, exitOK, r.code, r.stderr)
			assert.Contains(t, r.stdout, "no live instance is registered")
			assert.Contains(t, r.stdout, "verdict: NO-GO")

			register(t, s.fleet, "api-1", 0)
			r = dimmer(t, s.args, "stage", "set", "orders", "dualwrite", "--reason", "start")
			require.Equal(t, exitOK, r.code, r.stderr)
			assert.Equal(t, "orders: dualwrite (revision 1)\n", r.stdout)

			// api-1 has not applied revision 1 yet.
			r = dimmer(t, s.args, "rollout", "orders", "shadow", "5")
			assert.Equal(t, exitRefused, r.code)
			assert.Contains(t, r.stderr, "fleet-acknowledged: 1 of 1 instances have not applied revision 1: api-1 at revision 0")

			register(t, s.fleet, "api-1", 1)
			r = dimmer(t, s.args, "rollout", "orders", "shadow", "5%")
			if name == "postgres" {
				// The Postgres store's database is also where the
				// backfill verification would be: shadow needs it.
				assert.Equal(t, exitRefused, r.code)
				// The guard reads the default backfill schema of the
				// shared database, which another test may have installed.
				assert.Regexp(t, `backfill-verified: no backfill (has been installed|was run or verified for orders)`, r.stderr)
				r = dimmer(t, s.args, "rollout", "orders", "shadow", "5%", "--force", "--reason", "filled by a restore")
			}
			require.Equal(t, exitOK, r.code, r.stderr)
			assert.Equal(t, "orders: dualwrite (shadow 5%) (revision 2)\n", r.stdout)

			r = dimmer(t, s.args, "status")
			require.Equal(t, exitOK, r.code, r.stderr)
			assert.Contains(t, r.stdout, "fleet: 1 live instance(s)")
			assert.Regexp(t, `orders\s+dualwrite \(shadow 5%\)\s+2\s+shadow\s+NO-GO`, r.stdout)

			r = dimmer(t, s.args, "status", "orders")
			require.Equal(t, exitOK, r.code, r.stderr)
			assert.Contains(t, r.stdout, "api-1  build v1  revision 1  behind (revision 1)")
			assert.Contains(t, r.stdout, "[FAIL] fleet-acknowledged")

			r = dimmer(t, s.args, "stage", "set", "orders", "off", "--reason", "incident 9")
			require.Equal(t, exitOK, r.code, r.stderr)
			assert.Equal(t, "orders: off (revision 3)\n", r.stdout)

			r = dimmer(t, s.args, "audit", "orders", "--limit", "2")
			require.Equal(t, exitOK, r.code, r.stderr)
			lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
			require.GreaterOrEqual(t, len(lines), 2)
			assert.Contains(t, lines[0], "applied  dualwrite (shadow 5%) -> off  by tester: incident 9")
			assert.Regexp(t, `applied( FORCED)?  dualwrite -> dualwrite \(shadow 5%\)`, r.stdout)
			assert.NotContains(t, r.stdout, "refused", "limit 2 shows the newest two")
		})
	}
}

func TestCLIExitCodes(t *testing.T) {
	t.Parallel()
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			r := dimmer(t, s.args, "stage", "set", "orders", "sideways", "--reason", "x")
			assert.Equal(t, exitUsage, r.code)
			assert.Contains(t, r.stderr, `unknown stage "sideways" (valid stages: off, dualwrite, shadow, live, rampdown, complete)`)

			r = dimmer(t, s.args, "stage", "set", "orders", "live", "--reason", "hurry")
			assert.Equal(t, exitRefused, r.code)
			lines := strings.Split(strings.TrimSpace(r.stderr), "\n")
			assert.Contains(t, lines[0], "transition off -> live refused:")
			assert.Contains(t, r.stderr, "\n  - one-step-forward: skips a stage: off -> live")
			assert.Contains(t, r.stderr, "\n  - fleet-acknowledged: no live instance is registered")
			assert.Contains(t, r.stderr, "\n  - health: only 0 comparisons in shadow")

			r = dimmer(t, s.args, "stage", "set", "orders", "dualwrite")
			assert.Equal(t, exitUsage, r.code)
			assert.Contains(t, r.stderr, "--reason is required")

			r = dimmer(t, s.args, "stage", "set", "orders", "dualwrite", "--reason", "no fleet yet", "--force")
			assert.Equal(t, exitOK, r.code, r.stderr)

			for _, args := range [][]string{
				{"stage", "get"},
				{"stage", "get", "a", "b"},
				{"stage", "get", "Not A Name"},
				{"rollout", "orders", "live", "150"},
				{"rollout", "orders", "live", "lots"},
				{"audit", "orders", "--limit", "-1"},
				{"stage", "get", "orders", "--bogus"},
				{"frobnicate"},
				{"rollout", "orders", "live", "NaN"},
				{"rollout", "orders", "live", "nan%"},
				{"rollout", "orders", "dualwrite", "99.999", "--force", "--reason", "every key but the check"},
				{"rollout", "orders", "dualwrite", "0.001"},
				{"stage", "set", "orders", "off", "--reason", "x", "--actor", ""},
				{"stage", "set", "orders", "off", "--reason", "  "},
				{"ui", "--listen", "127.0.0.1:99999"},
				{"outbox", "dlq"},
				{"stage", "sideways", "orders"},
				{"--store", "postgres://u:pw@127.0.0.1:5432/db?sslmode=bogus", "stage", "get", "orders"},
				{"--store", "postgres://u@127.0.0.1:5432/db?connect_timeout=soon", "stage", "get", "orders"},
				{"--store", "redis://127.0.0.1:6379/notanumber", "stage", "get", "orders"},
			} {
				r := dimmer(t, s.args, args...)
				assert.Equal(t, exitUsage, r.code, "%v: %s", args, r.stderr)
				assert.NotEmpty(t, r.stderr, "%v", args)
			}
			st, err := func() (string, error) {
				r := dimmer(t, s.args, "stage", "get", "orders")
				if r.code != exitOK {
					return "", fmt.Errorf("%s", r.stderr)
				}
				return r.stdout, nil
			}()
			require.NoError(t, err)
			assert.Equal(t, "dualwrite\n", st, "bad input changed nothing")
		})
	}
}

// The commands that only read check the flag store instead of installing
// it: a misspelt --schema is an error naming it, not an empty store (nor a
// new schema), and a role that may only read can read.
func TestCLIReadersDoNotInstall(t *testing.T) {
	t.Parallel()
	pool, schema := dimmertest.Schema(t)
	ctx := context.Background()
	store := []string{"--store", dimmertest.PostgresURL(), "--schema", schema + "_typo"}
	for _, args := range [][]string{{"stage", "get", "orders"}, {"status"}, {"status", "orders"}, {"audit", "orders"}} {
		r := dimmer(t, store, args...)
		assert.Equal(t, exitError, r.code, "%v: %s", args, r.stdout)
		assert.Contains(t, r.stderr, `schema "`+schema+`_typo" holds no flag store`, "%v", args)
	}
	var n int
	require.NoError(t, pool.QueryRow(ctx, `SELECT count(*) FROM pg_namespace WHERE nspname = $1`, schema+"_typo").Scan(&n))
	assert.Zero(t, n, "no schema was created")

	store = []string{"--store", dimmertest.PostgresURL(), "--schema", schema}
	r := dimmer(t, store, "stage", "set", "orders", "dualwrite", "--reason", "go", "--force")
	require.Equal(t, exitOK, r.code, r.stderr)
	role := dimmertest.Name("ro_")
	_, err := pool.Exec(ctx, `CREATE ROLE `+role+` LOGIN; GRANT USAGE ON SCHEMA `+schema+` TO `+role+`; GRANT SELECT ON ALL TABLES IN SCHEMA `+schema+` TO `+role)
	require.NoError(t, err)
	t.Cleanup(func() {
		_, _ = pool.Exec(context.Background(), `DROP OWNED BY `+role+`; DROP ROLE `+role)
	})
	u, err := url.Parse(dimmertest.PostgresURL())
	require.NoError(t, err)
	u.User = url.User(role)
	r = dimmer(t, []string{"--store", u.String(), "--schema", schema}, "stage", "get", "orders")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Equal(t, "dualwrite\n", r.stdout)
}

func TestCLIStoreProblems(t *testing.T) {
	t.Parallel()
	r := dimmer(t, nil, "--store", "", "stage", "get", "orders")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "no store")

	r = dimmer(t, nil, "--store", dimmertest.PostgresURL(), "--schema", "", "stage", "get", "orders")
	assert.Equal(t, exitUsage, r.code, r.stderr)
	assert.Contains(t, r.stderr, "--schema")
	r = dimmer(t, nil, "--store", dimmertest.RedisURL(), "--prefix", "", "stage", "get", "orders")
	assert.Equal(t, exitUsage, r.code, r.stderr)
	assert.Contains(t, r.stderr, "--prefix")

	r = dimmer(t, nil, "--store", "mysql://x", "stage", "get", "orders")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, "want a postgres:// URL, a Postgres keyword DSN (host=... dbname=...) or a redis:// URL")

	r = dimmer(t, nil, "--store", "postgres://postgres:secret@127.0.0.1:1/postgres?connect_timeout=2", "stage", "get", "orders")
	assert.Equal(t, exitError, r.code)
	assert.Contains(t, r.stderr, "postgres:***@127.0.0.1:1")
	assert.NotContains(t, r.stderr, "secret")
}

func TestCLIHelpOnEveryCommand(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"--help"}, {"stage", "--help"}, {"stage", "get", "--help"}, {"stage", "set", "--help"},
		{"rollout", "--help"}, {"status", "--help"}, {"audit", "--help"},
	} {
		r := dimmer(t, nil, args...)
		assert.Equal(t, exitOK, r.code, "%v", args)
		assert.Contains(t, r.stdout, "Usage:", "%v", args)
	}
	r := dimmer(t, nil, "stage", "set", "--help")
	assert.Contains(t, r.stdout, "Valid stages: off, dualwrite, shadow, live, rampdown, complete")
}

func TestExitCodeMapping(t *testing.T) {
	assert.Equal(t, exitOK, exitCode(nil))
	assert.Equal(t, exitConflict, exitCode(fmt.Errorf("set: %w", &flags.ConflictError{Migration: "orders", Expected: 1, Current: 2})))
	assert.Equal(t, exitRefused, exitCode(&flags.RefusedError{Migration: "orders"}))
	assert.Equal(t, exitUsage, exitCode(usageError{&flags.UnknownStageError{Value: "x"}}))
	assert.Equal(t, exitError, exitCode(fmt.Errorf("connection refused")))
	// The type decides, never the text.
	assert.Equal(t, exitError, exitCode(fmt.Errorf("dial tcp: invalid argument; unknown command; accepts 1 arg(s)")))
	assert.Equal(t, exitError, exitCode(&flags.CorruptFlagError{Migration: "orders", Err: &flags.UnknownStageError{Value: "x"}}),
		"a corrupt stored flag is not bad usage")
}

// An unknown sub-command of a group exits 2 with the group's help, whatever
// its depth; a group named alone prints its help and exits 0.
func TestCLIUnknownSubcommand(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"outbox", "dlq"}, {"outbox", "dead", "purge"}, {"stage", "frob"}, {"schema", "explode", "x"}, {"frobnicate"}} {
		r := dimmer(t, nil, args...)
		assert.Equal(t, exitUsage, r.code, "%v", args)
		assert.Contains(t, r.stderr, "unknown command", "%v", args)
		assert.Contains(t, r.stderr, "Usage:", "%v: the group's help", args)
	}
	r := dimmer(t, nil, "outbox")
	assert.Equal(t, exitOK, r.code)
	assert.Contains(t, r.stdout, "Usage:")
	r = dimmer(t, nil, "outbox", "deda")
	assert.Contains(t, r.stderr, "did you mean dead?")
}

// A corrupt stored flag: status lists the others and marks it, stage get
// says what is wrong (exit 1), a forced set overwrites it and the audit keeps
// the corrupt value.
func TestCLICorruptFlag(t *testing.T) {
	t.Parallel()
	pool, schema := dimmertest.Schema(t)
	pg, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, pg.Install(context.Background()))
	client, prefix := dimmertest.Redis(t)
	type store struct {
		args    []string
		corrupt func(doc string)
	}
	for name, s := range map[string]store{
		"postgres": {[]string{"--store", dimmertest.PostgresURL(), "--schema", schema}, func(doc string) {
			_, err := pool.Exec(context.Background(), `UPDATE `+pgx.Identifier{schema, "stage_flags"}.Sanitize()+
				` SET doc = $2, revision = revision + 1 WHERE migration = $1`, "orders", doc)
			require.NoError(t, err)
		}},
		"redis": {[]string{"--store", dimmertest.RedisURL(), "--prefix", prefix}, func(doc string) {
			require.NoError(t, client.HSet(context.Background(), prefix+"{stage}:flags", "orders", doc).Err())
		}},
	} {
		t.Run(name, func(t *testing.T) {
			for _, m := range []string{"accounts", "orders", "users"} {
				r := dimmer(t, s.args, "stage", "set", m, "dualwrite", "--reason", "start", "--force")
				require.Equal(t, exitOK, r.code, r.stderr)
			}
			bad := `{"migration":"orders","stage":"sideways","revision":1,"epoch":2}`
			s.corrupt(bad)

			r := dimmer(t, s.args, "status")
			assert.Equal(t, exitError, r.code, r.stderr)
			assert.Regexp(t, `accounts\s+dualwrite\s+1`, r.stdout)
			assert.Regexp(t, `users\s+dualwrite\s+1`, r.stdout)
			assert.Regexp(t, `orders\s+CORRUPT\s+\d+\s+-\s+.*unknown stage "sideways"`, r.stdout)
			assert.Contains(t, r.stderr, "1 corrupt flag(s): orders")

			r = dimmer(t, s.args, "stage", "get", "orders")
			assert.Equal(t, exitError, r.code, "a corrupt row is not bad usage")
			assert.Contains(t, r.stderr, "flag orders is corrupt")
			assert.Contains(t, r.stderr, `unknown stage "sideways"`)
			assert.Empty(t, r.stdout)

			r = dimmer(t, s.args, "stage", "set", "orders", "dualwrite", "--reason", "repair")
			assert.Equal(t, exitError, r.code)
			assert.Contains(t, r.stderr, "forced")

			r = dimmer(t, s.args, "stage", "set", "orders", "dualwrite", "--reason", "repair after a bad edit", "--force")
			require.Equal(t, exitOK, r.code, r.stderr)
			r = dimmer(t, s.args, "stage", "get", "orders")
			require.Equal(t, exitOK, r.code, r.stderr)
			assert.Equal(t, "dualwrite\n", r.stdout)
			r = dimmer(t, s.args, "audit", "orders", "--limit", "1")
			require.Equal(t, exitOK, r.code, r.stderr)
			assert.Contains(t, r.stdout, "FORCED")
			assert.Contains(t, r.stdout, "sideways", "the audit keeps the corrupt value")
			assert.Contains(t, r.stdout, "repair after a bad edit")
			r = dimmer(t, s.args, "status")
			assert.Equal(t, exitOK, r.code, r.stderr)
			assert.NotContains(t, r.stdout, "CORRUPT")

			// A reason or actor cannot forge an audit line or drive the
			// terminal: control characters are shown escaped.
			forged := "go\n2026-12-05T17:00:00Z  applied  live -> off  by alice: fake\x1b[31m"
			forged = strings.NewReplacer(`\n`, "\n", `\x1b`, "\x1b").Replace(forged)
			r = dimmer(t, s.args, "--actor", "bob\rmallory", "stage", "set", "orders", "shadow", "--force", "--reason", forged)
			require.Equal(t, exitOK, r.code, r.stderr)
			r = dimmer(t, s.args, "audit", "orders", "--limit", "1")
			require.Equal(t, exitOK, r.code, r.stderr)
			for _, line := range strings.Split(r.stdout, "\n") {
				assert.False(t, strings.HasPrefix(line, "2026-12-05T17:00:00Z"), "a forged line: %s", r.stdout)
			}
			assert.Contains(t, r.stdout, `by bob\rmallory: go\n2026-12-05T17:00:00Z  applied  live -> off  by alice: fake\x1b[31m`+"\n")
			assert.NotContains(t, r.stdout, "\x1b")
		})
	}
}

// A reason longer than the audit log keeps is refused before anything is
// stored (not even a refusal); an invalid name is echoed cut.
func TestCLIBounds(t *testing.T) {
	t.Parallel()
	for name, s := range stores(t) {
		t.Run(name, func(t *testing.T) {
			huge := strings.Repeat("r", 100_000)
			for _, args := range [][]string{
				{"stage", "set", "orders", "live", "--reason", huge},
				{"stage", "set", "orders", "dualwrite", "--force", "--reason", huge},
				{"rollout", "orders", "dualwrite", "5", "--reason", huge},
				{"--actor", huge, "stage", "set", "orders", "dualwrite", "--reason", "x"},
			} {
				r := dimmer(t, s.args, args...)
				assert.Equal(t, exitUsage, r.code, "%.60v", args)
				assert.Contains(t, r.stderr, "bytes; at most 1024 are kept in the audit log: shorten it")
				assert.Less(t, len(r.stderr), 2000, "the reason is not echoed")
			}
			r := dimmer(t, s.args, "audit", "orders")
			require.Equal(t, exitOK, r.code, r.stderr)
			assert.Equal(t, "orders: no audit entries\n", r.stdout, "nothing was stored, not even a refusal")

			r = dimmer(t, s.args, "stage", "set", "orders", "dualwrite", "--force", "--reason", strings.Repeat("é", 512))
			assert.Equal(t, exitOK, r.code, "exactly 1024 bytes is kept: %s", r.stderr)

			for _, args := range [][]string{
				{"stage", "get", strings.Repeat("X", 50_000)},
				{"stage", "set", "orders", strings.Repeat("s", 50_000), "--reason", "x"},
			} {
				r := dimmer(t, s.args, args...)
				assert.Equal(t, exitUsage, r.code)
				assert.Less(t, len(r.stderr), 500, "an invalid name is echoed cut: %.200s", r.stderr)
				assert.Contains(t, r.stderr, "(50000 bytes)")
			}
		})
	}
}

// Finishing a rollout (here: every key to live after a live canary) is
// judged by the canary's own windows, and status shows that check.
func TestCLICanaryGuard(t *testing.T) {
	t.Parallel()
	client, prefix := dimmertest.Redis(t)
	rs, err := redisflags.NewStore(client, redisflags.WithPrefix(prefix))
	require.NoError(t, err)
	args := []string{"--store", dimmertest.RedisURL(), "--prefix", prefix}
	for _, st := range []string{"dualwrite", "shadow"} {
		r := dimmer(t, args, "stage", "set", "orders", st, "--force", "--reason", "walk")
		require.Equal(t, exitOK, r.code, r.stderr)
	}
	r := dimmer(t, args, "rollout", "orders", "live", "5", "--force", "--reason", "canary")
	require.Equal(t, exitOK, r.code, r.stderr)
	st, err := rs.Load(context.Background(), "orders")
	require.NoError(t, err)
	heartbeat := func(health map[string]flags.Health) {
		attrs := map[string]string{}
		for stage, h := range health {
			b, err := json.Marshal(h)
			require.NoError(t, err)
			attrs["dimmer.health/orders/"+stage] = string(b)
		}
		require.NoError(t, rs.Heartbeat(context.Background(), flags.Instance{
			ID: "api-1", Build: "v1", Applied: map[string]int64{"orders": st.Revision}, Attributes: attrs, SeenAt: time.Now(),
		}, time.Minute))
	}
	// Shadow was healthy, the canary's live window is bad.
	heartbeat(map[string]flags.Health{
		"shadow": {Ops: 5000, Compared: 5000},
		"live":   {Ops: 2000, Errors: 400, Compared: 2000},
	})
	r = dimmer(t, args, "status", "orders")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "next step: shadow -> live")
	assert.Contains(t, r.stdout, "[PASS] health")
	assert.Contains(t, r.stdout, "[FAIL] canary-healthy: canary in live: new-side error rate 20.00% over 2000 operations")

	r = dimmer(t, args, "stage", "set", "orders", "live", "--reason", "canary looked fine")
	assert.Equal(t, exitRefused, r.code, r.stderr)
	assert.Contains(t, r.stderr, "canary-healthy: canary in live")

	heartbeat(map[string]flags.Health{
		"shadow": {Ops: 5000, Compared: 5000},
		"live":   {Ops: 2000, Compared: 2000},
	})
	r = dimmer(t, args, "status", "orders")
	assert.Contains(t, r.stdout, "[PASS] canary-healthy")
	r = dimmer(t, args, "stage", "set", "orders", "live", "--reason", "canary healthy")
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "orders: live")
}

// A DIMMER_TIMEOUT that does not parse is refused as a bad --timeout is,
// rather than silently replaced by the default.
func TestCLIBadEnvTimeout(t *testing.T) {
	t.Setenv("DIMMER_TIMEOUT", "30")
	r := dimmer(t, nil, "stage", "get", "orders")
	assert.Equal(t, exitUsage, r.code)
	assert.Contains(t, r.stderr, `DIMMER_TIMEOUT="30": want a duration with a unit`)
	r = dimmer(t, nil, "--help")
	assert.Equal(t, exitOK, r.code, "help still shows")
}

// The backfill's and the schema's inspection commands give up on a
// statement after --timeout, as the stage commands do: a table held by a
// lock costs seconds, not the lock's lifetime.
func TestCLIInspectionBoundedByTimeout(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, schema := dimmertest.Schema(t)
	store := []string{"--store", dimmertest.PostgresURL(), "--schema", schema, "--timeout", "1s"}
	// Status reads: the tables must be there, it does not create them.
	r := dimmer(t, store, "backfill", "--backfill-schema", schema, "status")
	require.Equal(t, exitError, r.code, r.stderr)
	assert.Contains(t, r.stderr, `schema "`+schema+`" holds no backfill tables`)
	bf, err := backfill.New(pool, backfill.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, bf.Install(ctx))
	r = dimmer(t, store, "backfill", "--backfill-schema", schema, "status")
	require.Equal(t, exitOK, r.code, r.stderr)
	r = dimmer(t, store, "schema", "status")
	require.Equal(t, exitOK, r.code, r.stderr)
	for _, tc := range []struct {
		table string
		args  []string
	}{
		{"backfill_jobs", []string{"backfill", "--backfill-schema", schema, "status"}},
		{"schema_plans", []string{"schema", "status"}},
	} {
		tx, err := pool.Begin(ctx)
		require.NoError(t, err)
		_, err = tx.Exec(ctx, `LOCK TABLE `+pgx.Identifier{schema, tc.table}.Sanitize()+` IN ACCESS EXCLUSIVE MODE`)
		require.NoError(t, err, tc.table)
		start := time.Now()
		r := dimmer(t, store, tc.args...)
		took := time.Since(start)
		require.NoError(t, tx.Rollback(ctx))
		assert.Equal(t, exitError, r.code, "%v: %s", tc.args, r.stderr)
		assert.Contains(t, r.stderr, "statement timeout", "%v", tc.args)
		assert.Less(t, took, 5*time.Second, "%v", tc.args)
	}
}
