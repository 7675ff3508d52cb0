package pgflags_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/open-feature/go-sdk/openfeature"
	"github.com/open-feature/go-sdk/openfeature/isolated"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

// newStore installs a store in a schema of its own.
func newStore(t *testing.T) (*pgflags.Store, *pgxpool.Pool, string) {
	t.Helper()
	pool, schema := dimmertest.Schema(t)
	s, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, s.Install(flagstest.Context(t)))
	return s, pool, schema
}

func TestStore(t *testing.T) {
	t.Parallel()
	flagstest.RunStore(t, func(t *testing.T) flags.Store {
		s, _, _ := newStore(t)
		return s
	})
}

func TestHandEdited(t *testing.T) {
	t.Parallel()
	flagstest.RunHandEdited(t, func(t *testing.T) (flags.Store, func(context.Context, string, []byte) error) {
		s, pool, schema := newStore(t)
		return s, func(ctx context.Context, migration string, doc []byte) error {
			_, err := pool.Exec(ctx, `UPDATE `+pgx.Identifier{schema, "stage_flags"}.Sanitize()+` SET doc = $2 WHERE migration = $1`, migration, doc)
			return err
		}
	})
}

// One undecodable audit entry keeps its place in the log and hides none of
// the others.
func TestUnreadableAuditEntry(t *testing.T) {
	t.Parallel()
	s, pool, schema := newStore(t)
	ctx := flagstest.Context(t)
	flagstest.Set(t, s, "orders", flags.DualWrite, nil)
	_, err := pool.Exec(ctx, `INSERT INTO `+pgx.Identifier{schema, "stage_audit"}.Sanitize()+` (migration, at, entry) VALUES ('orders', now(), '{"at": 5}')`)
	require.NoError(t, err)
	flagstest.Set(t, s, "orders", flags.Shadow, nil)
	audit, err := s.Audit(ctx, "orders", 10)
	require.NoError(t, err)
	require.Len(t, audit, 3)
	assert.Equal(t, flags.Unreadable, audit[1].Outcome)
	assert.Contains(t, audit[1].Reason, `the stored entry does not decode`)
	assert.Equal(t, flags.Applied, audit[2].Outcome)
}

func TestFleet(t *testing.T) {
	t.Parallel()
	flagstest.RunFleet(t, func(t *testing.T) flags.FleetStore {
		s, _, _ := newStore(t)
		return s
	})
}

