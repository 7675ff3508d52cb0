package chaos_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/chaos"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/flags"
)

type balance struct {
	ID      string
	Amount  int64
	Version int64
}

// upsertNewer writes b unless the row already holds a newer version: the
// idempotent, order-proof write both sides and the repairer use.
func upsertNewer(ctx context.Context, db *pgxpool.Pool, table string, b balance) error {
	_, err := db.Exec(ctx, `INSERT INTO `+table+` (id, amount, version) VALUES ($1, $2, $3)
		ON CONFLICT (id) DO UPDATE SET amount = excluded.amount, version = excluded.version
		WHERE `+table+`.version < excluded.version`, b.ID, b.Amount, b.Version)
	return err
}

func loadAll(t *testing.T, db *pgxpool.Pool, table string) map[string]balance {
	rows, err := db.Query(context.Background(), `SELECT id, amount, version FROM `+table)
	require.NoError(t, err)
	out := map[string]balance{}
	for rows.Next() {
		var b balance
		require.NoError(t, rows.Scan(&b.ID, &b.Amount, &b.Version))
		out[b.ID] = b
	}
	require.NoError(t, rows.Err())
	return out
}

// Postgres connections of the new side are reset and refused while dual
// writes flow: callers see no error from the non-authoritative side, every
// write the new side missed becomes a repair, and replaying the repairs
// makes the new side equal to the old.
func TestDualWriteSurvivesResetConnections(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	oldDB, schema := dimmertest.Schema(t)
	for _, table := range []string{"balances_old", "balances_new"} {
		_, err := oldDB.Exec(ctx, `CREATE TABLE `+table+` (id text PRIMARY KEY, amount bigint NOT NULL, version bigint NOT NULL)`)
		require.NoError(t, err)
	}

	up, err := chaos.UpstreamOf(dimmertest.PostgresURL())
	require.NoError(t, err)
	link := newLink(t, up)
	u, err := chaos.ThroughLink(dimmertest.PostgresURL(), link)
	require.NoError(t, err)
	cfg, err := pgxpool.ParseConfig(u)
	require.NoError(t, err)
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	cfg.ConnConfig.ConnectTimeout = time.Second
	cfg.MaxConns = 8
	newDB, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	defer newDB.Close()
	require.NoError(t, newDB.Ping(ctx))

	var newFailures atomic.Int64
	writeOld := func(ctx context.Context, b balance) (int64, error) {
		return b.Version, upsertNewer(ctx, oldDB, "balances_old", b)
	}
	writeNew := func(ctx context.Context, b balance) (int64, error) {
		err := upsertNewer(ctx, newDB, "balances_new", b)
		if err != nil {
			newFailures.Add(1)
		}
		return b.Version, err
	}
	var mu sync.Mutex
	var repairs []dualwrite.Repair
	log := dualwrite.RepairLogFunc(func(_ context.Context, r dualwrite.Repair) error {
		mu.Lock()
		repairs = append(repairs, r)
		mu.Unlock()
		return nil
	})
	stage := dualwrite.StageFunc(func(context.Context, string, string) (flags.Stage, error) { return flags.DualWrite, nil })
	w, err := dualwrite.New("balances", stage, writeOld, writeNew, func(b balance) string { return b.ID },
		dualwrite.WithSync(), dualwrite.WithRepairLog(log),
		dualwrite.WithSecondaryTimeout(500*time.Millisecond),
		dualwrite.WithBreakerTrip(3, 100*time.Millisecond))
	require.NoError(t, err)
	defer w.Close()

	// The fault: resets every 40 ms, then the server refuses for a while,
	// then more resets, then healthy.
	faultsDone := make(chan error, 1)
	go func() {
		faultsDone <- func() error {
			for range 5 {
				time.Sleep(40 * time.Millisecond)
				if err := link.Reset(); err != nil {
					return err
				}
			}
			if err := link.Refuse(true); err != nil {
				return err
			}
			time.Sleep(250 * time.Millisecond)
			if err := link.Refuse(false); err != nil {
				return err
			}
			for range 3 {
				time.Sleep(40 * time.Millisecond)
				if err := link.Reset(); err != nil {
					return err
				}
			}
			return nil
		}()
	}()

	var version atomic.Int64
	var callerErrs atomic.Int64
	var wg sync.WaitGroup
	deadline := time.Now().Add(900 * time.Millisecond)
	for g := range 6 {
		wg.Go(func() {
			// Paced, so the writes (and the repairs replayed below) do
			// not grow with the machine's speed: a fast one made 9,000
			// writes in the window, and replaying their repairs one by
			// one outlasted the replay's deadline.
			pace := time.NewTicker(2 * time.Millisecond)
			defer pace.Stop()
			for n := 0; time.Now().Before(deadline); n++ {
				<-pace.C
				v := version.Add(1)
				b := balance{ID: fmt.Sprintf("acct-%d", (g*7+n)%40), Amount: v * 10, Version: v}
				if _, err := w.Write(ctx, b); err != nil {
					callerErrs.Add(1)
					t.Errorf("caller saw an error: %v", err)
				}
			}
		})
	}
	wg.Wait()
	require.NoError(t, <-faultsDone)
	require.NoError(t, link.Heal())
	assert.Zero(t, callerErrs.Load(), "no caller-visible error from the non-authoritative side")

	mu.Lock()
	got := append([]dualwrite.Repair(nil), repairs...)
	mu.Unlock()
	require.NotEmpty(t, got, "the faults caused no missed write: the test proves nothing")
	var failedWrites int64
	repaired := map[string]bool{}
	for _, r := range got {
		assert.Equal(t, flags.New, r.Side)
		switch r.Reason {
		case dualwrite.ReasonError, dualwrite.ReasonTimeout:
			failedWrites++
		case dualwrite.ReasonBreakerOpen:
		default:
			t.Errorf("unexpected repair reason %s", r.Reason)
		}
		repaired[r.Key] = true
	}
	assert.Equal(t, newFailures.Load(), failedWrites, "every failed new-side write is a repair")
	t.Logf("%d writes, %d repairs (%d failed writes, rest refused by the breaker)", version.Load(), len(got), failedWrites)

	oldRows, newRows := loadAll(t, oldDB, "balances_old"), loadAll(t, oldDB, "balances_new")
	for id, o := range oldRows {
		if newRows[id] != o {
			assert.True(t, repaired[id], "key %s differs between sides but has no repair", id)
		}
	}

	// Replay (twice: repairs are idempotent) and compare.
	load := func(ctx context.Context, side flags.Side, key string) (balance, bool, error) {
		db, table := oldDB, "balances_old"
		if side == flags.New {
			db, table = newDB, "balances_new"
		}
		var b balance
		err := db.QueryRow(ctx, `SELECT id, amount, version FROM `+table+` WHERE id = $1`, key).Scan(&b.ID, &b.Amount, &b.Version)
		if errors.Is(err, pgx.ErrNoRows) {
			return b, false, nil
		}
		return b, err == nil, err
	}
	store := func(ctx context.Context, side flags.Side, _ string, b balance) error {
		if side == flags.New {
			return upsertNewer(ctx, newDB, "balances_new", b)
		}
		return upsertNewer(ctx, oldDB, "balances_old", b)
	}
	rep, err := dualwrite.NewRepairer("balances", stage, load, store)
	require.NoError(t, err)
	for range 2 {
		// The pool may still hand out a connection the last reset broke;
		// a failed repair stays to be retried, as in the outbox. A replay
		// takes as long as it takes: only retries are bounded.
		report := rep.RepairAll(ctx, got)
		for retry := 0; len(report.Failed) > 0 && retry < 20; retry++ {
			time.Sleep(50 * time.Millisecond)
			report = rep.RepairAll(ctx, got)
		}
		require.Empty(t, report.Failed, "repairs keep failing")
		assert.Equal(t, len(got), report.Repaired)
	}
	assert.Equal(t, oldRows, loadAll(t, oldDB, "balances_new"), "after replay the new side equals the old")
}
