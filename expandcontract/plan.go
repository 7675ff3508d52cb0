package expandcontract

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/dimmer-dev/dimmer/flags"
)

// The phases a plan's steps belong to.
const (
	PhaseExpand   = "expand"
	PhaseContract = "contract"
	PhaseRollback = "rollback"
)

// Step is one DDL statement (or a few) of a phase.
type Step struct {
	// Name identifies the step in the registry; progress is kept per name,
	// so a resumed phase skips the steps already applied.
	Name string `json:"name"`
	// SQL runs in one transaction together with the record that the step
	// was applied, under lock_timeout: a crash or a lock timeout leaves
	// nothing of it behind, and it is simply run again. Several statements
	// separated by ';' are allowed in a transactional step.
	SQL string `json:"sql"`
	// Concurrently runs SQL outside a transaction, as CREATE INDEX
	// CONCURRENTLY and DROP INDEX CONCURRENTLY require. Such a step cannot
	// be atomic with its record, so its SQL must be idempotent (IF NOT
	// EXISTS / IF EXISTS). Before each attempt an index the step builds is
	// looked up: a valid one means a previous run finished (the step is
	// recorded and skipped), an invalid one, left by a crash or a cancelled
	// build, is dropped concurrently and built again.
	Concurrently bool `json:"concurrently,omitempty"`
	// Index is the index a concurrent step builds, as SQL would name it
	// (quoted where SQL quotes it, schema-qualified or resolved through the
	// plan's search_path). When empty it is read from a CREATE [UNIQUE]
	// INDEX CONCURRENTLY statement in SQL; a step that builds an index
	// whose name cannot be read there must set it. After every build the
	// index is looked up by its identity (its oid) and must be valid.
	Index string `json:"index,omitempty"`
}

// identRE is one SQL identifier as Postgres reads it: double-quoted (with
// "" for a quote), or unquoted, where any non-ASCII character counts as a
// letter (idx_émail is a valid unquoted name).
const identRE = `(?:"(?:[^"]|"")+"|[\p{L}_\x{80}-\x{10FFFF}][\p{L}\p{N}_$\x{80}-\x{10FFFF}]*)`

var createIndexRE = regexp.MustCompile(`(?is)\bCREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?(` + identRE + `(?:\s*\.\s*` + identRE + `)?)\s+ON\b`)

var createsIndexRE = regexp.MustCompile(`(?is)\bCREATE\s+(?:UNIQUE\s+)?INDEX\b`)

// builtIndex is the index a concurrent step creates, as SQL text that
// to_regclass resolves, or "".
func (s Step) builtIndex() string {
	if !s.Concurrently {
		return ""
	}
	if s.Index != "" {
		return s.Index
	}
	if m := createIndexRE.FindStringSubmatch(s.SQL); m != nil {
		return m[1]
	}
	return ""
}

// Plan is one schema change, as code: the Expand steps add the new shape
// beside the old one, the data moves under the linked dimmer migration (dual
// writes through package dualwrite, reads switched by shadowread, the rows
// copied by a backfill), and the Contract steps remove the old shape.
// Rollback steps undo Expand; they run only before any contract step ran.
type Plan struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	// Migration is the dimmer migration (stage flag) moving the data; the
	// contract waits for it to be complete, a rollback for it to be off.
	// Empty for a plan that moves no data (an index swap).
	Migration string `json:"migration,omitempty"`
	// Backfill says the linked migration's rows are copied by a backfill:
	// the contract waits until it is verified (asked through
	// [VerificationChecker]).
	Backfill bool   `json:"backfill,omitempty"`
	Expand   []Step `json:"expand"`
	Contract []Step `json:"contract"`
	Rollback []Step `json:"rollback,omitempty"`
	// Transform is how the backfill fills the new shape from the old, when
	// the plan was made by a helper. Informational for the registry.
	Transform *Transform `json:"transform,omitempty"`
}

// Steps returns the steps of a phase.
func (p Plan) Steps(phase string) []Step {
	switch phase {
	case PhaseExpand:
		return p.Expand
	case PhaseContract:
		return p.Contract
	case PhaseRollback:
		return p.Rollback
	}
	return nil
}

