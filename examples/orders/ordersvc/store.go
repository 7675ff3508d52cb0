package ordersvc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/outbox"
)

// Line is one line of an order.
type Line struct {
	SKU        string `json:"sku"`
	Qty        int    `json:"qty"`
	PriceCents int64  `json:"price_cents"`
}

// Order is an order as the API shows it, whichever side it was read from.
// Version grows by one with every change; both sides store it, and every
// write to either side is guarded by it.
type Order struct {
	ID         string    `json:"id"`
	CustomerID string    `json:"customer_id"`
	Status     string    `json:"status"`
	Lines      []Line    `json:"lines"`
	TotalCents int64     `json:"total_cents"`
	Version    int64     `json:"version"`
	CreatedAt  time.Time `json:"created_at"`
}

func (o Order) total() int64 {
	var t int64
	for _, l := range o.Lines {
		t += int64(l.Qty) * l.PriceCents
	}
	return t
}

// EventsTopic is where order events go (Kafka).
const EventsTopic = "orders.events"

// Event is what an order change publishes.
type Event struct {
	Type       string `json:"type"` // order.created, order.line_added
	OrderID    string `json:"order_id"`
	CustomerID string `json:"customer_id"`
	Version    int64  `json:"version"`
	Lines      int    `json:"lines"`
	TotalCents int64  `json:"total_cents"`
}

var eventNS = uuid.MustParse("6f1c2a8e-5d0b-4c53-9a51-3f5d2d7c9b10")

// EventID is the message ID of an order's change to version: the same on
// both sides, so the copy each side's transaction enqueues while both are
// written is one message to a consumer de-duplicating on it (package inbox).
func EventID(orderID string, version int64) uuid.UUID {
	return uuid.NewSHA1(eventNS, []byte(orderID+"@"+strconv.FormatInt(version, 10)))
}

// SideError is a failure of one side's store, so the API can say which side
// failed a request (the authoritative one, always: the other never fails a
// caller).
type SideError struct {
	Side flags.Side
	Err  error
}

func (e *SideError) Error() string { return e.Side.String() + " store: " + e.Err.Error() }
func (e *SideError) Unwrap() error { return e.Err }

func sideErr(s flags.Side, err error) error {
	var se *SideError
	if err == nil || errors.As(err, &se) {
		return err
	}
	return &SideError{Side: s, Err: err}
}

// stores holds the SQL of both sides. Both live in the service's database;
// newDB may reach it by another road (a chaos link in the demo).
type stores struct {
	oldDB, newDB *pgxpool.Pool
	events       *outbox.Outbox
}

// write upserts o on side unless that side already holds this version or a
// newer one (orNewer false) — or a newer one only (orNewer true, the
// repairer: the authoritative state replaces an equal version). It returns
// whether the row was written. With emit, the order's event is enqueued in
// the same transaction.
func (s *stores) write(ctx context.Context, side flags.Side, o Order, emit, orNewer bool) (bool, error) {
	db := s.oldDB
	if side == flags.New {
		db = s.newDB
	}
	cmp := "<"
	if orNewer {
		cmp = "<="
	}
	var applied bool
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		var err error
		if side == flags.Old {
			lines, _ := json.Marshal(o.Lines)
			err = tx.QueryRow(ctx, `INSERT INTO orders_legacy (id, customer_id, status, lines, line_count, total_cents, version, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (id) DO UPDATE SET customer_id = excluded.customer_id, status = excluded.status, lines = excluded.lines,
	line_count = excluded.line_count, total_cents = excluded.total_cents, version = excluded.version, created_at = excluded.created_at
WHERE orders_legacy.version `+cmp+` excluded.version
RETURNING true`, o.ID, o.CustomerID, o.Status, lines, len(o.Lines), o.total(), o.Version, o.CreatedAt).Scan(&applied)
		} else {
			err = tx.QueryRow(ctx, `INSERT INTO orders (id, customer_id, status, version, created_at) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (id) DO UPDATE SET customer_id = excluded.customer_id, status = excluded.status, version = excluded.version, created_at = excluded.created_at
WHERE orders.version `+cmp+` excluded.version
RETURNING true`, o.ID, o.CustomerID, o.Status, o.Version, o.CreatedAt).Scan(&applied)
			if err == nil {
				err = writeLines(ctx, tx, o)
			}
		}
		if errors.Is(err, pgx.ErrNoRows) {
			applied = false
			return nil
		}
		if err != nil || !emit || s.events == nil {
			return err
		}
		return s.enqueue(ctx, tx, o)
	})
	return applied, sideErr(side, err)
}

