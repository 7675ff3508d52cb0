package cdc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/internal/connstr"
)

// ErrSchemaChanged: the source table's shape changed while it was synced
// (a synced column dropped or retyped, or a column added while every
// column is synced). The sync stops before applying anything of the new
// shape; nothing is dropped silently.
var ErrSchemaChanged = errors.New("cdc: source table changed shape during the sync")

// ErrColumnType: the target table cannot hold a synced source column's
// type (a [*ColumnTypeError] names which). Refused when the sync starts,
// before its slot, publication or copy exist.
var ErrColumnType = errors.New("cdc: target column cannot hold the source column's type")

// ColumnTypeError names a synced column whose source type the target
// column cannot take. A table sync writes each value into the target
// column as PostgreSQL's assignment would (INSERT semantics): the same
// type or a domain over it, a type with an implicit or assignment cast to
// it, or any type into a string column. Anything else (an explicit-only
// cast such as jsonb to integer or boolean to integer, a type the target
// database does not know) needs a Go sink that converts it.
type ColumnTypeError struct {
	Table, Column          string // the target table and column
	SourceType, TargetType string // as format_type prints them
}

func (e *ColumnTypeError) Error() string {
	return fmt.Sprintf("%v: %s column %q is %s, the source's is %s (no implicit or assignment cast; convert it in a Go sink or change the target column)",
		ErrColumnType, e.Table, e.Column, e.TargetType, e.SourceType)
}

func (e *ColumnTypeError) Unwrap() error { return ErrColumnType }

// Op is what a [Change] does.
type Op byte

// Ops.
const (
	OpCopy     Op = 'C' // a row of the initial copy
	OpInsert   Op = 'I'
	OpUpdate   Op = 'U'
	OpDelete   Op = 'D'
	OpTruncate Op = 'T'
)

func (o Op) String() string {
	switch o {
	case OpCopy:
		return "copy"
	case OpInsert:
		return "insert"
	case OpUpdate:
		return "update"
	case OpDelete:
		return "delete"
	case OpTruncate:
		return "truncate"
	}
	return fmt.Sprintf("Op(%d)", byte(o))
}

// Change is one row change on its way to a [ChangeSink].
type Change struct {
	Op Op
	// Row holds the new values (copy, insert, update), decoded to Go values
	// by pgx; for a delete, the key columns (every column under REPLICA
	// IDENTITY FULL). Nil for a truncate.
	Row map[string]any
	// Unchanged names the columns of an update whose (TOASTed) value did
	// not change and is therefore not in Row: keep the value you have.
	Unchanged []string
	// OldKey is set on an update that changed the row's key: the previous
	// key's values (decoded like Row). Move the row: the columns in
	// Unchanged keep the values the row had under the old key.
	OldKey map[string]any
	// CommitTime is the source transaction's commit time (zero for copies).
	CommitTime time.Time
}

// ChangeSink receives changes in commit order, a batch at a time. It must
// be idempotent and version-guarded: after a crash the changes since the
// last confirmed position are delivered again, and the copy and the stream
// overlap (see the package doc).
type ChangeSink func(ctx context.Context, changes []Change) error

// SyncConfig describes a table sync. Zero fields take the defaults shown.
type SyncConfig struct {
	// Name identifies the sync: its slot and publication (unless Slot is
	// set) and its backfill job. 1..63 of [a-z0-9_]. Required.
	Name string
	// Slot names the replication slot; default Name.
	Slot string
	// Source is the table read (in the database of the source URL).
	Source backfill.Table
	// Target is the table written, in the target pool's database (a table
	// sync) — or leave it empty and set Sink.
	Target backfill.Table
	// Sink receives the changes instead of a target table.
	Sink ChangeSink
	// Key is the source's key; default its primary key. It must be covered
	// by the table's REPLICA IDENTITY, or deletes could not be keyed.
	Key []string
	// Columns synced; default every source column. With the default, a
	// column added to the source stops the sync ([ErrSchemaChanged]).
	Columns []string
	// VersionColumn guards every upsert (a row holding a greater version is
	// left alone), as in backfill. Required.
	VersionColumn string
	// Schema holds the slot registry (source) and the backfill's
	// checkpoints (target, or source with a Sink); default "dimmer".
	Schema string
	// BatchSize bounds the changes applied in one target transaction (a
	// larger source transaction is applied in several). Default 5000.
	BatchSize int
	// MaxDelay bounds how long a committed change waits to be batched with
	// later ones. Default 5ms.
	MaxDelay time.Duration
	// StatusInterval is how often the position is reported to the server
	// when nothing new was applied (a keepalive); a newly applied position
	// is reported at once. Default 100ms.
	StatusInterval time.Duration
	// StreamInProgress asks the server (PostgreSQL 14 or later) to send a
	// large source transaction while it still runs, once its changes pass
	// StreamWorkMem, and applies it into an open target transaction (one
	// per source transaction, a savepoint per subtransaction) committed
	// when the source commits and rolled back when it aborts. Only with a
	// Target table (a Go sink cannot roll back).
	StreamInProgress bool
	// StreamWorkMem is the WAL sender's logical_decoding_work_mem with
	// StreamInProgress: how much of a transaction it holds before it
	// streams it. Default "1MB".
	StreamWorkMem string
	// MaxStreams bounds the source transactions applied in progress at
	// once (each holds a target connection). Past it the sync reconnects
	// without StreamInProgress for the rest of Run. Default 4.
	MaxStreams int
	// Copy tunes the initial copy (package backfill).
	Copy backfill.Config
	// SkipCopy streams only: the target already holds every row the
	// source held when the slot was created. A reverse sync after a
	// cutover is one ([Sync.Prepare] its slot before the cutover).
	SkipCopy bool
	// OnApplied, if set, is called after each batch of streamed changes is
	// applied, with the batch and the time it was (for lag monitoring: a
	// change's lag is at minus its CommitTime). It must not keep the slice.
	// Not called for transactions applied in progress (StreamInProgress).
	OnApplied func(batch []Change, at time.Time)
	// Logger; default slog.Default().
	Logger *slog.Logger
}

