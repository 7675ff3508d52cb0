package redisflags

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/metric"

	"github.com/dimmer-dev/dimmer/flags"
)

// DefaultPrefix starts every key (and the channel) unless [WithPrefix] says
// otherwise.
const DefaultPrefix = "dimmer:"

// Option configures a [Store] or a [Provider].
type Option func(*config) error

type config struct {
	prefix string
	resync time.Duration
	logger *slog.Logger
	meter  metric.MeterProvider
}

func newConfig(opts []Option) (config, error) {
	c := config{prefix: DefaultPrefix, resync: 5 * time.Second, logger: slog.Default()}
	for _, o := range opts {
		if o == nil {
			return c, errors.New("redisflags: nil option")
		}
		if err := o(&c); err != nil {
			return c, err
		}
	}
	return c, nil
}

// WithPrefix sets the prefix of every key and of the channel (default
// "dimmer:"), so several stores share one Redis without meeting.
func WithPrefix(p string) Option {
	return func(c *config) error {
		if p == "" || strings.ContainsAny(p, "{}") {
			return fmt.Errorf("redisflags: WithPrefix(%q): the prefix must be non-empty and contain no braces (the keys carry their own hash tags)", p)
		}
		c.prefix = p
		return nil
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(c *config) error {
		if l == nil {
			return errors.New("redisflags: WithLogger: logger is nil")
		}
		c.logger = l
		return nil
	}
}

// WithMeterProvider sets where a provider's metrics go (default no-op):
// dimmer.flags.corrupt (flags whose stored document does not decode) and
// dimmer.flags.parse_errors (each change to such a document). Stores ignore
// it.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(c *config) error {
		if mp == nil {
			return errors.New("redisflags: WithMeterProvider: meter provider is nil")
		}
		c.meter = mp
		return nil
	}
}

// WithResyncInterval bounds how long a provider can miss a change whose
// message was lost: every interval it reloads all flags (default 5s). Stores
// ignore it.
func WithResyncInterval(d time.Duration) Option {
	return func(c *config) error {
		if d <= 0 {
			return fmt.Errorf("redisflags: WithResyncInterval(%v): the interval must be positive", d)
		}
		c.resync = d
		return nil
	}
}

// keys names everything a store keeps under its prefix. The stage keys share
// the hash tag {stage} and the fleet keys {fleet}, so each script touches one
// Cluster slot.
type keys struct {
	flags, revisions, auditPrefix string
	fleetDocs, fleetExpiry        string
	channel                       string
}

func newKeys(prefix string) keys {
	return keys{
		flags:       prefix + "{stage}:flags",
		revisions:   prefix + "{stage}:revisions",
		auditPrefix: prefix + "{stage}:audit:",
		fleetDocs:   prefix + "{fleet}:instances",
		fleetExpiry: prefix + "{fleet}:expiry",
		channel:     Channel(prefix),
	}
}

// Channel is the pub/sub channel of the stage flags stored under prefix.
func Channel(prefix string) string { return prefix + "stage_flags" }

// Store is the Redis implementation of [flags.Store] and [flags.FleetStore].
// It is safe for concurrent use.
type Store struct {
	client redis.UniversalClient
	cfg    config
	k      keys
}

var (
	_ flags.Store      = (*Store)(nil)
	_ flags.FleetStore = (*Store)(nil)
)

// NewStore returns a store over client. Nothing needs installing.
func NewStore(client redis.UniversalClient, opts ...Option) (*Store, error) {
	if client == nil {
		return nil, errors.New("redisflags.NewStore: client is nil")
	}
	cfg, err := newConfig(opts)
	if err != nil {
		return nil, err
	}
	return &Store{client: client, cfg: cfg, k: newKeys(cfg.prefix)}, nil
}

// Prefix is the prefix of the store's keys.
func (s *Store) Prefix() string { return s.cfg.prefix }

// Channel is the channel every applied change is published on.
func (s *Store) Channel() string { return s.k.channel }

