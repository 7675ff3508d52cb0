package console

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/dimmer-dev/dimmer/expandcontract"
)

// SchemaPlans is what the console reads of the expand/contract plans;
// *expandcontract.Registry fits.
type SchemaPlans interface {
	Plans(ctx context.Context) ([]expandcontract.Status, error)
}

var _ SchemaPlans = (*expandcontract.Registry)(nil)

// WithSchemaPlans shows, on each migration's page, the schema plans that
// name it (package expandcontract): their stage and every step.
func WithSchemaPlans(p SchemaPlans) Option {
	return func(s *Server) error {
		if p == nil {
			return errors.New("WithSchemaPlans: nil")
		}
		s.plans = p
		return nil
	}
}

// PlanView is one schema plan of a migration.
type PlanView struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	Stage       string `json:"stage"`
	// Running is the phase started and not finished: in progress, or
	// interrupted by a crash or a failed step.
	Running   string     `json:"running,omitempty"`
	Revision  int64      `json:"revision"`
	UpdatedAt time.Time  `json:"updated_at"`
	UpdatedBy string     `json:"updated_by,omitempty"`
	Steps     []StepView `json:"steps"`
}

// StepView is one step of a schema plan.
type StepView struct {
	Phase     string `json:"phase"`
	Name      string `json:"name"`
	State     string `json:"state"`
	Attempts  int    `json:"attempts"`
	LastError string `json:"last_error,omitempty"`
}

func planViews(all []expandcontract.Status, migration string) []PlanView {
	out := []PlanView{}
	for _, st := range all {
		if st.Plan.Migration != migration && st.Plan.Name != migration {
			continue
		}
		v := PlanView{
			Name: st.Plan.Name, Description: st.Plan.Description, Stage: st.Stage.String(), Running: st.Running,
			Revision: st.Revision, UpdatedAt: st.UpdatedAt, UpdatedBy: st.UpdatedBy, Steps: []StepView{},
		}
		for _, sp := range st.Steps {
			state := sp.State
			if state == "" {
				state = "not run"
			}
			v.Steps = append(v.Steps, StepView{Phase: sp.Phase, Name: sp.Name, State: state, Attempts: sp.Attempts, LastError: sp.LastError})
		}
		out = append(out, v)
	}
	return out
}

func planAlerts(views []PlanView) []Alert {
	var out []Alert
	for _, v := range views {
		if v.Running != "" {
			out = append(out, Alert{"warning", fmt.Sprintf("schema plan %s: %s in progress or interrupted (dimmer schema %s %s resumes it)", v.Name, v.Running, v.Running, v.Name)})
		}
		for _, sp := range v.Steps {
			if sp.State == "failed" {
				out = append(out, Alert{"critical", fmt.Sprintf("schema plan %s: step %s/%s failed: %s", v.Name, sp.Phase, sp.Name, sp.LastError)})
			}
		}
	}
	return out
}
