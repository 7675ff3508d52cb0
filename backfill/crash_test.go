package backfill_test

import (
	"os"
	osexec "os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

const crashSchemaEnv = "DIMMER_BACKFILL_CRASH_SCHEMA"

func crashJob() backfill.Job {
	j := ordersJob("crash")
	j.Config.InitialChunk, j.Config.MinChunk, j.Config.MaxChunk = 25, 25, 25
	j.Config.Workers, j.Config.Ranges = 2, 4
	j.Config.LeaseTTL = time.Second
	return j
}

// TestCrashChild is the process killed by TestKillDashNineResumesExactlyOnce.
func TestCrashChild(t *testing.T) {
	schema := os.Getenv(crashSchemaEnv)
	if schema == "" {
		t.Skip("run by TestKillDashNineResumesExactlyOnce")
	}
	cfg, err := pgxpool.ParseConfig(dimmertest.PostgresURL())
	require.NoError(t, err)
	cfg.ConnConfig.RuntimeParams["search_path"] = schema
	pool, err := pgxpool.NewWithConfig(tctx(t), cfg)
	require.NoError(t, err)
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema))
	require.NoError(t, err)
	bf, err := backfill.New(pool, backfill.WithSchema(schema), backfill.WithFlagStore(store), backfill.WithWorkerID("child"))
	require.NoError(t, err)
	j := crashJob()
	j.Config.RowsPerSecond = 2000 // slow enough to be killed mid-run
	_, err = bf.Run(tctx(t), j)
	require.NoError(t, err)
	t.Fatal("the child should have been killed before finishing")
}

func TestKillDashNineResumesExactlyOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.orders(t, "id bigint", "id", `(id, amount, note) SELECT g, g, 'n' || g FROM generate_series(-1000, 1999) g`)
	// Every row the sink applies is logged: a chunk applied twice would log
	// its keys twice (the upsert rewrites rows of an equal version).
	exec(t, e.pool, `CREATE TABLE apply_log (id bigint NOT NULL);
CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO apply_log VALUES (NEW.id); RETURN NULL; END $$;
CREATE TRIGGER log_apply AFTER INSERT OR UPDATE ON new_orders FOR EACH ROW EXECUTE FUNCTION log_apply();`)

	for kill := range 2 {
		cmd := osexec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), crashSchemaEnv+"="+e.schema)
		require.NoError(t, cmd.Start())
		// Kill it once it has committed some chunks, at a random moment
		// relative to its transactions.
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			var done int64
			err := e.pool.QueryRow(tctx(t), `SELECT coalesce(sum(rows_done), 0)::int8 FROM backfill_ranges`).Scan(&done)
			if err == nil && done >= int64(300*(kill+1)) {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		err := cmd.Wait()
		require.Error(t, err, "the child was killed, it did not finish")
		assert.Less(t, count(t, e.pool, `SELECT count(*) FROM new_orders`), int64(3000), "killed mid-run")
	}

	// The dead child's leases expire after a second; this process takes the
	// ranges over and finishes from the committed cursors.
	j := crashJob()
	res, err := e.bf.Run(tctx(t), j)
	require.NoError(t, err)
	assert.Less(t, res.Rows, int64(3000), "resumed, not restarted")
	assert.Zero(t, e.diff(t), "new equals old")
	assert.Equal(t, int64(3000), count(t, e.pool, `SELECT count(*) FROM apply_log`), "every row applied exactly once")
	assert.Zero(t, count(t, e.pool, `SELECT count(*) FROM (SELECT id FROM apply_log GROUP BY id HAVING count(*) > 1) d`), "no chunk applied twice")
	assert.Equal(t, int64(3000), count(t, e.pool, `SELECT sum(rows_done)::int8 FROM backfill_ranges`))
}