// decode parses a stored document and checks it belongs to migration and
// carries the revision the revisions hash keeps for it (rev, 0 when
// absent), which is the one a swap compares; one that does not is a
// *flags.CorruptFlagError with that revision, which a forced change
// overwrites.
func decode(migration string, doc string, rev int64) (flags.State, error) {
	st, err := flags.DecodeStateOf(migration, []byte(doc))
	if err == nil && st.Revision != rev {
		err = fmt.Errorf("flag %s: the document says revision %d, the store's revision is %d", migration, st.Revision, rev)
	}
	if err != nil {
		return flags.State{}, fmt.Errorf("redisflags: %w", &flags.CorruptFlagError{Migration: migration, Revision: rev, Raw: []byte(doc), Err: err})
	}
	return st, nil
}

// Load implements [flags.Store].
func (s *Store) Load(ctx context.Context, migration string) (flags.State, error) {
	if err := flags.ValidateName(migration); err != nil {
		return flags.State{}, err
	}
	var doc, rev *redis.StringCmd
	if _, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		doc = p.HGet(ctx, s.k.flags, migration)
		rev = p.HGet(ctx, s.k.revisions, migration)
		return nil
	}); err != nil && !errors.Is(err, redis.Nil) {
		return flags.State{}, fmt.Errorf("redisflags: load %s: %w", migration, err)
	}
	if errors.Is(doc.Err(), redis.Nil) {
		return flags.State{Migration: migration, Stage: flags.Off}, nil
	}
	n, _ := rev.Int64()
	return decode(migration, doc.Val(), n)
}

// swapScript checks the revision, stores the document and revision, appends
// the audit entry and publishes the change, all or nothing. It returns -1
// when applied, else the current revision.
var swapScript = redis.NewScript(`
local cur = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if cur ~= tonumber(ARGV[2]) then return cur end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[7])
redis.call('LPUSH', KEYS[3], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return -1
`)

// Swap implements [flags.Store] with one Lua script, so the revision check,
// the write, the audit entry and the published message are one atomic step.
func (s *Store) Swap(ctx context.Context, expectRevision int64, next flags.State, entry flags.AuditEntry) (flags.State, error) {
	sw, err := flags.PrepareSwap(expectRevision, next, entry)
	if err != nil {
		return flags.State{}, fmt.Errorf("redisflags: swap: %w", err)
	}
	m, next, doc, entryDoc := sw.State.Migration, sw.State, sw.Doc, sw.EntryDoc
	cur, err := swapScript.Run(ctx, s.client,
		[]string{s.k.flags, s.k.revisions, s.k.auditPrefix + m},
		m, expectRevision, doc, entryDoc, s.k.channel, payload(m, doc), next.Revision).Int64()
	if err != nil {
		return flags.State{}, fmt.Errorf("redisflags: swap %s: %w", m, err)
	}
	if cur != -1 {
		return flags.State{}, &flags.ConflictError{Migration: m, Expected: expectRevision, Current: cur}
	}
	return next, nil
}

// payload is "<migration>\n<document>".
func payload(migration string, doc []byte) string { return migration + "\n" + string(doc) }

func parsePayload(p string) (migration string, doc []byte) {
	m, d, ok := strings.Cut(p, "\n")
	if !ok {
		return p, nil
	}
	return m, []byte(d)
}

// Migrations implements [flags.Store], in name order. A stored document that
// does not decode is a *flags.CorruptFlagError in the returned error, which
// joins one per corrupt migration; every other migration is still returned.
func (s *Store) Migrations(ctx context.Context) ([]flags.State, error) {
	var docs, revs *redis.MapStringStringCmd
	if _, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		docs = p.HGetAll(ctx, s.k.flags)
		revs = p.HGetAll(ctx, s.k.revisions)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("redisflags: list migrations: %w", err)
	}
	all, revOf := docs.Val(), revs.Val()
	out := make([]flags.State, 0, len(all))
	var bad []error
	for m, doc := range all {
		rev, _ := strconv.ParseInt(revOf[m], 10, 64)
		st, err := decode(m, doc, rev)
		if err != nil {
			bad = append(bad, err)
			continue
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b flags.State) int { return strings.Compare(a.Migration, b.Migration) })
	if len(bad) > 0 {
		return out, errors.Join(bad...)
	}
	return out, nil
}

