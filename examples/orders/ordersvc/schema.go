package ordersvc

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/expandcontract"
)

// Migration is the name of the stage flag and of the schema plan.
const Migration = "orders-normalise"

// The legacy shape: one row per order, its lines embedded as a JSON array
// and the totals copied beside them (what a service grown around one table
// looks like).
const legacyDDL = `
CREATE TABLE IF NOT EXISTS orders_legacy (
	id          uuid PRIMARY KEY,
	customer_id text NOT NULL,
	status      text NOT NULL,
	lines       jsonb NOT NULL DEFAULT '[]',
	line_count  int NOT NULL DEFAULT 0,
	total_cents bigint NOT NULL DEFAULT 0,
	version     bigint NOT NULL,
	created_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_legacy_customer_idx ON orders_legacy (customer_id, created_at, id);`

// Plan is the expand/contract plan of the normalisation: expand adds the
// normalised tables (and a view exposing the legacy lines row by row, the
// source of the lines backfill), contract drops the legacy table.
//
// The view shows only the lines of orders already in the new orders table:
// an order created during dualwrite is in old a moment before it is in new
// (or, if its new-side write failed, until its repair runs), and copying
// its lines then would break order_lines' foreign key. Its lines reach new
// with its own write or repair, which writes them whole; the orders job's
// verification catches an order missing from new.
func Plan() expandcontract.Plan {
	return expandcontract.Plan{
		Name:        Migration,
		Description: "orders_legacy (lines embedded as JSON) -> orders + order_lines",
		Migration:   Migration,
		Backfill:    true,
		Expand: []expandcontract.Step{
			{Name: "create-orders", SQL: `CREATE TABLE orders (
	id          uuid PRIMARY KEY,
	customer_id text NOT NULL,
	status      text NOT NULL,
	version     bigint NOT NULL,
	created_at  timestamptz NOT NULL
);
CREATE INDEX orders_customer_idx ON orders (customer_id, created_at, id)`},
			{Name: "create-order-lines", SQL: `CREATE TABLE order_lines (
	order_id    uuid NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
	line_no     int NOT NULL,
	sku         text NOT NULL,
	qty         int NOT NULL,
	price_cents bigint NOT NULL,
	version     bigint NOT NULL,
	PRIMARY KEY (order_id, line_no)
)`},
			{Name: "create-legacy-lines-view", SQL: `CREATE VIEW orders_legacy_lines AS
SELECT o.id AS order_id, l.n::int AS line_no, l.e->>'sku' AS sku, (l.e->>'qty')::int AS qty,
       (l.e->>'price_cents')::bigint AS price_cents, o.version
FROM orders_legacy o CROSS JOIN LATERAL jsonb_array_elements(o.lines) WITH ORDINALITY AS l(e, n)
WHERE EXISTS (SELECT 1 FROM orders n WHERE n.id = o.id)`},
		},
		Contract: []expandcontract.Step{
			{Name: "drop-legacy", SQL: `DROP VIEW orders_legacy_lines; DROP TABLE orders_legacy`},
		},
		Rollback: []expandcontract.Step{
			{Name: "drop-normalised", SQL: `DROP VIEW IF EXISTS orders_legacy_lines; DROP TABLE IF EXISTS order_lines; DROP TABLE IF EXISTS orders`},
		},
	}
}

// Needs is the range of plan stages this build runs with: it writes the
// normalised tables, so it needs them expanded; it keeps running once the
// legacy table is gone because by then the stage is complete and nothing
// routes to old.
func Needs() expandcontract.Range {
	return expandcontract.Range{Plan: Migration, Min: expandcontract.Expanded, Max: expandcontract.Contracted}
}

// InstallLegacy creates the legacy table (the state before the migration).
func InstallLegacy(ctx context.Context, pool *pgxpool.Pool) error {
	if _, err := pool.Exec(ctx, legacyDDL); err != nil {
		return fmt.Errorf("ordersvc: create orders_legacy: %w", err)
	}
	return nil
}

// Seed inserts n legacy orders over customers customers, with 1-4 lines each:
// the history a backfill has to move.
func Seed(ctx context.Context, pool *pgxpool.Pool, n, customers int) error {
	_, err := pool.Exec(ctx, `
INSERT INTO orders_legacy (id, customer_id, status, lines, line_count, total_cents, version, created_at)
SELECT id, customer_id, 'open', lines, jsonb_array_length(lines),
       (SELECT coalesce(sum((e->>'qty')::bigint * (e->>'price_cents')::bigint), 0) FROM jsonb_array_elements(lines) e),
       1 + jsonb_array_length(lines), created_at
FROM (
	SELECT gen_random_uuid() AS id, 'cust-' || (g % $2) AS customer_id,
	       date_trunc('milliseconds', now() - make_interval(secs => $1 - g)) AS created_at,
	       (SELECT jsonb_agg(jsonb_build_object('sku', 'sku-' || ((g * 7 + k) % 97), 'qty', 1 + (g + k) % 5, 'price_cents', 100 + (g * 13 + k) % 900))
	          FROM generate_series(1, 1 + g % 4) k) AS lines
	FROM generate_series(1, $1) g
) s`, n, customers)
	if err != nil {
		return fmt.Errorf("ordersvc: seed legacy orders: %w", err)
	}
	_, err = pool.Exec(ctx, `ANALYZE orders_legacy`)
	return err
}

// BackfillJobs are the two jobs moving the history: orders first (the lines
// reference them), then the lines, read row by row through the view. Both
// copy inside the server and never overwrite a newer dual write (version).
func BackfillJobs(schema string, progress func(backfill.Progress)) []backfill.Job {
	cfg := backfill.Config{Workers: 1, Ranges: 8, InitialChunk: 500, TargetChunkTime: 100e6, Progress: progress}
	return []backfill.Job{
		{
			Name: Migration + "-orders", Migration: Migration,
			Spec: backfill.Spec{
				Source:        backfill.Table{Schema: schema, Name: "orders_legacy"},
				Target:        backfill.Table{Schema: schema, Name: "orders"},
				Key:           []string{"id"},
				Columns:       []string{"id", "customer_id", "status", "version", "created_at"},
				VersionColumn: "version",
			},
			Config: cfg,
		},
		{
			Name: Migration + "-lines", Migration: Migration,
			Spec: backfill.Spec{
				Source:        backfill.Table{Schema: schema, Name: "orders_legacy_lines"},
				Target:        backfill.Table{Schema: schema, Name: "order_lines"},
				Key:           []string{"order_id", "line_no"},
				Columns:       []string{"order_id", "line_no", "sku", "qty", "price_cents", "version"},
				VersionColumn: "version",
			},
			Config: cfg,
		},
	}
}
