package cdc

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/dimmer-dev/dimmer/backfill"
)

// applier writes a batch of stream changes to the sync's destination.
type applier struct {
	s     *Sync
	sh    *tableShape
	sinks map[string]*backfill.PGSink // by the sorted list of columns written
}

func (s *Sync) newApplier(sh *tableShape) (*applier, error) {
	return &applier{s: s, sh: sh, sinks: map[string]*backfill.PGSink{}}, nil
}

func (a *applier) target() string {
	t := a.s.cfg.Target
	if t.Schema == "" {
		return pgx.Identifier{t.Name}.Sanitize()
	}
	return pgx.Identifier{t.Schema, t.Name}.Sanitize()
}

func (a *applier) truncate(ctx context.Context, commit time.Time) error {
	if a.s.cfg.Sink != nil {
		return a.s.cfg.Sink(ctx, []Change{{Op: OpTruncate, CommitTime: commit}})
	}
	if _, err := a.s.target.Exec(ctx, `TRUNCATE `+a.target()); err != nil {
		return fmt.Errorf("cdc: sync %s: truncate %s: %w", a.s.cfg.Name, a.target(), err)
	}
	return nil
}

// merged is the net effect of a batch's changes on one key.
type merged struct {
	deleteFirst bool // a delete came before the final upsert: remove the old row, whatever its version
	last        change
	upsert      bool
}

// apply writes a batch. A Go sink gets the changes as they came; a target
// table gets each key's net effect: deletes by key, then version-guarded
// upserts grouped by the columns they carry (an update's unchanged TOAST
// columns are left out, so the target keeps its value).
func (a *applier) apply(ctx context.Context, batch []change) error {
	if a.s.cfg.Sink != nil {
		cs := make([]Change, len(batch))
		for i, c := range batch {
			cs[i] = c.Change
		}
		if err := a.s.cfg.Sink(ctx, cs); err != nil {
			return fmt.Errorf("cdc: sync %s: sink: %w", a.s.cfg.Name, err)
		}
		return nil
	}
	net := make(map[string]*merged, len(batch))
	order := make([]string, 0, len(batch))
	for _, c := range batch {
		k := strings.Join(c.keyText, "\x00")
		m, ok := net[k]
		if !ok {
			m = &merged{}
			net[k] = m
			order = append(order, k)
		}
		switch c.Op {
		case OpDelete:
			m.deleteFirst, m.upsert = true, false
			m.last = c
		default:
			if m.upsert && len(c.Unchanged) > 0 {
				// An earlier change of this batch carries the value the
				// update left unchanged.
				row := make(map[string]any, len(c.Row)+len(c.Unchanged))
				for k, v := range c.Row {
					row[k] = v
				}
				var still []string
				for _, u := range c.Unchanged {
					if v, ok := m.last.Row[u]; ok {
						row[u] = v
					} else {
						still = append(still, u)
					}
				}
				c.Row, c.Unchanged = row, still
			}
			m.last, m.upsert = c, true
		}
	}
	var delKeys [][]string
	groups := map[string][]backfill.Row{}
	var groupCols = map[string][]string{}
	for _, k := range order {
		m := net[k]
		if m.deleteFirst {
			delKeys = append(delKeys, m.last.keyText)
		}
		if !m.upsert {
			continue
		}
		cols := make([]string, 0, len(m.last.Row))
		for c := range m.last.Row {
			cols = append(cols, c)
		}
		slices.Sort(cols)
		sig := strings.Join(cols, "\x00")
		groups[sig] = append(groups[sig], backfill.Row(m.last.Row))
		groupCols[sig] = cols
	}
	if len(delKeys) > 0 {
		if err := a.deleteKeys(ctx, delKeys); err != nil {
			return err
		}
	}
	for sig, rows := range groups {
		sink, err := a.sink(ctx, sig, groupCols[sig])
		if err != nil {
			return err
		}
		if err := sink.Write(ctx, rows); err != nil {
			return fmt.Errorf("cdc: sync %s: apply to %s: %w", a.s.cfg.Name, a.target(), err)
		}
	}
	return nil
}

func (a *applier) sink(ctx context.Context, sig string, cols []string) (*backfill.PGSink, error) {
	if s, ok := a.sinks[sig]; ok {
		return s, nil
	}
	for _, k := range append(slices.Clone(a.sh.key), a.s.cfg.VersionColumn) {
		if !slices.Contains(cols, k) {
			return nil, fmt.Errorf("cdc: sync %s: a change of %s lacks column %q (unchanged TOAST value of a key or version column?)", a.s.cfg.Name, a.sh.qualified, k)
		}
	}
	s, err := backfill.NewPGSink(a.s.target, a.s.cfg.Target)
	if err != nil {
		return nil, err
	}
	if err := s.Open(ctx, backfill.SinkSpec{Key: a.sh.key, Columns: cols, VersionColumn: a.s.cfg.VersionColumn}); err != nil {
		return nil, fmt.Errorf("cdc: sync %s: %w", a.s.cfg.Name, err)
	}
	a.sinks[sig] = s
	return s, nil
}

func (a *applier) deleteKeys(ctx context.Context, keys [][]string) error {
	n := len(a.sh.key)
	arrays := make([]any, n)
	var sel, cols []string
	for i, k := range a.sh.key {
		col, _ := a.sh.col(k)
		vals := make([]string, len(keys))
		for j, key := range keys {
			vals[j] = key[i]
		}
		arrays[i] = vals
		sel = append(sel, fmt.Sprintf("u.c%d::%s", i, col.typ))
		cols = append(cols, pgx.Identifier{k}.Sanitize())
	}
	var params, names []string
	for i := range n {
		params = append(params, fmt.Sprintf("$%d::text[]", i+1))
		names = append(names, fmt.Sprintf("c%d", i))
	}
	q := `DELETE FROM ` + a.target() + ` WHERE (` + strings.Join(cols, ", ") + `) IN (SELECT ` + strings.Join(sel, ", ") +
		` FROM unnest(` + strings.Join(params, ", ") + `) AS u(` + strings.Join(names, ", ") + `))`
	if _, err := a.s.target.Exec(ctx, q, arrays...); err != nil {
		return fmt.Errorf("cdc: sync %s: delete from %s: %w", a.s.cfg.Name, a.target(), err)
	}
	return nil
}