func (c *SyncConfig) withDefaults() {
	if c.Slot == "" {
		c.Slot = c.Name
	}
	if c.Schema == "" {
		c.Schema = DefaultSchema
	}
	if c.BatchSize == 0 {
		c.BatchSize = 5000
	}
	if c.MaxDelay == 0 {
		c.MaxDelay = 5 * time.Millisecond
	}
	if c.StatusInterval == 0 {
		c.StatusInterval = 100 * time.Millisecond
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.StreamWorkMem == "" {
		c.StreamWorkMem = "1MB"
	}
	if c.MaxStreams == 0 {
		c.MaxStreams = 4
	}
}

// Validate reports the first field out of range.
func (c SyncConfig) Validate() error {
	switch {
	case !nameRE.MatchString(c.Name):
		return badConfig("Name", "must be 1..63 characters of [a-z0-9_], got %q", c.Name)
	case flags.ValidateName(c.Name) != nil:
		return badConfig("Name", "%v", flags.ValidateName(c.Name))
	case !nameRE.MatchString(c.Slot):
		return badConfig("Slot", "must be 1..63 characters of [a-z0-9_], got %q", c.Slot)
	case c.Source.Name == "":
		return badConfig("Source", "is empty")
	case c.Sink == nil && c.Target.Name == "":
		return badConfig("Target", "is empty and no Sink is set")
	case c.Sink != nil && c.Target.Name != "":
		return badConfig("Sink", "is set together with Target: choose one")
	case c.VersionColumn == "":
		return badConfig("VersionColumn", "is empty: without a version guard a replayed change could overwrite a newer one")
	case c.BatchSize < 1:
		return badConfig("BatchSize", "must be positive, got %d", c.BatchSize)
	case c.StreamInProgress && c.Sink != nil:
		return badConfig("StreamInProgress", "needs a Target table: a Go sink cannot roll back a source transaction that aborts")
	case c.MaxStreams < 1:
		return badConfig("MaxStreams", "must be positive, got %d", c.MaxStreams)
	case c.MaxDelay < 0 || c.StatusInterval <= 0:
		return badConfig("MaxDelay", "and StatusInterval must not be negative")
	}
	return nil
}

// Sync keeps a target table (or a [ChangeSink]) in step with a source table
// from the log: an initial copy through package backfill, then every
// committed insert, update, delete and truncate. See the package doc.
type Sync struct {
	sourceURL string
	target    *pgxpool.Pool
	cfg       SyncConfig
	log       *slog.Logger

	applied  atomic.Uint64 // confirmed position
	copied   atomic.Bool
	changes  atomic.Int64
	streamed atomic.Bool
	buffered atomic.Int64 // changes read from the slot and not yet applied
	// wholeOnly: more source transactions were in progress at once than
	// MaxStreams; read whole transactions only from then on.
	wholeOnly atomic.Bool
	// textValues reads values in text form even where binary would do
	// (tests of the text path).
	textValues bool
	binary     atomic.Bool // the running sync reads values in binary
}

// NewSync returns a sync from the table cfg.Source in the database of
// sourceURL to cfg.Target in target's database (nil with cfg.Sink). It does
// nothing until [Sync.Run].
func NewSync(sourceURL string, target *pgxpool.Pool, cfg SyncConfig) (*Sync, error) {
	if _, err := pgconn.ParseConfig(sourceURL); err != nil {
		return nil, badConfig("sourceURL", "does not parse: %v", connstr.ParseError(err))
	}
	cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Sink == nil && target == nil {
		return nil, badConfig("target", "is nil and no Sink is set")
	}
	return &Sync{sourceURL: sourceURL, target: target, cfg: cfg, log: cfg.Logger.With("sync", cfg.Name)}, nil
}

// Applied is the source log position up to which every change is applied
// and confirmed.
func (s *Sync) Applied() string { return pglogrepl.LSN(s.applied.Load()).String() }

// Buffered is the number of changes the sync has read from the slot and
// not yet applied: what it holds in memory. It stays under 4 × BatchSize
// (the batch being read, two queued, the one being applied) however large
// a source transaction is: reading waits for applying.
func (s *Sync) Buffered() int { return int(s.buffered.Load()) }

// Copied reports whether the initial copy has finished.
func (s *Sync) Copied() bool { return s.copied.Load() }

// Streaming reports whether the sync is applying the stream (the copy is
// done and the slot is held).
func (s *Sync) Streaming() bool { return s.streamed.Load() }

// column is a source column as the sync knows it.
type column struct {
	name string
	oid  uint32
	typ  string // format_type, for casts
	idx  int    // position among the synced columns (tableShape.cols)
	key  int    // position in the key, or -1
	// arrayOID is the OID of the array of the column's type, for values
	// read in binary (see binaryColumns).
	arrayOID uint32
}

type tableShape struct {
	qualified, schema, name string
	cols                    []column
	key                     []string
	all                     bool // every column synced
	// binary: the slot is read with pgoutput's binary option and values
	// are applied in their types' binary form (see binaryColumns).
	binary bool
}

func (t *tableShape) col(name string) (column, bool) {
	for _, c := range t.cols {
		if c.name == name {
			return c, true
		}
	}
	return column{}, false
}

// describe reads the source table and checks the key against its replica
// identity.
func (s *Sync) describe(ctx context.Context, src *pgxpool.Pool) (*tableShape, error) {
	name := s.cfg.Source.Name
	if s.cfg.Source.Schema != "" {
		name = pgx.Identifier{s.cfg.Source.Schema, s.cfg.Source.Name}.Sanitize()
	} else {
		name = pgx.Identifier{name}.Sanitize()
	}
	qualified, err := checkTable(ctx, src, name)
	if err != nil {
		return nil, err
	}
	sh := &tableShape{qualified: qualified}
	var ident string
	var identCols, pk []string
	if err := src.QueryRow(ctx, `SELECT n.nspname, c.relname, c.relreplident::text,
	coalesce((SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_index i JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
	 WHERE i.indrelid = c.oid AND i.indisprimary), '{}'),
	coalesce((SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_index i JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
	 WHERE i.indrelid = c.oid AND i.indisreplident), '{}')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::regclass`, qualified).Scan(&sh.schema, &sh.name, &ident, &pk, &identCols); err != nil {
		return nil, fmt.Errorf("cdc: describe %s: %w", qualified, err)
	}
	rows, err := src.Query(ctx, `SELECT attname, atttypid, format_type(atttypid, atttypmod) FROM pg_attribute
WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum`, qualified)
	if err != nil {
		return nil, fmt.Errorf("cdc: describe %s: %w", qualified, err)
	}
	all, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (column, error) {
		var c column
		return c, r.Scan(&c.name, &c.oid, &c.typ)
	})
	if err != nil {
		return nil, fmt.Errorf("cdc: describe %s: %w", qualified, err)
	}
	sh.key = s.cfg.Key
	if len(sh.key) == 0 {
		sh.key = pk
	}
	if len(sh.key) == 0 {
		return nil, fmt.Errorf("%w: %s has no primary key and SyncConfig.Key is empty", ErrNoReplicaIdentity, qualified)
	}
	switch ident {
	case "f":
	case "d":
		identCols = pk
		fallthrough
	default:
		for _, k := range sh.key {
			if !slices.Contains(identCols, k) {
				return nil, fmt.Errorf("%w: key column %q of %s is not part of its REPLICA IDENTITY (%s): deletes would not carry it (ALTER TABLE %s REPLICA IDENTITY FULL, or key on the primary key)",
					ErrNoReplicaIdentity, k, qualified, strings.Join(identCols, ", "), qualified)
			}
		}
	}
	want := s.cfg.Columns
	sh.all = len(want) == 0
	for _, c := range all {
		if sh.all || slices.Contains(want, c.name) {
			c.idx, c.key = len(sh.cols), slices.Index(sh.key, c.name)
			sh.cols = append(sh.cols, c)
		}
	}
	for _, w := range append(slices.Clone(want), append(slices.Clone(sh.key), s.cfg.VersionColumn)...) {
		if _, ok := sh.col(w); !ok {
			return nil, badConfig("Columns", "column %q is not a synced column of %s", w, qualified)
		}
	}
	return sh, nil
}