// AppendAudit implements [flags.Store].
func (s *Store) AppendAudit(ctx context.Context, entry flags.AuditEntry) error {
	if err := flags.ValidateName(entry.Migration); err != nil {
		return fmt.Errorf("redisflags: append audit: %w", err)
	}
	if entry.At.IsZero() {
		entry.At = time.Now().UTC()
	}
	doc, err := json.Marshal(entry.Capped())
	if err != nil {
		return fmt.Errorf("redisflags: append audit %s: %w", entry.Migration, err)
	}
	if err := s.client.LPush(ctx, s.k.auditPrefix+entry.Migration, doc).Err(); err != nil {
		return fmt.Errorf("redisflags: append audit %s: %w", entry.Migration, err)
	}
	return nil
}

// Audit implements [flags.Store].
func (s *Store) Audit(ctx context.Context, migration string, limit int) ([]flags.AuditEntry, error) {
	if err := flags.ValidateName(migration); err != nil {
		return nil, fmt.Errorf("redisflags: audit: %w", err)
	}
	stop := int64(-1)
	if limit > 0 {
		stop = int64(limit) - 1
	}
	docs, err := s.client.LRange(ctx, s.k.auditPrefix+migration, 0, stop).Result()
	if err != nil {
		return nil, fmt.Errorf("redisflags: audit %s: %w", migration, err)
	}
	out := make([]flags.AuditEntry, 0, len(docs))
	for _, d := range docs {
		out = append(out, flags.DecodeAuditEntry(migration, []byte(d)))
	}
	return out, nil
}

// Fleet scripts use the server's clock (TIME), so instances with skewed
// clocks agree on who is alive.
var (
	heartbeatScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
`)
	// instancesScript prunes expired instances and returns the live ones.
	instancesScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(dead) do redis.call('HDEL', KEYS[1], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
local out = {}
for _, id in ipairs(ids) do
	local doc = redis.call('HGET', KEYS[1], id)
	if doc then table.insert(out, doc) end
end
return out
`)
)

// Heartbeat implements [flags.FleetStore].
func (s *Store) Heartbeat(ctx context.Context, inst flags.Instance, ttl time.Duration) error {
	if inst.ID == "" {
		return errors.New("redisflags: heartbeat: instance ID is empty")
	}
	if ttl <= 0 {
		return fmt.Errorf("redisflags: heartbeat %s: ttl %v must be positive", inst.ID, ttl)
	}
	if inst.SeenAt.IsZero() {
		inst.SeenAt = time.Now().UTC()
	}
	doc, err := json.Marshal(inst)
	if err != nil {
		return fmt.Errorf("redisflags: heartbeat %s: %w", inst.ID, err)
	}
	if err := heartbeatScript.Run(ctx, s.client, []string{s.k.fleetDocs, s.k.fleetExpiry},
		inst.ID, doc, max(ttl.Milliseconds(), 1)).Err(); err != nil {
		return fmt.Errorf("redisflags: heartbeat %s: %w", inst.ID, err)
	}
	return nil
}

// Instances implements [flags.FleetStore], in ID order.
func (s *Store) Instances(ctx context.Context) ([]flags.Instance, error) {
	docs, err := instancesScript.Run(ctx, s.client, []string{s.k.fleetDocs, s.k.fleetExpiry}).StringSlice()
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("redisflags: instances: %w", err)
	}
	out := make([]flags.Instance, 0, len(docs))
	for _, d := range docs {
		var in flags.Instance
		if err := json.Unmarshal([]byte(d), &in); err != nil {
			return nil, fmt.Errorf("redisflags: instances: decode: %w", err)
		}
		out = append(out, in)
	}
	slices.SortFunc(out, func(a, b flags.Instance) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// Deregister implements [flags.FleetStore]; an unknown ID is not an error.
func (s *Store) Deregister(ctx context.Context, id string) error {
	if id == "" {
		return errors.New("redisflags: deregister: instance ID is empty")
	}
	_, err := s.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.HDel(ctx, s.k.fleetDocs, id)
		p.ZRem(ctx, s.k.fleetExpiry, id)
		return nil
	})
	if err != nil {
		return fmt.Errorf("redisflags: deregister %s: %w", id, err)
	}
	return nil
}
