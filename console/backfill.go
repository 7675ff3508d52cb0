package console

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/dimmer-dev/dimmer/backfill"
)

// Backfills is what the console reads of the backfill jobs and does with
// them; *backfill.Backfiller fits.
type Backfills interface {
	Jobs(ctx context.Context) ([]backfill.JobStatus, error)
	Pause(ctx context.Context, job, reason string) error
	Resume(ctx context.Context, job string) error
}

var _ Backfills = (*backfill.Backfiller)(nil)

// WithBackfills shows each migration's backfill jobs (progress, rate, ETA,
// last verification) and, with [WithActions], lets an operator pause and
// resume them.
func WithBackfills(b Backfills) Option {
	return func(s *Server) error {
		if b == nil {
			return errors.New("WithBackfills: nil")
		}
		s.backfills = b
		return nil
	}
}

// BackfillView is one backfill job of a migration as the page shows it.
type BackfillView struct {
	Name          string        `json:"name"`
	State         string        `json:"state"`
	Done          bool          `json:"done"`
	Paused        bool          `json:"paused"`
	PauseReason   string        `json:"pause_reason,omitempty"`
	Epoch         int64         `json:"epoch"`
	RowsDone      int64         `json:"rows_done"`
	EstimatedRows int64         `json:"estimated_rows"`
	Percent       float64       `json:"percent"`
	RowsPerSecond float64       `json:"rows_per_second"`
	ETA           time.Duration `json:"eta_ns"`
	Workers       int           `json:"workers"`
	// Verified is "never", "ok at epoch N" or "FAILED at epoch N: ...".
	Verified   string `json:"verified"`
	VerifiedOK bool   `json:"verified_ok"`
	// Stale: verified at an earlier epoch than the migration's (it went
	// back to off since), so the backfill-verified guard will refuse.
	Stale bool `json:"stale"`
}

// backfillViews turns the stored jobs of migration into views.
func backfillViews(jobs []backfill.JobStatus, migration string, epoch int64) []BackfillView {
	out := []BackfillView{}
	for _, j := range jobs {
		if j.Migration != migration {
			continue
		}
		v := BackfillView{
			Name: j.Name, Done: j.Done, Paused: j.Paused, PauseReason: j.PauseReason, Epoch: j.Epoch,
			RowsDone: j.RowsDone, EstimatedRows: j.EstimatedRows, RowsPerSecond: j.RowsPerSecond, ETA: j.ETA,
			Workers: len(j.Leases), Verified: "never",
		}
		switch {
		case j.Done:
			v.State, v.Percent = "done", 100
		case j.Paused:
			v.State = "paused"
		case len(j.Leases) > 0:
			v.State = fmt.Sprintf("running (%d workers)", len(j.Leases))
		default:
			v.State = "stopped"
		}
		if !j.Done && j.EstimatedRows > 0 {
			v.Percent = min(99.9, 100*float64(j.RowsDone)/float64(j.EstimatedRows))
		}
		if lv := j.LastVerification; lv != nil {
			v.VerifiedOK = lv.OK
			v.Stale = lv.Epoch < epoch
			if lv.OK {
				v.Verified = fmt.Sprintf("ok at epoch %d (%s)", lv.Epoch, lv.FinishedAt.UTC().Format("2006-01-02 15:04:05Z"))
			} else {
				v.Verified = fmt.Sprintf("FAILED at epoch %d: %s", lv.Epoch, strings.Join(lv.Problems, "; "))
			}
		}
		out = append(out, v)
	}
	return out
}

func backfillAlerts(views []BackfillView) []Alert {
	var out []Alert
	for _, v := range views {
		switch {
		case v.Verified != "never" && !v.VerifiedOK:
			out = append(out, Alert{"critical", fmt.Sprintf("backfill %s: verification %s", v.Name, v.Verified)})
		case v.Paused:
			out = append(out, Alert{"warning", fmt.Sprintf("backfill %s is paused: %s", v.Name, v.PauseReason)})
		}
	}
	return out
}

// backfillAction pauses or resumes one of the migration's jobs; applied,
// it names the job and what became of it for the audit log.
func (s *Server) backfillAction(r *http.Request, name, action, operator, reason string, res *ActionResult) (status int, subject, done string) {
	if s.backfills == nil {
		res.Error = "no backfill tables are configured for this console"
		return http.StatusNotFound, "", ""
	}
	job := strings.TrimSpace(r.PostFormValue("job"))
	jobs, err := s.backfills.Jobs(r.Context())
	if err != nil {
		res.Error = fmt.Sprintf("backfill jobs: %v", err)
		return http.StatusBadGateway, "", ""
	}
	found := false
	for _, j := range jobs {
		found = found || (j.Name == job && j.Migration == name)
	}
	if !found {
		res.Error = fmt.Sprintf("%s has no backfill job %q", name, job)
		return http.StatusBadRequest, "", ""
	}
	if action == "backfill-pause" {
		err = s.backfills.Pause(r.Context(), job, reason+" ("+operator+")")
	} else {
		err = s.backfills.Resume(r.Context(), job)
	}
	if err != nil {
		res.Error = fmt.Sprintf("%s %s: %v", action, job, err)
		return http.StatusBadGateway, "", ""
	}
	done = map[bool]string{true: "paused", false: "resumed"}[action == "backfill-pause"]
	res.Applied = true
	res.Describe = fmt.Sprintf("backfill %s %s", job, done)
	return http.StatusOK, "backfill " + job, done
}
