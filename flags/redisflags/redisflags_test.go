package redisflags_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/open-feature/go-sdk/openfeature"
	"github.com/open-feature/go-sdk/openfeature/isolated"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
	"github.com/dimmer-dev/dimmer/flags/redisflags"
)

// newStore returns a store under a key prefix of its own.
func newStore(t testing.TB) (*redisflags.Store, *redis.Client, string) {
	t.Helper()
	client, prefix := dimmertest.Redis(t)
	s, err := redisflags.NewStore(client, redisflags.WithPrefix(prefix))
	require.NoError(t, err)
	return s, client, prefix
}

// namedClient is a client of its own whose connections carry name, so a test
// can find them in CLIENT LIST.
func namedClient(t testing.TB, name string) *redis.Client {
	opts, err := redis.ParseURL(dimmertest.RedisURL())
	require.NoError(t, err)
	opts.ClientName = name
	c := redis.NewClient(opts)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// killSubscribers kills the pub/sub connections named name.
func killSubscribers(ctx context.Context, admin *redis.Client, name string) (int, error) {
	list, err := admin.ClientList(ctx).Result()
	if err != nil {
		return 0, err
	}
	n := 0
	for line := range strings.SplitSeq(list, "\n") {
		f := map[string]string{}
		for kv := range strings.FieldsSeq(line) {
			k, v, _ := strings.Cut(kv, "=")
			f[k] = v
		}
		if f["name"] != name || (f["sub"] == "0" || f["sub"] == "") {
			continue
		}
		if err := admin.ClientKillByFilter(ctx, "ID", f["id"]).Err(); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
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
		s, client, prefix := newStore(t)
		return s, func(ctx context.Context, migration string, doc []byte) error {
			return client.HSet(ctx, prefix+"{stage}:flags", migration, doc).Err()
		}
	})
}

// One undecodable audit entry keeps its place in the log and hides none of
// the others.
func TestUnreadableAuditEntry(t *testing.T) {
	t.Parallel()
	s, client, prefix := newStore(t)
	ctx := flagstest.Context(t)
	flagstest.Set(t, s, "orders", flags.DualWrite, nil)
	require.NoError(t, client.LPush(ctx, prefix+"{stage}:audit:orders", "{bad json").Err())
	flagstest.Set(t, s, "orders", flags.Shadow, nil)
	audit, err := s.Audit(ctx, "orders", 10)
	require.NoError(t, err)
	require.Len(t, audit, 3)
	assert.Equal(t, flags.Applied, audit[0].Outcome)
	assert.Equal(t, flags.Unreadable, audit[1].Outcome)
	assert.Contains(t, audit[1].Reason, "the stored entry does not decode")
	assert.Contains(t, audit[1].Reason, "{bad json")
	assert.Equal(t, flags.Applied, audit[2].Outcome)
}

func TestFleet(t *testing.T) {
	t.Parallel()
	flagstest.RunFleet(t, func(t *testing.T) flags.FleetStore {
		s, _, _ := newStore(t)
		return s
	})
}

func env(t *testing.T) flagstest.ProviderEnv {
	s, admin, prefix := newStore(t)
	name := dimmertest.Name("dimmer-flags-")
	client := namedClient(t, name)
	flagsKey := prefix + "{stage}:flags"
	return flagstest.ProviderEnv{
		Store: s,
		NewProvider: func(t *testing.T, resync time.Duration) (flagstest.Provider, error) {
			return redisflags.NewProvider(client, redisflags.WithPrefix(prefix), redisflags.WithResyncInterval(resync))
		},
		WriteSilently: func(ctx context.Context, st flags.State) error {
			doc, err := st.Encode()
			if err != nil {
				return err
			}
			_, err = admin.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.HSet(ctx, flagsKey, st.Migration, doc)
				p.HSet(ctx, prefix+"{stage}:revisions", st.Migration, st.Revision)
				return nil
			})
			return err
		},
		WriteRaw: func(ctx context.Context, migration string, doc []byte) error {
			return admin.HSet(ctx, flagsKey, migration, doc).Err()
		},
		KillSubscription: func(ctx context.Context) (int, error) { return killSubscribers(ctx, admin, name) },
	}
}