// writeLines replaces the order's lines (they are written whole with the
// order's version, as the backfill copies them).
func writeLines(ctx context.Context, tx pgx.Tx, o Order) error {
	n := make([]int32, len(o.Lines))
	sku := make([]string, len(o.Lines))
	qty := make([]int32, len(o.Lines))
	price := make([]int64, len(o.Lines))
	for i, l := range o.Lines {
		n[i], sku[i], qty[i], price[i] = int32(i+1), l.SKU, int32(l.Qty), l.PriceCents
	}
	if _, err := tx.Exec(ctx, `DELETE FROM order_lines WHERE order_id = $1 AND line_no > $2`, o.ID, len(o.Lines)); err != nil {
		return err
	}
	_, err := tx.Exec(ctx, `INSERT INTO order_lines (order_id, line_no, sku, qty, price_cents, version)
SELECT $1, u.n, u.sku, u.qty, u.price, $6 FROM unnest($2::int[], $3::text[], $4::int[], $5::bigint[]) AS u(n, sku, qty, price)
ON CONFLICT (order_id, line_no) DO UPDATE SET sku = excluded.sku, qty = excluded.qty, price_cents = excluded.price_cents, version = excluded.version
WHERE order_lines.version <= excluded.version`, o.ID, n, sku, qty, price, o.Version)
	return err
}

func (s *stores) enqueue(ctx context.Context, tx pgx.Tx, o Order) error {
	ev := Event{Type: "order.line_added", OrderID: o.ID, CustomerID: o.CustomerID, Version: o.Version, Lines: len(o.Lines), TotalCents: o.total()}
	if o.Version == 1 {
		ev.Type = "order.created"
	}
	payload, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	_, err = s.events.Enqueue(ctx, tx, outbox.Message{ID: EventID(o.ID, o.Version), Topic: EventsTopic, Key: o.ID, Payload: payload,
		Headers: map[string]string{"type": ev.Type}})
	return err
}

const newSelect = `SELECT o.id::text, o.customer_id, o.status, o.version, o.created_at,
	coalesce((SELECT jsonb_agg(jsonb_build_object('sku', l.sku, 'qty', l.qty, 'price_cents', l.price_cents) ORDER BY l.line_no)
	          FROM order_lines l WHERE l.order_id = o.id), '[]')
FROM orders o`

const oldSelect = `SELECT id::text, customer_id, status, version, created_at, lines FROM orders_legacy`

func (s *stores) query(side flags.Side) (*pgxpool.Pool, string) {
	if side == flags.New {
		return s.newDB, newSelect
	}
	return s.oldDB, oldSelect
}

// get reads one order from side; a missing order is the zero Order (found
// false), which a comparison then sees as different from a present one.
func (s *stores) get(ctx context.Context, side flags.Side, id string) (Order, bool, error) {
	if _, err := uuid.Parse(id); err != nil {
		return Order{}, false, nil
	}
	db, q := s.query(side)
	alias := ""
	if side == flags.New {
		alias = "o."
	}
	rows, err := db.Query(ctx, q+` WHERE `+alias+`id = $1`, id)
	if err != nil {
		return Order{}, false, sideErr(side, err)
	}
	list, err := collect(rows)
	if err != nil || len(list) == 0 {
		return Order{}, false, sideErr(side, err)
	}
	return list[0], true, nil
}

// byCustomer lists a customer's orders (oldest first, at most 100).
func (s *stores) byCustomer(ctx context.Context, side flags.Side, customer string) ([]Order, error) {
	db, q := s.query(side)
	alias := ""
	if side == flags.New {
		alias = "o."
	}
	rows, err := db.Query(ctx, q+` WHERE `+alias+`customer_id = $1 ORDER BY `+alias+`created_at, `+alias+`id LIMIT 100`, customer)
	if err != nil {
		return nil, sideErr(side, err)
	}
	list, err := collect(rows)
	return list, sideErr(side, err)
}

func collect(rows pgx.Rows) ([]Order, error) {
	var out []Order
	for rows.Next() {
		var o Order
		var lines []byte
		if err := rows.Scan(&o.ID, &o.CustomerID, &o.Status, &o.Version, &o.CreatedAt, &lines); err != nil {
			rows.Close()
			return nil, err
		}
		if err := json.Unmarshal(lines, &o.Lines); err != nil {
			rows.Close()
			return nil, fmt.Errorf("order %s: lines: %w", o.ID, err)
		}
		o.CreatedAt = o.CreatedAt.UTC()
		o.TotalCents = o.total()
		out = append(out, o)
	}
	return out, rows.Err()
}
