package cdc

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// DefaultSchema holds the slot registry (<schema>.cdc_slots).
const DefaultSchema = "dimmer"

// SlotSpec describes a replication slot and its publication as dimmer
// creates them: the slot decodes with the built-in pgoutput plugin, the
// publication names the tables whose changes the slot streams (none for a
// relay that reads only outbox messages), and a row in the registry
// (<Schema>.cdc_slots) records that dimmer owns both, so that a slot or
// publication of the same name made by someone else is never adopted or
// dropped.
type SlotSpec struct {
	// Slot is the replication slot's name: 1..63 of [a-z0-9_]. Required.
	Slot string
	// Publication is the publication's name; default the slot's name.
	Publication string
	// Tables are published (schema-qualified or on the search path). Each
	// must have a primary key or another usable REPLICA IDENTITY.
	Tables []string
	// Purpose is recorded in the registry ("relay", "sync", ...).
	Purpose string
	// Schema holds the registry; default "dimmer".
	Schema string
}

var nameRE = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

func (s *SlotSpec) withDefaults() {
	if s.Publication == "" {
		s.Publication = s.Slot
	}
	if s.Schema == "" {
		s.Schema = DefaultSchema
	}
}

// Validate reports the first field out of range.
func (s SlotSpec) Validate() error {
	switch {
	case !nameRE.MatchString(s.Slot):
		return badConfig("Slot", "must be 1..63 characters of [a-z0-9_], got %q", s.Slot)
	case !nameRE.MatchString(s.Publication):
		return badConfig("Publication", "must be 1..63 characters of [a-z0-9_], got %q", s.Publication)
	case s.Schema == "" || len(s.Schema) > 63 || strings.ContainsRune(s.Schema, 0):
		return badConfig("Schema", "must be 1..63 bytes, got %q", s.Schema)
	}
	for _, t := range s.Tables {
		if t == "" || strings.ContainsRune(t, 0) {
			return badConfig("Tables", "has an empty or NUL-containing name %q", t)
		}
	}
	return nil
}

func registry(schema string) string { return pgx.Identifier{schema, "cdc_slots"}.Sanitize() }

// CheckLogical returns an error wrapping [ErrWalLevel] unless the server
// decodes logically (wal_level = logical).
func CheckLogical(ctx context.Context, db Querier) error {
	var level string
	if err := db.QueryRow(ctx, `SHOW wal_level`).Scan(&level); err != nil {
		return fmt.Errorf("cdc: read wal_level: %w", err)
	}
	if level != "logical" {
		return fmt.Errorf("%w: the server has wal_level = %s (set wal_level = logical and restart it)", ErrWalLevel, level)
	}
	return nil
}

// Querier runs queries: *pgxpool.Pool, *pgx.Conn and pgx.Tx all are.
type Querier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// checkTable resolves name and refuses a table that does not exist or
// cannot key its updates and deletes. It returns the qualified name.
func checkTable(ctx context.Context, db Querier, name string) (string, error) {
	var qualified *string
	var ident string
	var hasPK, hasIndex bool
	err := db.QueryRow(ctx, `SELECT format('%I.%I', n.nspname, c.relname), c.relreplident::text,
	EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
	EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')`, name).Scan(&qualified, &ident, &hasPK, &hasIndex)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", fmt.Errorf("%w: %s", ErrNoTable, name)
	}
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && (pgErr.Code == "42P01" || pgErr.Code == "3F000") {
			return "", fmt.Errorf("%w: %s", ErrNoTable, name)
		}
		return "", fmt.Errorf("cdc: look up table %s: %w", name, err)
	}
	switch {
	case ident == "n":
		return "", fmt.Errorf("%w: %s has REPLICA IDENTITY NOTHING (give it a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL or USING INDEX)", ErrNoReplicaIdentity, *qualified)
	case ident == "d" && !hasPK:
		return "", fmt.Errorf("%w: %s has no primary key (add one, or ALTER TABLE ... REPLICA IDENTITY FULL or USING INDEX)", ErrNoReplicaIdentity, *qualified)
	case ident == "i" && !hasIndex:
		return "", fmt.Errorf("%w: %s names a replica identity index that no longer exists", ErrNoReplicaIdentity, *qualified)
	}
	return *qualified, nil
}