// env is the provider harness over one schema.
func env(t *testing.T) flagstest.ProviderEnv {
	s, pool, schema := newStore(t)
	table := pgx.Identifier{schema, "stage_flags"}.Sanitize()
	return flagstest.ProviderEnv{
		Store: s,
		NewProvider: func(t *testing.T, resync time.Duration) (flagstest.Provider, error) {
			return pgflags.NewProvider(pool, pgflags.WithSchema(schema), pgflags.WithResyncInterval(resync))
		},
		WriteSilently: func(ctx context.Context, st flags.State) error {
			doc, err := st.Encode()
			if err != nil {
				return err
			}
			_, err = pool.Exec(ctx, `INSERT INTO `+table+` (migration, doc, revision) VALUES ($1, $2, $3)
ON CONFLICT (migration) DO UPDATE SET doc = excluded.doc, revision = excluded.revision`, st.Migration, doc, st.Revision)
			return err
		},
		WriteRaw: func(ctx context.Context, migration string, doc []byte) error {
			_, err := pool.Exec(ctx, `INSERT INTO `+table+` (migration, doc, revision) VALUES ($1, $2, 1)
ON CONFLICT (migration) DO UPDATE SET doc = excluded.doc, revision = `+table+`.revision + 1`, migration, doc)
			return err
		},
		KillSubscription: func(ctx context.Context) (int, error) {
			var n int
			err := pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
FROM pg_stat_activity WHERE application_name = $1`, pgflags.ListenerApplicationName(schema)).Scan(&n)
			return n, err
		},
	}
}

func TestProvider(t *testing.T) {
	t.Parallel()
	flagstest.RunProvider(t, env)
}

func TestInstallConcurrentIdempotentVersioned(t *testing.T) {
	t.Parallel()
	pool := dimmertest.Pool(t, dimmertest.Database(t))
	ctx := flagstest.Context(t)
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range errs {
		wg.Go(func() {
			s, err := pgflags.NewStore(pool) // default schema "dimmer"
			if err == nil {
				err = s.Install(ctx)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err, "installer %d", i)
	}
	s, err := pgflags.NewStore(pool)
	require.NoError(t, err)
	require.NoError(t, s.Install(ctx), "a second install is a no-op")
	var versions []int
	rows, err := pool.Query(ctx, `SELECT version FROM dimmer.schema_version`)
	require.NoError(t, err)
	versions, err = pgx.CollectRows(rows, pgx.RowTo[int])
	require.NoError(t, err)
	assert.Equal(t, []int{pgflags.SchemaVersion}, versions)
	flagstest.Set(t, s, "orders", flags.DualWrite, nil)

	// Tables of a newer build are refused, not misused.
	_, err = pool.Exec(ctx, `INSERT INTO dimmer.schema_version (version) VALUES ($1)`, pgflags.SchemaVersion+1)
	require.NoError(t, err)
	err = s.Install(ctx)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "newer than this build")
}

func TestOptionsValidated(t *testing.T) {
	t.Parallel()
	_, err := pgflags.NewStore(nil)
	assert.ErrorContains(t, err, "pool is nil")
	pool, _ := dimmertest.Schema(t)
	_, err = pgflags.NewStore(pool, pgflags.WithSchema(""))
	assert.ErrorContains(t, err, "WithSchema")
	_, err = pgflags.NewStore(pool, pgflags.WithSchema(strings.Repeat("s", 60)))
	assert.ErrorContains(t, err, "WithSchema")
	_, err = pgflags.NewProvider(pool, pgflags.WithResyncInterval(0))
	assert.ErrorContains(t, err, "WithResyncInterval")
	_, err = pgflags.NewProvider(pool, pgflags.WithLogger(nil))
	assert.ErrorContains(t, err, "WithLogger")
	s, err := pgflags.NewStore(pool, pgflags.WithSchema(`odd "schema"`))
	require.NoError(t, err, "any schema name is quoted, not rejected")
	assert.Equal(t, `odd "schema".stage_flags`, s.Channel())
}

// A provider started before the tables exist reports a clear error, serves
// fallbacks, and becomes READY once the store is installed.
func TestProviderBeforeInstall(t *testing.T) {
	t.Parallel()
	pool, schema := dimmertest.Schema(t)
	p, err := pgflags.NewProvider(pool, pgflags.WithSchema(schema), pgflags.WithResyncInterval(200*time.Millisecond))
	require.NoError(t, err)
	api := isolated.NewAPI()
	t.Cleanup(func() { _ = api.Shutdown(context.Background()) })
	ctx := flagstest.Context(t)
	err = api.SetProviderAndWait(ctx, p)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "Install")
	assert.Equal(t, openfeature.ErrorState, p.Status())
	src, err := flags.NewSource(api.NewClient(), flags.Shadow)
	require.NoError(t, err)
	st, err := src.Stage(ctx, "orders", "k")
	assert.Equal(t, flags.Shadow, st)
	assert.ErrorIs(t, err, flags.ErrFlagUnavailable)

	s, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	require.NoError(t, s.Install(ctx))
	flagstest.Set(t, s, "orders", flags.Live, nil)
	require.Eventually(t, func() bool {
		st, err := src.Stage(ctx, "orders", "k")
		return err == nil && st == flags.Live
	}, 5*time.Second, 10*time.Millisecond)
	// The push may land before the next resync, which is what turns READY.
	require.Eventually(t, func() bool { return p.Status() == openfeature.ReadyState }, 5*time.Second, 10*time.Millisecond)
}

const (
	helperSchemaEnv = "DIMMER_PGFLAGS_SPLIT_SCHEMA"
	splitKeys       = 20_000
)

// splitString evaluates splitKeys keys and writes each stage as one digit.
func splitString(t testing.TB, src *flags.Source, migration string) string {
	var b strings.Builder
	for i := range splitKeys {
		st, err := src.Stage(context.Background(), migration, "entity-"+strconv.Itoa(i))
		require.NoError(t, err)
		b.WriteByte('0' + byte(st))
	}
	return b.String()
}

// TestSplitIdenticalAcrossProcesses evaluates the same rollout in this process
// and in a second process (this test binary re-executed) and compares the
// stage of every key.
func TestSplitIdenticalAcrossProcesses(t *testing.T) {
	t.Parallel()
	s, pool, schema := newStore(t)
	flagstest.Set(t, s, "profiles", flags.DualWrite, nil)
	flagstest.Set(t, s, "profiles", flags.Shadow, &flags.Rollout{Stage: flags.Live, Percent: 30})
	p, err := pgflags.NewProvider(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	_, client := flagstest.Client(t, p)
	src, err := flags.NewSource(client, flags.Off)
	require.NoError(t, err)
	mine := splitString(t, src, "profiles")
	live := strings.Count(mine, strconv.Itoa(int(flags.Live)))
	assert.InDelta(t, 30, float64(live)*100/splitKeys, 1.5)

	ctx := flagstest.Context(t)
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHelperSplitProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperSchemaEnv+"="+schema)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "helper process: %s", out)
	var theirs string
	for line := range strings.SplitSeq(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "SPLIT "); ok {
			theirs = v
		}
	}
	require.Len(t, theirs, splitKeys, "helper output: %s", out)
	if mine != theirs {
		for i := range mine {
			if mine[i] != theirs[i] {
				t.Fatalf("key entity-%d: stage %c here, %c in the other process", i, mine[i], theirs[i])
			}
		}
	}
}

// TestHelperSplitProcess is the second process of
// TestSplitIdenticalAcrossProcesses; it does nothing when run directly.
func TestHelperSplitProcess(t *testing.T) {
	schema := os.Getenv(helperSchemaEnv)
	if schema == "" {
		t.Skip("helper process for TestSplitIdenticalAcrossProcesses")
	}
	pool := dimmertest.Pool(t, dimmertest.PostgresURL())
	p, err := pgflags.NewProvider(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	_, client := flagstest.Client(t, p)
	src, err := flags.NewSource(client, flags.Off)
	require.NoError(t, err)
	fmt.Println("SPLIT " + splitString(t, src, "profiles"))
}

func TestSwapAuditEntryMustMatch(t *testing.T) {
	t.Parallel()
	s, _, _ := newStore(t)
	ctx := flagstest.Context(t)
	_, err := s.Swap(ctx, 0, flags.State{Migration: "a", Stage: flags.DualWrite}, flagstest.Entry("b", flags.Off, flags.DualWrite, "x"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), `"b"`)
	st, err := s.Load(ctx, "a")
	require.NoError(t, err)
	assert.Zero(t, st.Revision)
	_, err = s.Load(ctx, "a")
	assert.False(t, errors.Is(err, flags.ErrConflict))
}

// A document too large for a notification payload is announced by name and
// loaded by the listener.
func TestLargeDocumentReachesProvider(t *testing.T) {
	t.Parallel()
	s, pool, schema := newStore(t)
	flagstest.Set(t, s, "orders", flags.DualWrite, nil)
	p, err := pgflags.NewProvider(pool, pgflags.WithSchema(schema), pgflags.WithResyncInterval(time.Hour))
	require.NoError(t, err)
	_, client := flagstest.Client(t, p)
	src, err := flags.NewSource(client, flags.Off)
	require.NoError(t, err)
	// Flip once so the listener is known to be subscribed.
	flagstest.Set(t, s, "orders", flags.Shadow, nil)
	require.Eventually(t, func() bool { st, _ := src.Stage(t.Context(), "orders", "k"); return st == flags.Shadow },
		5*time.Second, 5*time.Millisecond)

	ctx := flagstest.Context(t)
	cur, err := s.Load(ctx, "orders")
	require.NoError(t, err)
	next := cur
	next.Stage = flags.Live
	_, err = s.Swap(ctx, cur.Revision, next, flagstest.Entry("orders", cur.Stage, flags.Live, strings.Repeat("x", 10_000)))
	require.NoError(t, err)
	require.Eventually(t, func() bool { st, _ := src.Stage(t.Context(), "orders", "k"); return st == flags.Live },
		5*time.Second, 5*time.Millisecond, "a large document must still be pushed")
	got, ok := p.Snapshot("orders")
	require.True(t, ok)
	assert.Len(t, got.UpdatedBy, 10_000)
}

// A corrupt flag is reported once per change (a log line and the metrics),
// not once per resync, and its healing is reported too.
func TestCorruptFlagReportedOncePerChange(t *testing.T) {
	t.Parallel()
	s, pool, schema := newStore(t)
	ctx := flagstest.Context(t)
	flagstest.Set(t, s, "orders", flags.Live, nil)
	var logs lockedBuffer
	reader := sdkmetric.NewManualReader()
	p, err := pgflags.NewProvider(pool, pgflags.WithSchema(schema), pgflags.WithResyncInterval(50*time.Millisecond),
		pgflags.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))),
		pgflags.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))))
	require.NoError(t, err)
	flagstest.Client(t, p)
	table := pgx.Identifier{schema, "stage_flags"}.Sanitize()
	writeRaw := func(doc string) {
		_, err := pool.Exec(ctx, `UPDATE `+table+` SET doc = $2, revision = revision + 1 WHERE migration = $1`, "orders", doc)
		require.NoError(t, err)
	}
	resyncs := func(n int) {
		since := p.LastSync()
		require.Eventually(t, func() bool { return p.LastSync().Sub(since) >= time.Duration(n)*50*time.Millisecond },
			10*time.Second, 10*time.Millisecond)
	}
	metrics := func() (corrupt, parseErrors int64) {
		var rm metricdata.ResourceMetrics
		require.NoError(t, reader.Collect(context.Background(), &rm))
		for _, sm := range rm.ScopeMetrics {
			for _, m := range sm.Metrics {
				for _, dp := range m.Data.(metricdata.Sum[int64]).DataPoints {
					switch m.Name {
					case "dimmer.flags.corrupt":
						corrupt += dp.Value
					case "dimmer.flags.parse_errors":
						parseErrors += dp.Value
					}
				}
			}
		}
		return corrupt, parseErrors
	}

	writeRaw(`{"migration":"orders","stage":"sideways","revision":2}`)
	require.Eventually(t, func() bool { return p.Corrupt()["orders"] != nil }, 5*time.Second, 10*time.Millisecond)
	resyncs(4)
	assert.Equal(t, 1, strings.Count(logs.String(), "stored stage flag is corrupt"), logs.String())
	assert.Contains(t, logs.String(), "last good stage live")
	assert.Contains(t, logs.String(), "sideways")
	c, pe := metrics()
	assert.Equal(t, int64(1), c)
	assert.Equal(t, int64(1), pe)

	writeRaw(`{"migration":"orders","stage":"live","rollout":{"stage":"rampdown","percent":300},"revision":3}`)
	require.Eventually(t, func() bool { return strings.Count(logs.String(), "stored stage flag is corrupt") == 2 }, 5*time.Second, 10*time.Millisecond)
	resyncs(3)
	assert.Equal(t, 2, strings.Count(logs.String(), "stored stage flag is corrupt"), "a new problem is a new line")
	c, pe = metrics()
	assert.Equal(t, int64(1), c)
	assert.Equal(t, int64(2), pe)
	st, ok := p.Snapshot("orders")
	require.True(t, ok)
	assert.Equal(t, flags.Live, st.Stage)

	cur, err := s.Load(ctx, "orders")
	var corrupt *flags.CorruptFlagError
	require.ErrorAs(t, err, &corrupt)
	assert.Equal(t, int64(3), corrupt.Revision)
	ctrl, err := flags.NewController(s)
	require.NoError(t, err)
	_, err = ctrl.Set(ctx, flags.Request{Migration: "orders", Stage: flags.Shadow, Actor: "alice", Reason: "repair"})
	require.ErrorIs(t, err, flags.ErrCorruptFlag, "overwriting a corrupt flag takes force")
	cur, err = ctrl.Set(ctx, flags.Request{Migration: "orders", Stage: flags.Shadow, Actor: "alice", Reason: "repair", Force: true})
	require.NoError(t, err)
	assert.Equal(t, int64(4), cur.Revision)
	require.Eventually(t, func() bool { return len(p.Corrupt()) == 0 }, 5*time.Second, 10*time.Millisecond)
	st, _ = p.Snapshot("orders")
	assert.Equal(t, flags.Shadow, st.Stage)
	assert.Contains(t, logs.String(), "stored stage flag healed")
	c, _ = metrics()
	assert.Zero(t, c)
	audit, err := s.Audit(ctx, "orders", 1)
	require.NoError(t, err)
	assert.Contains(t, audit[0].From, `"percent": 300`, "the audit keeps the corrupt value")
	assert.True(t, audit[0].Forced)
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