// Run copies the source (unless a previous run finished the copy), then
// applies the stream until ctx ends. The slot and publication are created
// first (registered as in [CreateSlot]), so no change committed from then
// on is missed. When the replication connection or the target's breaks
// (the network, a server restart, the WAL sender terminated) Run
// reconnects with backoff and resumes from the confirmed position: changes applied but not yet
// confirmed come again and the version guard leaves them without effect.
// Run returns ctx's error when ctx ends, or the error that stopped the
// sync ([ErrSchemaChanged] and friends); a later Run resumes.
func (s *Sync) Run(ctx context.Context) error {
	s.wholeOnly.Store(false)
	src, sh, claim, err := s.prepare(ctx, true)
	if err != nil {
		return err
	}
	defer func() { claim.release() }()
	defer src.Close()
	if !s.cfg.SkipCopy {
		if err := s.copy(ctx, src, sh); err != nil {
			return err
		}
	}
	s.copied.Store(true)
	if sh.binary, err = s.binaryValues(ctx, src, sh); err != nil {
		return err
	}
	s.binary.Store(sh.binary)
	const minBackoff, maxBackoff = 50 * time.Millisecond, 2 * time.Second
	backoff := minBackoff
	reconnecting := false
	for {
		var err error
		started := false
		if reconnecting && claim.lost(ctx) {
			// The direction mark went with its connection: take it again
			// (and look again for a sync the other way) before streaming.
			claim.release()
			claim, err = s.claimDirection(ctx, src, sh)
			if errors.Is(err, ErrOppositeSync) {
				return err
			}
			if err != nil {
				claim = &directionClaim{} // still lost: try again
				err = &connLostError{err}
			}
		}
		if err == nil {
			started, err = s.stream(ctx, sh, reconnecting)
		}
		var lost *connLostError
		switch {
		case ctx.Err() != nil:
			return err
		case errors.As(err, &lost):
		case reconnecting && errors.Is(err, errBusy):
			// The server has not yet noticed that the previous
			// connection is gone (at most wal_sender_timeout).
		default:
			return err
		}
		if started {
			backoff = minBackoff
		}
		reconnecting = true
		s.log.Warn("cdc sync: connection lost; reconnecting", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// targetLost reports whether an error writing the target is its
// connection failing (worth reconnecting for), not the write being
// refused.
func targetLost(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return strings.HasPrefix(pgErr.Code, "57P") || strings.HasPrefix(pgErr.Code, "08")
	}
	var ne net.Error
	var ce *pgconn.ConnectError
	return errors.As(err, &ne) || errors.As(err, &ce) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || pgconn.SafeToRetry(err)
}

// connLostError: the replication connection (or the target's) broke; the
// stream can resume on a new one.
type connLostError struct{ err error }

func (e *connLostError) Error() string { return e.err.Error() }
func (e *connLostError) Unwrap() error { return e.err }

// lostIfConn marks err as a lost connection when it is one: anything but
// an error the server sent, except the server ending the session
// (shutdown, terminated backend, connection failure classes).
func lostIfConn(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && !strings.HasPrefix(pgErr.Code, "57") && !strings.HasPrefix(pgErr.Code, "08") {
		return err
	}
	return &connLostError{err}
}

// Prepare checks the source and creates the sync's slot and publication
// (as Run does first), without copying or streaming: every change
// committed from now on will be streamed by a later Run. A reverse sync's
// slot is prepared before the cutover, so no write to the new side after
// the cutover is missed.
func (s *Sync) Prepare(ctx context.Context) error {
	src, _, _, err := s.prepare(ctx, false)
	if err != nil {
		return err
	}
	src.Close()
	return nil
}

// prepare checks the source and target and creates the slot. With claim
// (Run), it first claims the direction (see claimDirection); release the
// returned claim when done.
func (s *Sync) prepare(ctx context.Context, claim bool) (*pgxpool.Pool, *tableShape, *directionClaim, error) {
	src, err := pgxpool.New(ctx, s.sourceURL)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("cdc: open source: %w", err)
	}
	var claimed *directionClaim
	err = CheckLogical(ctx, src)
	var sh *tableShape
	if err == nil {
		sh, err = s.describe(ctx, src)
	}
	if err == nil && s.cfg.Sink == nil {
		err = s.checkTarget(ctx, sh)
		if err == nil && claim {
			claimed, err = s.claimDirection(ctx, src, sh)
		}
	}
	if err == nil {
		err = CreateSlot(ctx, src, SlotSpec{Slot: s.cfg.Slot, Publication: s.cfg.Slot, Tables: []string{sh.qualified}, Purpose: "sync", Schema: s.cfg.Schema})
	}
	if err != nil {
		claimed.release()
		src.Close()
		return nil, nil, nil, err
	}
	return src, sh, claimed, nil
}

func samePool(a, b *pgxpool.Pool) bool {
	ca, cb := a.Config().ConnConfig, b.Config().ConnConfig
	return ca.Host == cb.Host && ca.Port == cb.Port && ca.Database == cb.Database
}

// copy runs the initial copy as a backfill job (resumable; a finished job
// is not run again).
func (s *Sync) copy(ctx context.Context, src *pgxpool.Pool, sh *tableShape) error {
	store := s.target
	var sourcePool *pgxpool.Pool
	if s.cfg.Sink != nil {
		store = src
	} else if !samePool(src, s.target) {
		sourcePool = src
	}
	b, err := backfill.New(store, backfill.WithSchema(s.cfg.Schema), backfill.WithLogger(s.log))
	if err != nil {
		return err
	}
	if err := b.Install(ctx); err != nil {
		return err
	}
	cols := make([]string, len(sh.cols))
	for i, c := range sh.cols {
		cols[i] = c.name
	}
	job := backfill.Job{
		Name:      "cdc-sync-" + s.cfg.Name,
		Migration: s.cfg.Name,
		Spec: backfill.Spec{Source: backfill.Table{Schema: sh.schema, Name: sh.name}, Target: s.cfg.Target,
			Key: sh.key, Columns: cols, VersionColumn: s.cfg.VersionColumn},
		SourcePool: sourcePool,
		Config:     s.cfg.Copy,
	}
	if s.cfg.Sink != nil {
		job.Sink = &changeSinkAdapter{name: s.cfg.Name, sink: s.cfg.Sink}
		job.Spec.Target = backfill.Table{}
	}
	res, err := b.Run(ctx, job)
	if err != nil {
		return fmt.Errorf("cdc: sync %s: initial copy: %w", s.cfg.Name, err)
	}
	s.log.Info("cdc sync: initial copy done", "rows", res.Rows, "already_done", res.AlreadyDone, "elapsed", res.Elapsed)
	return nil
}

// changeSinkAdapter hands the copy's rows to a ChangeSink.
type changeSinkAdapter struct {
	name string
	sink ChangeSink
}

func (a *changeSinkAdapter) Describe() string                                    { return "cdc-sink#" + a.name }
func (a *changeSinkAdapter) Open(ctx context.Context, _ backfill.SinkSpec) error { return nil }
func (a *changeSinkAdapter) Write(ctx context.Context, rows []backfill.Row) error {
	cs := make([]Change, len(rows))
	for i, r := range rows {
		cs[i] = Change{Op: OpCopy, Row: r}
	}
	return a.sink(ctx, cs)
}

var _ backfill.Sink = (*changeSinkAdapter)(nil)

// change is a decoded stream change with what applying it needs.
type change struct {
	Change
	key  string   // the key's values joined (keyOf): what a batch merges by
	vals []colVal // by synced column (tableShape.cols), as the server sent them
	// moveFrom is set on an update that changed the key: the old key's
	// values, by key column.
	moveFrom []colVal
}

// colVal is a column's value as the server sent it: its text form, or its
// type's binary (send) form when the slot is read in binary. A column not
// carried (an unchanged TOAST value, a delete's non-key column) is not set.
type colVal struct {
	data      []byte
	null, set bool
}

// stream applies the slot's changes until ctx ends or an error; started
// reports whether it got to streaming. When reconnecting, failing to
// connect at all counts as a lost connection too.
func (s *Sync) stream(ctx context.Context, sh *tableShape, reconnecting bool) (started bool, err error) {
	inProgress := s.cfg.StreamInProgress && !s.wholeOnly.Load()
	// Values read in text form are the WAL sender's output functions'
	// under its session's settings, parsed by the target under its own:
	// the formats are pinned to ones every server reads back the same
	// (a source whose DateStyle is "SQL, DMY" would otherwise send
	// 05/12/2026 for 5 December, which a target in MDY reads as 12 May),
	// and pgx too, for Go values (it reads intervals in the postgres
	// style only; that style signs every field after a negative one, so
	// a target in sql_standard reads it the same).
	params := []string{"DateStyle", "ISO", "IntervalStyle", "postgres", "extra_float_digits", "3"}
	if inProgress {
		params = append(params, "logical_decoding_work_mem", s.cfg.StreamWorkMem)
	}
	conn, err := replicationConnect(ctx, s.sourceURL, params...)
	if err != nil {
		if reconnecting {
			return false, &connLostError{err}
		}
		return false, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var extra []string
	if sh.binary {
		extra = append(extra, "binary 'true'")
	}
	if err := startDecoding(ctx, conn, s.cfg.Slot, s.cfg.Slot, false, inProgress, extra...); err != nil {
		switch {
		case errors.Is(err, errBusy):
			return false, fmt.Errorf("cdc: sync %s: slot %s is read by another process: %w", s.cfg.Name, s.cfg.Slot, err)
		case errors.Is(err, ErrNoSlot), errors.Is(err, ErrWalLevel):
			return false, err
		case reconnecting:
			return false, lostIfConn(err)
		}
		return false, err
	}
	ap, err := s.newApplier(ctx, sh)
	if err != nil {
		return false, err
	}
	s.streamed.Store(true)
	defer s.streamed.Store(false)
	return true, s.apply(ctx, conn, sh, ap, inProgress)
}

// apply reads conn's stream and applies it through ap.
func (s *Sync) apply(ctx context.Context, conn *pgconn.PgConn, sh *tableShape, ap *applier, inProgress bool) error {
	// Reading and applying overlap: the reader hands batches to one
	// applier goroutine, in order, and reports the position the applier
	// reached.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	jobs := make(chan applyJob, 2)
	var inFlight atomic.Int64
	var appliedPos atomic.Uint64
	// The reader waits for the server with a deadline; a position the
	// applier confirms ends that wait, so it is reported at once rather
	// than at the next StatusInterval (a cutover waits for it).
	rctx := &deadlineCtx{parent: ctx}
	defer rctx.stop()
	applierDone := make(chan struct{})
	go func() {
		defer close(applierDone)
		// Source transactions applied in progress, by xid; what is still
		// open when the stream ends is rolled back (it comes again whole).
		open := map[uint32]*streamTx{}
		defer func() {
			for _, st := range open {
				_ = st.conn.Close(context.WithoutCancel(ctx))
			}
		}()
		for j := range jobs {
			if err := s.runJob(ctx, ap, open, j); err != nil {
				switch {
				case errors.Is(err, errTooManyStreams):
					s.wholeOnly.Store(true)
					err = &connLostError{err}
				case s.cfg.Sink == nil && ctx.Err() == nil && targetLost(err):
					err = &connLostError{err}
				}
				cancel(err)
				s.buffered.Add(-int64(len(j.changes)))
				for j := range jobs {
					s.buffered.Add(-int64(len(j.changes)))
					inFlight.Add(-1)
				}
				return
			}
			if j.end > 0 && pglogrepl.LSN(appliedPos.Swap(uint64(j.end))) < j.end {
				rctx.wake()
			}
			s.buffered.Add(-int64(len(j.changes)))
			inFlight.Add(-1)
		}
	}()
	var pending []change
	defer func() {
		close(jobs)
		<-applierDone
		s.buffered.Add(-int64(len(pending)))
	}()
	send := func(j applyJob) error {
		inFlight.Add(1)
		select {
		case jobs <- j:
			return nil
		case <-ctx.Done():
			s.buffered.Add(-int64(len(j.changes)))
			inFlight.Add(-1)
			return context.Cause(ctx)
		}
	}
	typeMap := pgtype.NewMap()
	var (
		values     arena            // the bytes of the values read
		slab       []colVal         // where changes' vals come from
		inStream   bool             // between Stream Start and Stop
		streamXid  uint32           // the transaction of the stream block
		pendingSub uint32           // the (sub)transaction of pending's changes in a block
		streamRels = streamShapes{} // the table's shape as sent to a transaction in progress
		rel        *pglogrepl.RelationMessage
		relCols    []column
		oldest     time.Time
		inTx       bool
		commitTime time.Time
		lastCommit pglogrepl.LSN // end of the last transaction read whole
		queued     pglogrepl.LSN // the last position handed to the applier
		confirmed  pglogrepl.LSN
		nextStatus = time.Now()
	)
	flush := func() error {
		if len(pending) == 0 && queued >= lastCommit {
			return nil
		}
		// Every change of transactions up to lastCommit is in this batch
		// or an earlier one (a part of the open transaction may be too).
		err := send(applyJob{changes: pending, end: lastCommit})
		pending, queued = nil, lastCommit
		return err
	}
	// flushStream hands the stream block's pending changes (all of one
	// subtransaction) to the applier.
	flushStream := func() error {
		if len(pending) == 0 {
			return nil
		}
		err := send(applyJob{kind: jobInProgress, xid: streamXid, subxid: pendingSub, changes: pending})
		pending = nil
		return err
	}
	fail := func(err error) error {
		if c := context.Cause(ctx); c != nil && !errors.Is(c, context.Canceled) {
			return c // the applier's error explains the stop
		}
		return err
	}
	for {
		if ctx.Err() != nil {
			return fail(ctx.Err())
		}
		now := time.Now()
		if !inTx && (len(pending) > 0 && now.Sub(oldest) >= s.cfg.MaxDelay || len(pending) == 0 && queued < lastCommit) {
			if err := flush(); err != nil {
				return fail(err)
			}
		}
		if p := pglogrepl.LSN(appliedPos.Load()); p > confirmed {
			confirmed = p
			s.applied.Store(uint64(confirmed))
			nextStatus = time.Time{}
		}
		if !now.Before(nextStatus) {
			if err := pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{WALWritePosition: confirmed}); err != nil {
				return fail(&connLostError{fmt.Errorf("cdc: sync %s: report position: %w", s.cfg.Name, err)})
			}
			nextStatus = now.Add(s.cfg.StatusInterval)
		}
		deadline := nextStatus
		if len(pending) > 0 && !inTx {
			deadline = oldest.Add(s.cfg.MaxDelay)
		}
		// A deadline context costs a timer: keep one while the deadline
		// stands (thousands of messages in a large transaction).
		raw, err := conn.ReceiveMessage(rctx.until(deadline))
		if err != nil {
			if ctx.Err() != nil {
				return fail(ctx.Err())
			}
			if pgconn.Timeout(err) || errors.Is(err, context.Canceled) {
				continue // the deadline, or the applier's wake-up (ctx itself stands)
			}
			return fail(&connLostError{fmt.Errorf("cdc: sync %s: read slot: %w", s.cfg.Name, err)})
		}
		var data []byte
		switch msg := raw.(type) {
		case *pgproto3.ErrorResponse:
			return fail(lostIfConn(fmt.Errorf("cdc: sync %s: %w", s.cfg.Name, pgconn.ErrorResponseToPgError(msg))))
		case *pgproto3.CopyDone:
			return fail(&connLostError{fmt.Errorf("cdc: sync %s: the server ended the stream", s.cfg.Name)})
		case *pgproto3.CopyData:
			data = msg.Data
		default:
			continue
		}
		if len(data) == 0 {
			continue
		}
		switch data[0] {
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
			if err != nil {
				return err
			}
			// Nothing read is waiting: the position may pass WAL without
			// changes of the table.
			if !inTx && len(pending) == 0 && queued >= lastCommit && inFlight.Load() == 0 && ka.ServerWALEnd > confirmed {
				lastCommit, queued = max(lastCommit, ka.ServerWALEnd), max(queued, ka.ServerWALEnd)
				appliedPos.Store(uint64(max(pglogrepl.LSN(appliedPos.Load()), ka.ServerWALEnd)))
			}
			if ka.ReplyRequested {
				nextStatus = time.Time{}
			}
			continue
		case pglogrepl.XLogDataByteID:
		default:
			continue
		}
		xld, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return err
		}
		var lm any
		var xid uint32 // in a stream block: the (sub)transaction of the change
		// Rows, nearly every message, are read in place; the rest through
		// pglogrepl.
		row, isRow, err := parseRow(xld.WALData, inStream)
		if err != nil {
			return fmt.Errorf("cdc: sync %s: decode: %w", s.cfg.Name, err)
		}
		if isRow {
			xid = row.xid
			lm = &row
		} else if inProgress {
			lm, err = pglogrepl.ParseV2(xld.WALData, inStream)
			switch m := lm.(type) {
			case *pglogrepl.InsertMessageV2:
				lm, xid = &m.InsertMessage, m.Xid
			case *pglogrepl.UpdateMessageV2:
				lm, xid = &m.UpdateMessage, m.Xid
			case *pglogrepl.DeleteMessageV2:
				lm, xid = &m.DeleteMessage, m.Xid
			case *pglogrepl.TruncateMessageV2:
				lm, xid = &m.TruncateMessage, m.Xid
			case *pglogrepl.RelationMessageV2:
				lm, xid = &m.RelationMessage, m.Xid
			}
		} else {
			lm, err = pglogrepl.Parse(xld.WALData)
		}
		if err != nil {
			return fmt.Errorf("cdc: sync %s: decode: %w", s.cfg.Name, err)
		}
		switch m := lm.(type) {
		case *pglogrepl.StreamStartMessageV2:
			// What waits for MaxDelay belongs to whole transactions
			// before this block.
			if err := flush(); err != nil {
				return fail(err)
			}
			inStream, inTx, streamXid, commitTime = true, true, m.Xid, time.Time{}
		case *pglogrepl.StreamStopMessageV2:
			if err := flushStream(); err != nil {
				return fail(err)
			}
			inStream, inTx = false, false

		case *pglogrepl.StreamCommitMessageV2:
			if err := flush(); err != nil {
				return fail(err)
			}
			if r := streamRels.current(m.Xid); r != nil {
				if r.err != nil {
					return fail(r.err)
				}
				rel, relCols = r.rel, r.cols
			}
			delete(streamRels, m.Xid)
			if err := send(applyJob{kind: jobCommit, xid: m.Xid, end: m.TransactionEndLSN}); err != nil {
				return fail(err)
			}
			lastCommit = max(lastCommit, m.TransactionEndLSN)
			queued = lastCommit
		case *pglogrepl.StreamAbortMessageV2:
			if err := flush(); err != nil {
				return fail(err)
			}
			if err := send(applyJob{kind: jobAbort, xid: m.Xid, subxid: m.SubXid}); err != nil {
				return fail(err)
			}
			streamRels.abort(m.Xid, m.SubXid)
		case *pglogrepl.BeginMessage:
			inTx, commitTime = true, m.CommitTime
		case *pglogrepl.CommitMessage:
			inTx = false
			lastCommit = m.TransactionEndLSN
		case *pglogrepl.RelationMessage:
			if m.Namespace != sh.schema || m.RelationName != sh.name {
				continue
			}
			cols, err := s.checkRelation(sh, m)
			if inStream {
				// The shape a transaction in progress sees is its own
				// until it commits (it may yet roll its change back): a
				// shape the sync cannot take stops it only at that commit.
				streamRels[streamXid] = append(streamRels[streamXid], relState{sub: xid, rel: m, cols: cols, err: err})
				continue
			}
			if err != nil {
				return err
			}
			rel, relCols = m, cols
		case *rowMsg:
			rel, relCols := rel, relCols
			if r := streamRels.current(streamXid); inStream && r != nil {
				if r.err != nil {
					continue
				}
				rel, relCols = r.rel, r.cols
			}
			if rel == nil || m.relID != rel.RelationID {
				continue
			}
			c, err := s.decodeChange(typeMap, sh, relCols, m.op, m.tuple, commitTime, &values, &slab)
			if err != nil {
				return err
			}
			if inStream && len(pending) > 0 && xid != pendingSub {
				// A batch stays within one subtransaction: it may be
				// rolled back alone.
				if err := flushStream(); err != nil {
					return fail(err)
				}
			}
			pendingSub = xid
			if len(pending) == 0 {
				oldest = time.Now()
			}
			if m.op == OpUpdate && m.oldTuple != nil {
				// The old row comes along when its key changed (or under
				// REPLICA IDENTITY FULL): a changed key moves the row.
				old, err := s.decodeChange(typeMap, sh, relCols, OpDelete, m.oldTuple, commitTime, &values, &slab)
				if err != nil {
					return err
				}
				if old.key != c.key {
					c.moveFrom = make([]colVal, len(sh.key))
					for i, k := range sh.key {
						col, _ := sh.col(k)
						c.moveFrom[i] = old.vals[col.idx]
					}
					if old.Row != nil {
						c.OldKey = make(map[string]any, len(sh.key))
						for _, k := range sh.key {
							c.OldKey[k] = old.Row[k]
						}
					}
				}
			}
			pending = append(pending, c)
			s.buffered.Add(1)
			if len(pending) >= s.cfg.BatchSize {
				// A large transaction is applied in parts; its position is
				// confirmed only once all of it is.
				f := flush
				if inStream {
					f = flushStream
				}
				if err := f(); err != nil {
					return fail(err)
				}
			}
		case *pglogrepl.TruncateMessage:
			rel := rel
			if r := streamRels.current(streamXid); inStream && r != nil {
				if r.err != nil {
					continue
				}
				rel = r.rel
			}
			if rel == nil || !slices.Contains(m.RelationIDs, rel.RelationID) {
				continue
			}
			j := applyJob{truncate: true, commit: commitTime}
			f := flush
			if inStream {
				f, j.kind, j.xid, j.subxid = flushStream, jobInProgress, streamXid, xid
			}
			if err := f(); err != nil {
				return fail(err)
			}
			if err := send(j); err != nil {
				return fail(err)
			}
		}
	}
}

