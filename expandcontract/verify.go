package expandcontract

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// ActionVerify is the audit action of [Registry.VerifyTransform].
const ActionVerify = "verify"

// TransformVerification is a recorded count of the rows whose new shape did
// not match the plan's [Transform], taken by [Registry.VerifyTransform].
type TransformVerification struct {
	// Pending is how many source rows did not match the rule: 0 verifies.
	Pending int64 `json:"pending"`
	// Epoch is the linked migration's epoch when it was counted: a
	// migration that went back to off since (a higher epoch) has a stale
	// new shape, and the verification no longer counts.
	Epoch int64 `json:"epoch"`
	// MigrationStage is the linked migration's stage when it was counted.
	MigrationStage string `json:"migration_stage,omitempty"`
}

// VerifyTransform counts the rows whose new shape does not match the plan's
// [Transform] ([Transform.Pending], run with the plan's search_path) and
// records the count in the audit trail, where the contract's
// backfill-verified check finds it: a plan whose data was moved with its
// Transform (rather than by a job of package backfill, which the
// [VerificationChecker] judges) passes that check once a verification
// since its expand found no row pending, at the migration's current epoch.
//
// Verify while migrating, after the copy and before the migration is
// complete: once only the new shape is written, rows written since no
// longer match a rule that reads the old one. The result is returned, also
// when rows are pending; the error is for what prevented the count.
func (r *Registry) VerifyTransform(ctx context.Context, plan string, req Request) (TransformVerification, error) {
	var v TransformVerification
	if req.Actor == "" {
		req.Actor = "unknown"
	}
	st, err := r.Status(ctx, plan)
	if err != nil {
		return v, err
	}
	if st.Plan.Transform == nil {
		return v, fmt.Errorf("%w %q: it has no Transform, so there is nothing to verify here: its backfill job is verified by package backfill", ErrInvalidPlan, plan)
	}
	if st.Stage != Migrating || st.Running != "" {
		at := st.Stage.String()
		if st.Running != "" {
			at += " with " + st.Running + " in progress"
		}
		return v, fmt.Errorf("%w: plan %s is %s: verify its transform while migrating (after migrate, before contract)", ErrWrongStage, plan, at)
	}
	if st.Plan.Migration != "" && r.flags != nil {
		ms, err := r.flags.Load(ctx, st.Plan.Migration)
		if err != nil {
			return v, fmt.Errorf("expandcontract: verify %s: migration %s: %w", plan, st.Plan.Migration, err)
		}
		v.Epoch, v.MigrationStage = ms.Epoch, ms.String()
	}
	err = pgx.BeginFunc(ctx, r.pool, func(tx pgx.Tx) error {
		if st.SearchPath != "" {
			if _, err := tx.Exec(ctx, `SELECT set_config('search_path', $1, true)`, st.SearchPath); err != nil {
				return err
			}
		}
		v.Pending, err = st.Plan.Transform.Pending(ctx, tx)
		return err
	})
	if err != nil {
		return v, fmt.Errorf("expandcontract: verify %s: %w", plan, err)
	}
	e := AuditEntry{Plan: plan, Actor: req.Actor, Action: ActionVerify, From: st.Stage.String(), To: st.Stage.String(),
		Reason: req.Reason, Outcome: OutcomeApplied, Verification: &v,
		Detail: fmt.Sprintf("transform of %s: %d row(s) pending", st.Plan.Transform.Source, v.Pending)}
	if v.Pending > 0 {
		e.Outcome = OutcomeFailed
	}
	if err := r.appendAudit(ctx, r.pool, e); err != nil {
		return v, fmt.Errorf("expandcontract: verify %s: record: %w", plan, err)
	}
	return v, nil
}

// transformVerified judges the newest transform verification recorded
// since the plan's last expand.
func (r *Registry) transformVerified(ctx context.Context, p Plan) (bool, string) {
	var doc []byte
	err := r.pool.QueryRow(ctx, `SELECT entry FROM `+r.t.audit+` WHERE plan = $1 AND entry->>'action' = $2
	AND id > coalesce((SELECT max(id) FROM `+r.t.audit+` WHERE plan = $1 AND entry->>'action' = 'expand' AND entry->>'outcome' = 'applied'), 0)
ORDER BY id DESC LIMIT 1`, p.Name, ActionVerify).Scan(&doc)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, fmt.Sprintf("its transform was not verified since the expand (run `dimmer schema verify %s`, or Registry.VerifyTransform, while migrating)", p.Name)
	}
	if err != nil {
		return false, fmt.Sprintf("transform verifications unreadable: %v", err)
	}
	var e AuditEntry
	if err := json.Unmarshal(doc, &e); err != nil || e.Verification == nil {
		return false, "the last transform verification is malformed"
	}
	v, at := e.Verification, e.At.UTC().Format(time.RFC3339)
	if v.Pending > 0 {
		return false, fmt.Sprintf("the last transform verification (%s by %s) found %d row(s) not filled", at, e.Actor, v.Pending)
	}
	if p.Migration != "" {
		if r.flags == nil {
			return false, fmt.Sprintf("no flag store configured: whether migration %s went back to off since the transform was verified is unknown", p.Migration)
		}
		ms, err := r.flags.Load(ctx, p.Migration)
		if err != nil {
			return false, fmt.Sprintf("migration %s: flag store unreachable: %v", p.Migration, err)
		}
		if ms.Epoch != v.Epoch {
			return false, fmt.Sprintf("the transform was verified at epoch %d, migration %s is at epoch %d (it went back to off since): verify again", v.Epoch, p.Migration, ms.Epoch)
		}
	}
	return true, fmt.Sprintf("transform verified %s by %s: 0 rows pending (epoch %d, migration %s)", at, e.Actor, v.Epoch, v.MigrationStage)
}
