package streams

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
)

// Verdict is the outcome of comparing one record across the clusters.
type Verdict uint8

const (
	Match      Verdict = iota
	Missing            // served, never arrived on the compared cluster within the grace
	Extra              // on the compared cluster, never served
	OutOfOrder         // on the compared cluster before a later record of its key
	Payload            // both arrived, with a different key, value or headers
)

var verdictNames = [...]string{"match", "missing", "extra", "out_of_order", "payload"}

func (v Verdict) String() string { return verdictNames[v] }

// ShadowConfig describes a shadow consumption: while the stage compares a
// cluster ([flags.Stage.Compared]: new in shadow, old in live), the topic
// is read on both clusters from where they stand and every record the
// served cluster holds is matched, by origin, with its copy on the
// compared one.
type ShadowConfig struct {
	Migration, Topic string
	Old, New         []kgo.Opt
	Source           StageSource
	// StageKey is the targeting key of the stage evaluation (default Topic).
	StageKey string
	// Grace is how long a record may wait for its counterpart before it
	// counts as missing or extra. Default 30s.
	Grace time.Duration
	// Observer receives one observation per verdict, as shadow reads
	// report them: feed it to a [flags.Watchdog].
	Observer flags.Observer
	// MeterProvider defaults to the global one.
	MeterProvider metric.MeterProvider
	Logger        *slog.Logger
}

// ShadowStats counts verdicts.
type ShadowStats struct {
	// Sessions counts comparisons started (one per stage that compares);
	// each compares what is acknowledged after it started.
	Sessions int64
	Compared int64
	Verdicts [5]int64 // indexed by Verdict
}

// Shadow compares a topic across clusters; see [ShadowConfig].
type Shadow struct {
	cfg     ShadowConfig
	counter metric.Int64Counter

	mu    sync.Mutex
	stats ShadowStats
}

type seenRec struct {
	key, value []byte
	at         time.Time
}

// NewShadow validates cfg.
func NewShadow(cfg ShadowConfig) (*Shadow, error) {
	if cfg.StageKey == "" {
		cfg.StageKey = cfg.Topic
	}
	if cfg.Grace == 0 {
		cfg.Grace = 30 * time.Second
	}
	if cfg.MeterProvider == nil {
		cfg.MeterProvider = otel.GetMeterProvider()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	switch {
	case flags.ValidateName(cfg.Migration) != nil:
		return nil, fmt.Errorf("streams: ShadowConfig.Migration: %w", flags.ValidateName(cfg.Migration))
	case cfg.Topic == "":
		return nil, errors.New("streams: ShadowConfig.Topic is required")
	case len(cfg.Old) == 0:
		return nil, fmt.Errorf("%w: ShadowConfig.Old", ErrMissingCluster)
	case len(cfg.New) == 0:
		return nil, fmt.Errorf("%w: ShadowConfig.New", ErrMissingCluster)
	case cfg.Source == nil:
		return nil, errors.New("streams: ShadowConfig.Source is required")
	case cfg.Grace < 0:
		return nil, errors.New("streams: ShadowConfig.Grace must not be negative")
	}
	c, err := cfg.MeterProvider.Meter("github.com/dimmer-dev/dimmer/streams").Int64Counter("dimmer.streams.shadow.records",
		metric.WithDescription("records compared across clusters by verdict (match, missing, extra, out_of_order, payload)"))
	if err != nil {
		return nil, err
	}
	return &Shadow{cfg: cfg, counter: c}, nil
}

// Stats returns the counters.
func (s *Shadow) Stats() ShadowStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}

func (s *Shadow) stage(ctx context.Context) flags.Stage {
	st, err := s.cfg.Source.Stage(ctx, s.cfg.Migration, s.cfg.StageKey)
	if err != nil {
		s.cfg.Logger.Warn("streams: stage evaluation failed; using the fallback", "migration", s.cfg.Migration, "err", err)
	}
	return st
}

// Run compares until ctx ends (then nil). While the stage compares nothing
// it waits; when the stage changes it starts over from where the clusters
// stand.
func (s *Shadow) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		st := s.stage(ctx)
		if st.Compared() == flags.NoSide {
			select {
			case <-ctx.Done():
			case <-time.After(250 * time.Millisecond):
			}
			continue
		}
		if err := s.session(ctx, st); err != nil {
			return err
		}
	}
	return nil
}

func (s *Shadow) verdict(st flags.Stage, compared flags.Side, v Verdict) {
	s.mu.Lock()
	s.stats.Compared++
	s.stats.Verdicts[v]++
	s.mu.Unlock()
	s.counter.Add(context.Background(), 1, metric.WithAttributes(attribute.String("migration", s.cfg.Migration),
		attribute.String("topic", s.cfg.Topic), attribute.String("verdict", v.String())))
	if s.cfg.Observer != nil {
		bad := v != Match
		s.cfg.Observer.Observe(flags.Observation{Migration: s.cfg.Migration, Stage: st, Op: flags.Read, Side: compared,
			Compared: true, Mismatch: bad, Lasting: bad})
	}
}