// deadlineCtx hands out a context that ends at a deadline, reusing it
// while the deadline stands; wake, safe from any goroutine, ends it early.
type deadlineCtx struct {
	parent context.Context
	mu     sync.Mutex
	ctx    context.Context
	cancel context.CancelFunc
	at     time.Time
}

func (d *deadlineCtx) until(at time.Time) context.Context {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ctx == nil || !at.Equal(d.at) || d.ctx.Err() != nil {
		if d.cancel != nil {
			d.cancel()
		}
		d.ctx, d.cancel = context.WithDeadline(d.parent, at)
		d.at = at
	}
	return d.ctx
}

func (d *deadlineCtx) wake() { d.stop() }

func (d *deadlineCtx) stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cancel != nil {
		d.cancel()
	}
}

// applyJob is a batch for the applier; end is the position confirmed once
// it is applied (0: none).
type applyJob struct {
	kind     jobKind
	xid      uint32 // with jobInProgress, jobCommit, jobAbort: the source transaction
	subxid   uint32 // with jobInProgress, jobAbort: its subtransaction (xid itself at the top)
	changes  []change
	truncate bool
	commit   time.Time
	end      pglogrepl.LSN
}

// relState is a relation message as a transaction in progress saw it.
type relState struct {
	sub  uint32 // the (sub)transaction it was sent in
	rel  *pglogrepl.RelationMessage
	cols []column
	err  error // the shape cannot be synced
}