func TestProvider(t *testing.T) {
	t.Parallel()
	flagstest.RunProvider(t, env)
}

func TestOptionsValidated(t *testing.T) {
	t.Parallel()
	_, err := redisflags.NewStore(nil)
	assert.ErrorContains(t, err, "client is nil")
	client, _ := dimmertest.Redis(t)
	_, err = redisflags.NewStore(client, redisflags.WithPrefix(""))
	assert.ErrorContains(t, err, "WithPrefix")
	_, err = redisflags.NewStore(client, redisflags.WithPrefix("a{b}"))
	assert.ErrorContains(t, err, "WithPrefix")
	_, err = redisflags.NewProvider(client, redisflags.WithResyncInterval(-time.Second))
	assert.ErrorContains(t, err, "WithResyncInterval")
	_, err = redisflags.NewProvider(nil)
	assert.ErrorContains(t, err, "client is nil")
	s, err := redisflags.NewStore(client)
	require.NoError(t, err)
	assert.Equal(t, "dimmer:stage_flags", s.Channel())
}

// TestStoreUnreachable: a provider whose Redis does not answer reports an
// error, serves fallbacks, and shuts down cleanly.
func TestStoreUnreachable(t *testing.T) {
	t.Parallel()
	client := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialTimeout: 200 * time.Millisecond})
	t.Cleanup(func() { _ = client.Close() })
	p, err := redisflags.NewProvider(client, redisflags.WithResyncInterval(100*time.Millisecond))
	require.NoError(t, err)
	api := isolated.NewAPI()
	ctx := flagstest.Context(t)
	require.Error(t, api.SetProviderAndWait(ctx, p))
	assert.Equal(t, openfeature.ErrorState, p.Status())
	src, err := flags.NewSource(api.NewClient(), flags.Shadow)
	require.NoError(t, err)
	st, err := src.Stage(ctx, "orders", "k")
	assert.Equal(t, flags.Shadow, st)
	assert.ErrorIs(t, err, flags.ErrFlagUnavailable)
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	require.NoError(t, api.Shutdown(sctx))
}

const (
	helperPrefixEnv = "DIMMER_REDISFLAGS_SPLIT_PREFIX"
	splitKeys       = 20_000
)

func splitString(t testing.TB, src *flags.Source, migration string) string {
	var b strings.Builder
	for i := range splitKeys {
		st, err := src.Stage(context.Background(), migration, "entity-"+strconv.Itoa(i))
		require.NoError(t, err)
		b.WriteByte('0' + byte(st))
	}
	return b.String()
}

// TestSplitIdenticalAcrossProcesses evaluates the same rollout here and in a
// second process (this test binary re-executed) and compares every key.
func TestSplitIdenticalAcrossProcesses(t *testing.T) {
	t.Parallel()
	s, client, prefix := newStore(t)
	flagstest.Set(t, s, "profiles", flags.Shadow, &flags.Rollout{Stage: flags.Live, Percent: 30})
	p, err := redisflags.NewProvider(client, redisflags.WithPrefix(prefix))
	require.NoError(t, err)
	_, of := flagstest.Client(t, p)
	src, err := flags.NewSource(of, flags.Off)
	require.NoError(t, err)
	mine := splitString(t, src, "profiles")
	live := strings.Count(mine, strconv.Itoa(int(flags.Live)))
	assert.InDelta(t, 30, float64(live)*100/splitKeys, 1.5)

	cmd := exec.CommandContext(flagstest.Context(t), os.Args[0], "-test.run=^TestHelperSplitProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperPrefixEnv+"="+prefix)
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
	prefix := os.Getenv(helperPrefixEnv)
	if prefix == "" {
		t.Skip("helper process for TestSplitIdenticalAcrossProcesses")
	}
	opts, err := redis.ParseURL(dimmertest.RedisURL())
	require.NoError(t, err)
	client := redis.NewClient(opts)
	defer client.Close()
	p, err := redisflags.NewProvider(client, redisflags.WithPrefix(prefix))
	require.NoError(t, err)
	_, of := flagstest.Client(t, p)
	src, err := flags.NewSource(of, flags.Off)
	require.NoError(t, err)
	fmt.Println("SPLIT " + splitString(t, src, "profiles"))
}