// Validate names every problem of the plan.
func (p Plan) Validate() error {
	var errs []error
	if err := ValidateName(p.Name); err != nil {
		errs = append(errs, fmt.Errorf("Name: %w", err))
	}
	if p.Migration != "" {
		if err := flags.ValidateName(p.Migration); err != nil {
			errs = append(errs, fmt.Errorf("Migration: %w", err))
		}
	} else if p.Backfill {
		errs = append(errs, errors.New("Backfill is set but Migration is empty: a backfill belongs to a migration"))
	}
	if !utf8.ValidString(p.Description) {
		errs = append(errs, errors.New("Description is not valid UTF-8"))
	}
	if len(p.Expand) == 0 && len(p.Contract) == 0 {
		errs = append(errs, errors.New("Expand and Contract are both empty: nothing to do"))
	}
	for _, phase := range []string{PhaseExpand, PhaseContract, PhaseRollback} {
		seen := map[string]bool{}
		for i, s := range p.Steps(phase) {
			where := fmt.Sprintf("%s step %d", phase, i+1)
			if s.Name != "" {
				where += " (" + s.Name + ")"
			}
			if err := ValidateName(s.Name); err != nil {
				errs = append(errs, fmt.Errorf("%s: Name: %w", where, err))
			} else if seen[s.Name] {
				errs = append(errs, fmt.Errorf("%s: Name %q is used twice in %s", where, s.Name, phase))
			}
			seen[s.Name] = true
			if strings.TrimSpace(s.SQL) == "" {
				errs = append(errs, fmt.Errorf("%s: SQL is empty", where))
			} else if !utf8.ValidString(s.SQL) {
				errs = append(errs, fmt.Errorf("%s: SQL is not valid UTF-8 (the registry stores it as JSON text)", where))
			}
			if s.Concurrently && s.Index == "" && createsIndexRE.MatchString(s.SQL) && s.builtIndex() == "" {
				errs = append(errs, fmt.Errorf("%s: the index this concurrent step builds has no name the registry can find: name it in the SQL or in Index, so its validity can be checked after the build", where))
			}
			if !utf8.ValidString(s.Index) {
				errs = append(errs, fmt.Errorf("%s: Index is not valid UTF-8", where))
			}
		}
	}
	if p.Transform != nil {
		if err := p.Transform.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("Transform: %w", err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w %q: %w", ErrInvalidPlan, p.Name, errors.Join(errs...))
	}
	return nil
}

// Assignment sets a column of the new shape to an SQL expression over the
// source row's columns.
type Assignment struct {
	Column string `json:"column"`
	Expr   string `json:"expr"`
}

// Transform is the backfill's rule for one plan: which rows (Source, keyed
// by the single column Key) fill which columns of the new shape. With
// Target empty the new columns live in Source itself and are updated in
// place; otherwise rows are inserted into Target, whose column TargetKey
// holds Source's key.
//
// It plugs into a backfill as its per-chunk copy: run [Transform.ChunkSQL]
// with the chunk's key bounds (or call [Transform.Apply]). Both forms are
// idempotent and never overwrite what dual writes already wrote with the
// same value, so a chunk may run again after a crash. [Transform.Pending]
// counts rows whose new shape does not match the rule yet: zero is what a
// verification wants.
type Transform struct {
	Source    string       `json:"source"`
	Key       string       `json:"key"`
	Target    string       `json:"target,omitempty"`
	TargetKey string       `json:"target_key,omitempty"`
	Set       []Assignment `json:"set"`
}

// Validate names what is missing.
func (t Transform) Validate() error {
	var errs []error
	if t.Source == "" {
		errs = append(errs, errors.New("Source is empty"))
	}
	if t.Key == "" {
		errs = append(errs, errors.New("Key is empty"))
	}
	if t.Target != "" && t.TargetKey == "" {
		errs = append(errs, errors.New("TargetKey is empty while Target is set"))
	}
	if len(t.Set) == 0 {
		errs = append(errs, errors.New("Set is empty"))
	}
	for i, a := range t.Set {
		if a.Column == "" || strings.TrimSpace(a.Expr) == "" {
			errs = append(errs, fmt.Errorf("Set[%d]: column and expression are both required", i))
		}
		if !utf8.ValidString(a.Column) || !utf8.ValidString(a.Expr) {
			errs = append(errs, fmt.Errorf("Set[%d]: not valid UTF-8", i))
		}
	}
	for _, f := range []struct{ name, v string }{{"Source", t.Source}, {"Key", t.Key}, {"Target", t.Target}, {"TargetKey", t.TargetKey}} {
		if !utf8.ValidString(f.v) {
			errs = append(errs, fmt.Errorf("%s is not valid UTF-8", f.name))
		}
	}
	return errors.Join(errs...)
}

// ChunkSQL is the statement applying the transform to the source rows whose
// key k satisfies $1 < k <= $2 (keyset chunks: pass the previous chunk's
// last key and this chunk's last key).
func (t Transform) ChunkSQL() string {
	key := ident(t.Key)
	bounds := fmt.Sprintf("%s > $1 AND %s <= $2", key, key)
	if t.Target == "" {
		sets := make([]string, len(t.Set))
		diffs := make([]string, len(t.Set))
		for i, a := range t.Set {
			sets[i] = fmt.Sprintf("%s = (%s)", ident(a.Column), a.Expr)
			diffs[i] = fmt.Sprintf("%s IS DISTINCT FROM (%s)", ident(a.Column), a.Expr)
		}
		return fmt.Sprintf("UPDATE %s SET %s WHERE %s AND (%s)",
			ident(t.Source), strings.Join(sets, ", "), bounds, strings.Join(diffs, " OR "))
	}
	cols := []string{ident(t.TargetKey)}
	exprs := []string{key}
	for _, a := range t.Set {
		cols = append(cols, ident(a.Column))
		exprs = append(exprs, "("+a.Expr+")")
	}
	return fmt.Sprintf("INSERT INTO %s (%s) SELECT %s FROM %s WHERE %s ON CONFLICT (%s) DO NOTHING",
		ident(t.Target), strings.Join(cols, ", "), strings.Join(exprs, ", "), ident(t.Source), bounds, ident(t.TargetKey))
}

// PendingSQL counts the source rows whose new shape does not match the rule.
func (t Transform) PendingSQL() string {
	if t.Target == "" {
		diffs := make([]string, len(t.Set))
		for i, a := range t.Set {
			diffs[i] = fmt.Sprintf("%s IS DISTINCT FROM (%s)", ident(a.Column), a.Expr)
		}
		return fmt.Sprintf("SELECT count(*) FROM %s WHERE %s", ident(t.Source), strings.Join(diffs, " OR "))
	}
	// The expressions are evaluated in a subquery over Source alone so that
	// a column name both tables have resolves to Source's.
	exprs := []string{ident(t.Key) + " AS k"}
	match := []string{fmt.Sprintf("t.%s = s.k", ident(t.TargetKey))}
	for i, a := range t.Set {
		exprs = append(exprs, fmt.Sprintf("(%s) AS v%d", a.Expr, i))
		match = append(match, fmt.Sprintf("t.%s IS NOT DISTINCT FROM s.v%d", ident(a.Column), i))
	}
	return fmt.Sprintf("SELECT count(*) FROM (SELECT %s FROM %s) s WHERE NOT EXISTS (SELECT 1 FROM %s t WHERE %s)",
		strings.Join(exprs, ", "), ident(t.Source), ident(t.Target), strings.Join(match, " AND "))
}

// DB is what the transform runs on: a *pgxpool.Pool, *pgx.Conn or pgx.Tx.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// Apply runs [Transform.ChunkSQL] for after < key <= upTo and returns how
// many rows it changed.
func (t Transform) Apply(ctx context.Context, db DB, after, upTo any) (int64, error) {
	tag, err := db.Exec(ctx, t.ChunkSQL(), after, upTo)
	if err != nil {
		return 0, fmt.Errorf("transform %s: %w", t.Source, err)
	}
	return tag.RowsAffected(), nil
}

// Pending runs [Transform.PendingSQL].
func (t Transform) Pending(ctx context.Context, db DB) (int64, error) {
	var n int64
	if err := db.QueryRow(ctx, t.PendingSQL()).Scan(&n); err != nil {
		return 0, fmt.Errorf("transform %s: pending rows: %w", t.Source, err)
	}
	return n, nil
}

// ident quotes a possibly schema-qualified name ("app.users").
func ident(name string) string {
	return pgx.Identifier(strings.Split(name, ".")).Sanitize()
}