// streamShapes holds, by transaction in progress, the relation messages
// sent to it, in order: the last one is the shape its changes have.
type streamShapes map[uint32][]relState

func (m streamShapes) current(xid uint32) *relState {
	if rs := m[xid]; len(rs) > 0 {
		return &rs[len(rs)-1]
	}
	return nil
}

// abort drops what a rolled-back subtransaction (or the whole transaction,
// sub = xid) saw: a schema change it made is gone with it. Later messages
// came from it or from subtransactions nested in it (while it was open,
// every change was its own or theirs), so they go too, as the savepoints
// do on the target.
func (m streamShapes) abort(xid, sub uint32) {
	if sub == xid {
		delete(m, xid)
		return
	}
	rs := m[xid]
	if i := slices.IndexFunc(rs, func(r relState) bool { return r.sub == sub }); i >= 0 {
		m[xid] = rs[:i]
	}
}

// jobKind: what an applyJob does.
type jobKind byte

const (
	jobWhole      jobKind = iota // changes of transactions read whole (committed)
	jobInProgress                // changes of a transaction still in progress
	jobCommit                    // the in-progress transaction xid committed
	jobAbort                     // it (subxid = xid) or its subtransaction subxid aborted
)

// errTooManyStreams: more source transactions in progress at once than
// SyncConfig.MaxStreams.
var errTooManyStreams = errors.New("cdc: more source transactions in progress at once than MaxStreams")