// CreateSlot creates the publication and the logical replication slot of
// spec and registers them. It is idempotent: a slot and publication
// registered with the same names are left as they are. It refuses, naming
// what is wrong, a server without wal_level = logical ([ErrWalLevel]), a
// table that does not exist or cannot be keyed ([ErrNoTable],
// [ErrNoReplicaIdentity]), and a slot or publication of the same name that
// dimmer did not create ([ErrSlotTaken], [ErrPublicationTaken]). On any
// error nothing is left half-created.
//
// The slot starts at the current end of the log: changes committed before
// CreateSlot returns are not streamed.
func CreateSlot(ctx context.Context, pool *pgxpool.Pool, spec SlotSpec) error {
	spec.withDefaults()
	if err := spec.Validate(); err != nil {
		return err
	}
	if err := CheckLogical(ctx, pool); err != nil {
		return err
	}
	tables := make([]string, len(spec.Tables))
	for i, t := range spec.Tables {
		q, err := checkTable(ctx, pool, t)
		if err != nil {
			return err
		}
		tables[i] = q
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("cdc: create slot %s: %w", spec.Slot, err)
	}
	defer conn.Release()
	// Concurrent creators of the same slot serialise here.
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock(hashtext('dimmer.cdc.slot'), hashtext($1))`, spec.Slot); err != nil {
		return fmt.Errorf("cdc: create slot %s: %w", spec.Slot, err)
	}
	defer conn.Exec(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock(hashtext('dimmer.cdc.slot'), hashtext($1))`, spec.Slot)

	reg := registry(spec.Schema)
	if _, err := conn.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+pgx.Identifier{spec.Schema}.Sanitize()+`;
CREATE TABLE IF NOT EXISTS `+reg+` (
	slot        text PRIMARY KEY,
	publication text NOT NULL,
	purpose     text NOT NULL DEFAULT '',
	tables      text[] NOT NULL DEFAULT '{}',
	created_at  timestamptz NOT NULL DEFAULT now(),
	-- the reader that may publish, and until when (see Relay: fencing)
	owner       text,
	fence_until timestamptz NOT NULL DEFAULT '-infinity'
)`); err != nil {
		return fmt.Errorf("cdc: create slot registry %s: %w", reg, err)
	}
	var regPub *string
	if err := conn.QueryRow(ctx, `SELECT publication FROM `+reg+` WHERE slot = $1`, spec.Slot).Scan(&regPub); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("cdc: read %s: %w", reg, err)
	}
	var plugin, database *string
	err = conn.QueryRow(ctx, `SELECT plugin, database FROM pg_replication_slots WHERE slot_name = $1`, spec.Slot).Scan(&plugin, &database)
	slotExists := err == nil
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("cdc: look up slot %s: %w", spec.Slot, err)
	}
	var curDB string
	if err := conn.QueryRow(ctx, `SELECT current_database()`).Scan(&curDB); err != nil {
		return fmt.Errorf("cdc: create slot %s: %w", spec.Slot, err)
	}
	var pubExists bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)`, spec.Publication).Scan(&pubExists); err != nil {
		return fmt.Errorf("cdc: look up publication %s: %w", spec.Publication, err)
	}
	if slotExists {
		switch {
		case regPub == nil:
			return fmt.Errorf("%w: %s exists (plugin %s, database %s) and was not created by dimmer (not in %s)", ErrSlotTaken, spec.Slot, deref(plugin), deref(database), reg)
		case deref(plugin) != "pgoutput" || deref(database) != curDB:
			return fmt.Errorf("%w: %s exists with plugin %s on database %s, wanted pgoutput on %s", ErrSlotTaken, spec.Slot, deref(plugin), deref(database), curDB)
		case *regPub != spec.Publication:
			return fmt.Errorf("%w: %s is registered with publication %s, not %s", ErrSlotTaken, spec.Slot, *regPub, spec.Publication)
		case !pubExists:
			return fmt.Errorf("%w: publication %s of slot %s was dropped; drop the slot (dimmer cdc drop) and create it again", ErrPublicationMissingTable, spec.Publication, spec.Slot)
		}
		return checkPublishes(ctx, conn, spec.Slot, spec.Publication, tables)
	}
	if pubExists && (regPub == nil || *regPub != spec.Publication) {
		return fmt.Errorf("%w: %s exists and was not created by dimmer for slot %s", ErrPublicationTaken, spec.Publication, spec.Slot)
	}

	// Publication and registry row in one transaction; the slot after it
	// commits (a slot cannot be created in a transaction that wrote), and
	// both undone if the slot cannot be made.
	created := false
	if err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if !pubExists {
			q := `CREATE PUBLICATION ` + pgx.Identifier{spec.Publication}.Sanitize()
			if len(tables) > 0 {
				q += ` FOR TABLE ` + strings.Join(tables, ", ")
			}
			if _, err := tx.Exec(ctx, q); err != nil {
				return fmt.Errorf("cdc: create publication %s: %w", spec.Publication, err)
			}
		}
		_, err := tx.Exec(ctx, `INSERT INTO `+reg+` (slot, publication, purpose, tables) VALUES ($1, $2, $3, $4)