// session compares from the clusters' current ends while the stage stays st.
func (s *Shadow) session(ctx context.Context, st flags.Stage) error {
	served, compared := st.Reads(), st.Compared()
	opts := [3][]kgo.Opt{flags.Old: s.cfg.Old, flags.New: s.cfg.New}
	var clients [3]*kgo.Client
	var starts [3]map[int32]int64
	for _, side := range []flags.Side{flags.Old, flags.New} {
		adm, err := kgo.NewClient(opts[side]...)
		if err != nil {
			return fmt.Errorf("streams: shadow %s client: %w", side, err)
		}
		starts[side], err = endOffsets(ctx, kadm.NewClient(adm), s.cfg.Topic)
		adm.Close()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		assign := map[int32]kgo.Offset{}
		for p, o := range starts[side] {
			assign[p] = kgo.NewOffset().At(o)
		}
		cl, err := kgo.NewClient(append(append([]kgo.Opt(nil), opts[side]...),
			kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{s.cfg.Topic: assign}),
			kgo.FetchIsolationLevel(kgo.ReadCommitted()))...)
		if err != nil {
			return fmt.Errorf("streams: shadow %s client: %w", side, err)
		}
		defer cl.Close()
		clients[side] = cl
	}
	s.mu.Lock()
	s.stats.Sessions++
	s.mu.Unlock()
	type arrival struct {
		side flags.Side
		rec  *kgo.Record
	}
	arrivals := make(chan arrival, 1024)
	sctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { stop(); wg.Wait() }() // stop the readers, then wait for them
	for _, side := range []flags.Side{flags.Old, flags.New} {
		wg.Go(func() {
			for sctx.Err() == nil {
				fs := clients[side].PollFetches(sctx)
				fs.EachRecord(func(r *kgo.Record) {
					select {
					case arrivals <- arrival{side, r}:
					case <-sctx.Done():
					}
				})
			}
		})
	}
	// A record and its copy have the same origin, whichever cluster it
	// was first acknowledged by: match them by origin.
	var waiting [3]map[Origin]seenRec // per side: arrived, counterpart not yet
	waiting[flags.Old], waiting[flags.New] = map[Origin]seenRec{}, map[Origin]seenRec{}
	matched := map[Origin]time.Time{} // to recognise duplicate copies
	type keyOrigin struct {
		key  string
		side flags.Side
	}
	lastByKey := map[keyOrigin]int64{} // compared side: last origin offset per key and origin cluster
	tick := time.NewTicker(min(s.cfg.Grace/2+time.Millisecond, time.Second))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			if s.stage(ctx) != st {
				return nil
			}
			now := time.Now()
			for _, side := range []flags.Side{served, compared} {
				v := Missing
				if side == compared {
					v = Extra
				}
				for o, r := range waiting[side] {
					if now.Sub(r.at) > s.cfg.Grace {
						delete(waiting[side], o)
						matched[o] = now // judged: a late counterpart is not judged again
						s.verdict(st, compared, v)
					}
				}
			}
			for o, at := range matched {
				if now.Sub(at) > 2*s.cfg.Grace {
					delete(matched, o)
				}
			}
		case a := <-arrivals:
			o, err := OriginOf(a.rec, a.side)
			if err != nil {
				if a.side == compared {
					s.verdict(st, compared, Extra) // cannot be matched
				}
				continue
			}
			if o.Offset < starts[o.Side][o.Partition] {
				continue // acknowledged before this session began
			}
			if _, dup := matched[o]; dup {
				continue // a copy made twice (a re-sent tail): consumers drop it too
			}
			if _, dup := waiting[a.side][o]; dup {
				continue
			}
			r := seenRec{key: a.rec.Key, value: a.rec.Value, at: time.Now()}
			if a.side == compared {
				ko := keyOrigin{string(a.rec.Key), o.Side}
				if last, ok := lastByKey[ko]; ok && o.Offset < last {
					s.verdict(st, compared, OutOfOrder)
					delete(waiting[a.side.Other()], o)
					matched[o] = time.Now() // judged: its counterpart is not missing
					continue
				}
				lastByKey[ko] = o.Offset
			}
			other := waiting[a.side.Other()]
			if c, ok := other[o]; ok {
				delete(other, o)
				matched[o] = time.Now()
				s.verdict(st, compared, s.compare(r, c))
				continue
			}
			waiting[a.side][o] = r
		}
	}
}

func (s *Shadow) compare(served, compared seenRec) Verdict {
	if !bytes.Equal(served.key, compared.key) || !bytes.Equal(served.value, compared.value) {
		return Payload
	}
	return Match
}