// streamTx is the open target transaction of a source transaction applied
// while in progress.
type streamTx struct {
	conn  *pgx.Conn
	ap    applier  // writing through the transaction
	saves []uint32 // subtransactions with a savepoint, in order of their first change
}

// runInProgress applies a job of a transaction still in progress on the
// source.
func (s *Sync) runInProgress(ctx context.Context, ap *applier, open map[uint32]*streamTx, j applyJob) error {
	st := open[j.xid]
	switch j.kind {
	case jobCommit, jobAbort:
		if st == nil {
			return nil // nothing of the table in it
		}
		q := "COMMIT"
		if j.kind == jobAbort {
			if j.subxid != j.xid {
				// Rolling back to a savepoint discards the later ones too,
				// as the source did: a subtransaction whose first change
				// came later is nested in this one or ended with it.
				i := slices.Index(st.saves, j.subxid)
				if i < 0 {
					return nil // it changed nothing of the table
				}
				sp := pgx.Identifier{fmt.Sprint("s", j.subxid)}.Sanitize()
				if _, err := st.conn.Exec(ctx, "ROLLBACK TO SAVEPOINT "+sp+"; RELEASE SAVEPOINT "+sp); err != nil {
					return fmt.Errorf("cdc: sync %s: roll back subtransaction %d of %d: %w", s.cfg.Name, j.subxid, j.xid, err)
				}
				st.saves = st.saves[:i]
				return nil
			}
			q = "ROLLBACK"
		}
		_, err := st.conn.Exec(ctx, q)
		_ = st.conn.Close(context.WithoutCancel(ctx))
		delete(open, j.xid)
		if err != nil {
			return fmt.Errorf("cdc: sync %s: %s source transaction %d: %w", s.cfg.Name, strings.ToLower(q), j.xid, err)
		}
		return nil
	}
	if st == nil {
		if len(open) >= s.cfg.MaxStreams {
			return errTooManyStreams
		}
		conn, err := pgx.ConnectConfig(ctx, s.target.Config().ConnConfig.Copy())
		if err != nil {
			return fmt.Errorf("cdc: sync %s: connect to the target: %w", s.cfg.Name, err)
		}
		if _, err := conn.Exec(ctx, "BEGIN"); err != nil {
			_ = conn.Close(context.WithoutCancel(ctx))
			return fmt.Errorf("cdc: sync %s: begin: %w", s.cfg.Name, err)
		}
		st = &streamTx{conn: conn, ap: *ap}
		st.ap.conn, st.ap.buf = conn, nil
		open[j.xid] = st
	}
	if j.subxid != j.xid && !slices.Contains(st.saves, j.subxid) {
		if _, err := st.conn.Exec(ctx, "SAVEPOINT "+pgx.Identifier{fmt.Sprint("s", j.subxid)}.Sanitize()); err != nil {
			return fmt.Errorf("cdc: sync %s: savepoint: %w", s.cfg.Name, err)
		}
		st.saves = append(st.saves, j.subxid)
	}
	if j.truncate {
		return st.ap.truncate(ctx, j.commit)
	}
	if err := st.ap.apply(ctx, j.changes); err != nil {
		return err
	}
	s.changes.Add(int64(len(j.changes)))
	return nil
}