ON CONFLICT (slot) DO UPDATE SET publication = EXCLUDED.publication, purpose = EXCLUDED.purpose, tables = EXCLUDED.tables`,
			spec.Slot, spec.Publication, spec.Purpose, tables)
		if err != nil {
			return fmt.Errorf("cdc: register slot %s: %w", spec.Slot, err)
		}
		created = true
		return nil
	}); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput')`, spec.Slot); err != nil {
		if created {
			undo := context.WithoutCancel(ctx)
			_, _ = conn.Exec(undo, `DROP PUBLICATION IF EXISTS `+pgx.Identifier{spec.Publication}.Sanitize())
			_, _ = conn.Exec(undo, `DELETE FROM `+reg+` WHERE slot = $1`, spec.Slot)
		}
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42710" {
			return fmt.Errorf("%w: %s was created by someone else meanwhile", ErrSlotTaken, spec.Slot)
		}
		return fmt.Errorf("cdc: create replication slot %s: %w", spec.Slot, err)
	}
	return nil
}

// checkPublishes refuses a publication that lacks one of tables.
func checkPublishes(ctx context.Context, db Querier, slot, pub string, tables []string) error {
	for _, t := range tables {
		var ok bool
		if err := db.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication_tables
WHERE pubname = $1 AND format('%I.%I', schemaname, tablename) = $2)`, pub, t).Scan(&ok); err != nil {
			return fmt.Errorf("cdc: read publication %s: %w", pub, err)
		}
		if !ok {
			return fmt.Errorf("%w: publication %s of slot %s does not publish %s (ALTER PUBLICATION %s ADD TABLE %s, or drop the slot and create it again)",
				ErrPublicationMissingTable, pub, slot, t, pub, t)
		}
	}
	return nil
}

func deref(s *string) string {
	if s == nil {
		return "(none)"
	}
	return *s
}

// DropSlot drops a registered slot, its publication and its registry row.
// A slot with an active reader is refused unless force is set, which
// terminates the reader's WAL sender first. A slot not in the registry is
// never dropped ([ErrNoSlot]).
func DropSlot(ctx context.Context, pool *pgxpool.Pool, schema, slot string, force bool) error {
	if schema == "" {
		schema = DefaultSchema
	}
	reg := registry(schema)
	var pub string
	err := pool.QueryRow(ctx, `SELECT publication FROM `+reg+` WHERE slot = $1`, slot).Scan(&pub)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.Is(err, pgx.ErrNoRows) || (errors.As(err, &pgErr) && pgErr.Code == "42P01") {
			return fmt.Errorf("%w: %s is not registered in %s", ErrNoSlot, slot, reg)
		}
		return fmt.Errorf("cdc: read %s: %w", reg, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var activePID *int32
		err := pool.QueryRow(ctx, `SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1`, slot).Scan(&activePID)
		if errors.Is(err, pgx.ErrNoRows) {
			break // already gone: drop the rest
		}
		if err != nil {
			return fmt.Errorf("cdc: look up slot %s: %w", slot, err)
		}
		if activePID != nil {
			if !force {
				return fmt.Errorf("cdc: slot %s is in use by process %d: stop its reader first, or force the drop", slot, *activePID)
			}
			if _, err := pool.Exec(ctx, `SELECT pg_terminate_backend($1)`, *activePID); err != nil {
				return fmt.Errorf("cdc: stop the reader of slot %s: %w", slot, err)
			}
		} else {
			_, err := pool.Exec(ctx, `SELECT pg_drop_replication_slot($1)`, slot)
			if err == nil {
				break
			}
			var pgErr *pgconn.PgError
			// 55006: a reader took it again in between; 42704: gone meanwhile.
			if !errors.As(err, &pgErr) || (pgErr.Code != "55006" && pgErr.Code != "42704") {
				return fmt.Errorf("cdc: drop slot %s: %w", slot, err)
			}
			if pgErr.Code == "42704" {
				break
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cdc: slot %s stayed in use for 10s", slot)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	if _, err := pool.Exec(ctx, `DROP PUBLICATION IF EXISTS `+pgx.Identifier{pub}.Sanitize()); err != nil {
		return fmt.Errorf("cdc: drop publication %s: %w", pub, err)
	}
	if _, err := pool.Exec(ctx, `DELETE FROM `+reg+` WHERE slot = $1`, slot); err != nil {
		return fmt.Errorf("cdc: unregister slot %s: %w", slot, err)
	}
	return nil
}

// SlotStatus is a registered slot as the server reports it.
type SlotStatus struct {
	Slot, Publication, Purpose string
	Tables                     []string
	// Exists is false when the registry names a slot the server lacks.
	Exists bool
	Active bool
	// ActivePID is the reading WAL sender's process, 0 when none.
	ActivePID int32
	// ConfirmedLSN is the position up to which the reader acknowledged.
	ConfirmedLSN string
	// LagBytes is WAL written since the confirmed position; RetainedBytes
	// is WAL the server keeps for the slot (from its restart position).
	LagBytes, RetainedBytes int64
	// WALStatus is the server's wal_status (reserved, extended, unreserved,
	// lost).
	WALStatus string
}

// Slots reports every slot registered in schema (default "dimmer").
func Slots(ctx context.Context, db interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}, schema string) ([]SlotStatus, error) {
	if schema == "" {
		schema = DefaultSchema
	}
	rows, err := db.Query(ctx, `SELECT r.slot, r.publication, r.purpose, r.tables, s.slot_name IS NOT NULL,
	coalesce(s.active, false), coalesce(s.active_pid, 0), coalesce(s.confirmed_flush_lsn::text, ''),
	coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn), 0)::int8,
	coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn), 0)::int8,
	coalesce(s.wal_status, '')
FROM `+registry(schema)+` r LEFT JOIN pg_replication_slots s ON s.slot_name = r.slot ORDER BY r.slot`)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42P01" {
			return nil, nil // nothing registered yet
		}
		return nil, fmt.Errorf("cdc: read slots: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (SlotStatus, error) {
		var s SlotStatus
		err := r.Scan(&s.Slot, &s.Publication, &s.Purpose, &s.Tables, &s.Exists, &s.Active, &s.ActivePID,
			&s.ConfirmedLSN, &s.LagBytes, &s.RetainedBytes, &s.WALStatus)
		return s, err
	})
}
