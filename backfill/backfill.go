package backfill

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"

	"github.com/dimmer-dev/dimmer/flags"
)

// DefaultSchema holds the backfill tables unless WithSchema says otherwise.
const DefaultSchema = "dimmer_backfill"

// Backfiller runs, verifies, pauses and reports backfill jobs whose
// checkpoints, leases and verifications live in one Postgres database.
type Backfiller struct {
	pool     *pgxpool.Pool
	schema   string
	t        tables
	store    flags.Store
	logger   *slog.Logger
	workerID string
	meter    metric.Meter
	m        *instruments
}

type tables struct{ meta, jobs, ranges, verifications string }

// Option configures a Backfiller.
type Option func(*Backfiller) error

// WithSchema puts the backfill tables in schema (default "dimmer_backfill").
func WithSchema(schema string) Option {
	return func(b *Backfiller) error {
		if schema == "" {
			return fieldErr("schema", "empty")
		}
		b.schema = schema
		return nil
	}
}

// WithFlagStore lets jobs read their migration's stage and epoch: a job
// refuses to run while the stage is off, records the epoch it copied at, and
// stops when the epoch changes; verifications record the epoch they verified,
// which [VerifiedGuard] compares with the migration's. Without it the epoch
// is taken as 0 and the stage is not checked.
func WithFlagStore(s flags.Store) Option {
	return func(b *Backfiller) error {
		if s == nil {
			return fieldErr("flag store", "nil")
		}
		b.store = s
		return nil
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(b *Backfiller) error {
		if l == nil {
			return fieldErr("logger", "nil")
		}
		b.logger = l
		return nil
	}
}

// WithWorkerID names this process in range leases (default host-pid-random).
func WithWorkerID(id string) Option {
	return func(b *Backfiller) error {
		if id == "" {
			return fieldErr("worker id", "empty")
		}
		b.workerID = id
		return nil
	}
}

// WithMeterProvider records metrics through mp instead of the global one.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(b *Backfiller) error {
		if mp == nil {
			return fieldErr("meter provider", "nil")
		}
		b.meter = mp.Meter("github.com/dimmer-dev/dimmer/backfill")
		return nil
	}
}

// New returns a Backfiller keeping its tables in pool's database. Call
// [Backfiller.Install] once before use.
func New(pool *pgxpool.Pool, opts ...Option) (*Backfiller, error) {
	if pool == nil {
		return nil, fieldErr("pool", "nil")
	}
	b := &Backfiller{pool: pool, schema: DefaultSchema, logger: slog.Default()}
	for _, o := range opts {
		if err := o(b); err != nil {
			return nil, err
		}
	}
	if b.workerID == "" {
		host, _ := os.Hostname()
		var r [3]byte
		_, _ = rand.Read(r[:])
		b.workerID = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(r[:]))
	}
	if b.meter == nil {
		b.meter = otel.GetMeterProvider().Meter("github.com/dimmer-dev/dimmer/backfill")
	}
	m, err := newInstruments(b.meter)
	if err != nil {
		return nil, err
	}
	b.m = m
	q := func(n string) string { return pgx.Identifier{b.schema, n}.Sanitize() }
	b.t = tables{meta: q("backfill_meta"), jobs: q("backfill_jobs"), ranges: q("backfill_ranges"), verifications: q("backfill_verifications")}
	return b, nil
}

// Schema is where the backfill tables are.
func (b *Backfiller) Schema() string { return b.schema }