func (s *Sync) runJob(ctx context.Context, ap *applier, open map[uint32]*streamTx, j applyJob) error {
	if j.kind != jobWhole {
		return s.runInProgress(ctx, ap, open, j)
	}
	if j.truncate {
		return ap.truncate(ctx, j.commit)
	}
	if len(j.changes) == 0 {
		return nil
	}
	if err := ap.apply(ctx, j.changes); err != nil {
		return err
	}
	s.changes.Add(int64(len(j.changes)))
	if f := s.cfg.OnApplied; f != nil {
		at := time.Now()
		cs := make([]Change, len(j.changes))
		for i, c := range j.changes {
			cs[i] = c.Change
		}
		f(cs, at)
	}
	return nil
}

// checkRelation compares a relation message with the synced shape and maps
// its columns.
func (s *Sync) checkRelation(sh *tableShape, m *pglogrepl.RelationMessage) ([]column, error) {
	cols := make([]column, len(m.Columns))
	seen := map[string]bool{}
	for i, rc := range m.Columns {
		c, ok := sh.col(rc.Name)
		if !ok {
			if sh.all {
				return nil, fmt.Errorf("%w: column %q was added to %s; add it to the target (or list the synced Columns) and run the sync again",
					ErrSchemaChanged, rc.Name, sh.qualified)
			}
			continue
		}
		if c.oid != rc.DataType {
			return nil, fmt.Errorf("%w: column %q of %s changed type (oid %d, was %d); the sync stopped before applying it",
				ErrSchemaChanged, rc.Name, sh.qualified, rc.DataType, c.oid)
		}
		cols[i] = c
		seen[rc.Name] = true
	}
	for _, c := range sh.cols {
		if !seen[c.name] {
			return nil, fmt.Errorf("%w: synced column %q is gone from %s (dropped or renamed); the sync stopped before applying any change without it",
				ErrSchemaChanged, c.name, sh.qualified)
		}
	}
	return cols, nil
}

// decodeChange reads a row of the table (a tuple of message op) into a
// change, copying its values into values.
func (s *Sync) decodeChange(tm *pgtype.Map, sh *tableShape, cols []column, op Op, tuple []byte, commit time.Time, values *arena, slab *[]colVal) (change, error) {
	if tuple == nil {
		return change{}, fmt.Errorf("%w: a %s on %s carried no row", ErrNoReplicaIdentity, op, sh.qualified)
	}
	c := change{Change: Change{Op: op, CommitTime: commit}, vals: values.vals(slab, len(sh.cols))}
	// Go values are made only for someone who reads them (a Go sink,
	// OnApplied): a table target is written from the bytes the server sent.
	goValues := s.cfg.Sink != nil || s.cfg.OnApplied != nil
	if goValues {
		c.Row = make(map[string]any, len(sh.cols))
	}
	var keys []colVal
	if len(sh.key) > 1 {
		keys = make([]colVal, len(sh.key))
	}
	haveKeys := 0
	err := eachCol(tuple, func(i int, col tupleCol) error {
		if i >= len(cols) || cols[i].name == "" {
			return nil
		}
		sc := cols[i]
		switch col.kind {
		case 'n':
			if op == OpDelete && sc.key < 0 {
				// Under REPLICA IDENTITY DEFAULT only the key is sent;
				// the other columns are absent (n), not null.
				return nil
			}
			c.vals[sc.idx] = colVal{null: true, set: true}
			if goValues {
				c.Row[sc.name] = nil
			}
		case 'u':
			c.Unchanged = append(c.Unchanged, sc.name)
		case 't', 'b':
			if (col.kind == 'b') != sh.binary {
				return fmt.Errorf("cdc: sync %s: column %q came in %s form, the sync reads %s", s.cfg.Name, sc.name, form(col.kind == 'b'), form(sh.binary))
			}
			v := colVal{data: values.copy(col.data), set: true}
			c.vals[sc.idx] = v
			if goValues {
				format := int16(pgtype.TextFormatCode)
				if sh.binary {
					format = pgtype.BinaryFormatCode
				}
				x, err := decodeValue(tm, v.data, sc.oid, format)
				if err != nil {
					return fmt.Errorf("cdc: sync %s: column %q: %w", s.cfg.Name, sc.name, err)
				}
				c.Row[sc.name] = x
			}
			if sc.key >= 0 {
				if keys != nil {
					keys[sc.key] = v
				} else {
					c.key = string(v.data)
				}
				haveKeys++
			}
		}
		return nil
	})
	if err != nil {
		return change{}, err
	}
	if haveKeys < len(sh.key) {
		for _, k := range sh.key {
			if col, _ := sh.col(k); !c.vals[col.idx].set || c.vals[col.idx].null {
				return change{}, fmt.Errorf("%w: a %s on %s lacks key column %q", ErrNoReplicaIdentity, op, sh.qualified, k)
			}
		}
	}
	if keys != nil {
		c.key = keyOf(keys)
	}
	return c, nil
}

func form(binary bool) string {
	if binary {
		return "binary"
	}
	return "text"
}

func decodeValue(m *pgtype.Map, data []byte, oid uint32, format int16) (any, error) {
	if dt, ok := m.TypeForOID(oid); ok {
		return dt.Codec.DecodeValue(m, oid, format, data)
	}
	return string(data), nil
}

// CaughtUp waits until every change committed on the source before the
// call is applied (the sync's lag is 0 as of the call): the check a
// cutover makes while writes to the source are held. source is a pool on
// the source database.
func (s *Sync) CaughtUp(ctx context.Context, source *pgxpool.Pool) error {
	return s.caughtUp(ctx, source)
}

// caughtUp is CaughtUp reading the position through q (a cutover reads it
// in its own transaction: the held writers may hold every pooled
// connection).
func (s *Sync) caughtUp(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) error {
	var target pglogrepl.LSN
	if err := q.QueryRow(ctx, `SELECT pg_current_wal_flush_lsn()`).Scan(&target); err != nil {
		return fmt.Errorf("cdc: sync %s: read the source's position: %w", s.cfg.Name, err)
	}
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for pglogrepl.LSN(s.applied.Load()) < target {
		select {
		case <-ctx.Done():
			return fmt.Errorf("cdc: sync %s: applied %s, waiting for %s: %w", s.cfg.Name, s.Applied(), target, ctx.Err())
		case <-t.C:
		}
	}
	return nil
}
