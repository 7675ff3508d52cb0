package console

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/dimmer-dev/dimmer/flags"
)

var funcs = template.FuncMap{
	"pct":    pct,
	"charts": charts,
	"bytes":  bytesText,
	"ago": func(now, t time.Time) string {
		if t.IsZero() {
			return "never"
		}
		d := now.Sub(t)
		switch {
		case d < time.Second:
			return "just now"
		case d < time.Minute:
			return fmt.Sprintf("%ds ago", int(d.Seconds()))
		case d < time.Hour:
			return fmt.Sprintf("%dm%02ds ago", int(d.Minutes()), int(d.Seconds())%60)
		case d < 48*time.Hour:
			return fmt.Sprintf("%dh%02dm ago", int(d.Hours()), int(d.Minutes())%60)
		}
		return t.UTC().Format("2006-01-02")
	},
	"clock": func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05Z") },
	"stages": func() []string {
		var out []string
		for _, s := range flags.Stages() {
			out = append(out, s.String())
		}
		return out
	},
	"stagePos": func(st flags.State, name string) string {
		s, err := flags.ParseStage(name)
		switch {
		case err != nil:
			return ""
		case s == st.Stage:
			return "current"
		case st.Rollout != nil && s == st.Rollout.Stage:
			return "rollout"
		case s < st.Stage:
			return "done"
		}
		return "ahead"
	},
	"earlier": func(st flags.State) []string {
		var out []string
		for s := st.Stage; s > flags.Off; {
			s--
			out = append(out, s.String())
		}
		return out
	},
	"percentOf": func(r *flags.Rollout) string {
		if r == nil {
			return ""
		}
		return strconv.FormatFloat(math.Round(r.Percent*100)/100, 'f', -1, 64) + "%"
	},
}

// pageView is what the page templates get.
type pageView struct {
	Title   string
	Now     time.Time
	Refresh int64 // milliseconds
	// Events: the page listens to GET /api/events ([WithChanges]).
	Events  bool
	Actions bool
	CSRF    string
	Who     string
	Login   bool // a login session (offers log out)
	Data    any
}

func (s *Server) page(r *http.Request, title string, data any) pageView {
	p := principalOf(r.Context())
	return pageView{
		Title: title, Now: s.now(), Refresh: s.refresh.Milliseconds(), Events: s.changes != nil, Actions: s.actions,
		CSRF: p.csrf, Who: p.operator, Login: !p.viaToken, Data: data,
	}
}

// render executes a template into a buffer first, so a template error is a
// clean 500 and never half a page.
func (s *Server) render(w http.ResponseWriter, name string, data any) {
	var buf bytes.Buffer
	if err := s.tmpl.ExecuteTemplate(&buf, name, data); err != nil {
		s.logger.Error("console template failed", "template", name, "err", err)
		http.Error(w, "500 internal error: template "+name+" failed", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_, _ = w.Write(buf.Bytes())
}

func (s *Server) writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(v); err != nil {
		s.logger.Warn("console response not written", "err", err)
	}
}

// fail answers a data error: a bad migration name is the caller's (400), a
// corrupt stored flag the store's content (500, with the way out), anything
// else is a store that could not answer (502).
func (s *Server) fail(w http.ResponseWriter, err error) {
	var corrupt *flags.CorruptFlagError
	switch {
	case errors.As(err, &corrupt):
		http.Error(w, "500 stored flag is corrupt: "+err.Error()+overwriteHint(corrupt.Migration), http.StatusInternalServerError)
		return
	case errors.Is(err, flags.ErrInvalidName):
		http.Error(w, "400 bad request: "+err.Error(), http.StatusBadRequest)
		return
	}
	s.logger.Warn("console data request failed", "err", err)
	http.Error(w, "502 store unavailable: "+err.Error(), http.StatusBadGateway)
}

func (s *Server) overviewPage(w http.ResponseWriter, r *http.Request) {
	ov, err := s.overview(r.Context())
	if err != nil {
		s.fail(w, err)
		return
	}
	name := "overview"
	if r.URL.Query().Get("part") == "live" {
		name = "overview-live"
	}
	s.render(w, name, s.page(r, "dimmer", ov))
}

func (s *Server) overviewJSON(w http.ResponseWriter, r *http.Request) {
	ov, err := s.overview(r.Context())
	if err != nil {
		s.fail(w, err)
		return
	}
	s.writeJSON(w, ov)
}

func (s *Server) migrationPage(w http.ResponseWriter, r *http.Request) {
	m, err := s.migration(r.Context(), r.PathValue("name"))
	if err != nil {
		s.fail(w, err)
		return
	}
	name := "migration"
	if r.URL.Query().Get("part") == "live" {
		name = "migration-live"
	}
	m.TimelineHTML = s.timelineHTML(m.tl)
	s.render(w, name, s.page(r, m.Name+" - dimmer", m))
}

func (s *Server) migrationJSON(w http.ResponseWriter, r *http.Request) {
	m, err := s.migration(r.Context(), r.PathValue("name"))
	if err != nil {
		s.fail(w, err)
		return
	}
	s.writeJSON(w, m)
}

// ActionResult is what an action answers: the state after it, or the
// refusal with every failed check.
type ActionResult struct {
	Migration string              `json:"migration"`
	Action    string              `json:"action"`
	Applied   bool                `json:"applied"`
	State     *flags.State        `json:"state,omitempty"`
	Describe  string              `json:"describe,omitempty"`
	Error     string              `json:"error,omitempty"`
	Failed    []flags.CheckResult `json:"failed,omitempty"`
}

// act runs one action through the controller, so the guards refuse exactly
// as they do for the CLI, and the controller audits it under the
// operator's name.
func (s *Server) act(w http.ResponseWriter, r *http.Request) {
	name, action := r.PathValue("name"), r.PathValue("action")
	res := ActionResult{Migration: name, Action: action}
	status := s.perform(r, name, action, &res)
	if status == http.StatusOK {
		// Stage changes are audited by the controller; this line is the
		// record of every console action, the others included.
		s.logger.Info("console action applied", "migration", name, "action", action, "operator", principalOf(r.Context()).operator,
			"reason", r.PostFormValue("reason"), "result", res.Describe, "job", r.PostFormValue("job"), "dead_letter", r.PostFormValue("id"))
	} else {
		s.logger.Info("console action not applied", "migration", name, "action", action, "operator", principalOf(r.Context()).operator, "status", status, "err", res.Error)
	}
	w.Header().Set("X-Dimmer-Applied", strconv.FormatBool(res.Applied))
	if strings.Contains(r.Header.Get("Accept"), "application/json") {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(res)
		return
	}
	var buf bytes.Buffer
	if err := s.tmpl.ExecuteTemplate(&buf, "result", res); err != nil {
		http.Error(w, "500 internal error: template result failed", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

// ActionOutcome marks an audit entry of an action that changes no stage
// (a backfill paused or resumed, a dead letter retried or skipped): its
// From names what was acted on and its To what became of it.
const ActionOutcome flags.Outcome = "action"

// auditAction records an applied action in the migration's audit log, at
// the migration's current revision, so the timeline shows every hand on
// the migration, not only stage changes.
func (s *Server) auditAction(ctx context.Context, name, actor, reason, subject, done string, res *ActionResult) {
	cur, err := s.store.Load(ctx, name)
	if err == nil {
		err = s.store.AppendAudit(ctx, flags.AuditEntry{
			Migration: name, At: s.now().UTC(), Actor: actor, From: subject, To: done, Reason: reason,
			Outcome: ActionOutcome, Revision: cur.Revision,
		})
	}
	if err != nil {
		// The action happened: say so, and that the log misses it.
		s.logger.Error("console action applied but not audited", "migration", name, "action", subject, "operator", actor, "err", err)
		res.Describe += " (not recorded in the audit log: " + err.Error() + ")"
	}
}

func (s *Server) perform(r *http.Request, name, action string, res *ActionResult) int {
	bad := func(status int, format string, args ...any) int {
		res.Error = fmt.Sprintf(format, args...)
		return status
	}
	if !s.actions {
		return bad(http.StatusForbidden, "actions are disabled: this console is read-only (start it with --actions)")
	}
	if err := flags.ValidateName(name); err != nil {
		return bad(http.StatusBadRequest, "%v", err)
	}
	reason := strings.TrimSpace(r.PostFormValue("reason"))
	if reason == "" {
		return bad(http.StatusBadRequest, "a reason is required: say why, it goes to the audit log")
	}
	if len(reason) > flags.MaxText {
		return bad(http.StatusBadRequest, "the reason is %d bytes; at most %d are kept in the audit log: shorten it", len(reason), flags.MaxText)
	}
	actor := principalOf(r.Context()).operator + " (console)"
	switch action {
	case "backfill-pause", "backfill-resume", "dead-retry", "dead-skip":
		var status int
		var subject, done string
		if action == "backfill-pause" || action == "backfill-resume" {
			status, subject, done = s.backfillAction(r, name, action, actor, reason, res)
		} else {
			status, subject, done = s.deadAction(r, name, action, res)
		}
		if status == http.StatusOK {
			s.auditAction(r.Context(), name, actor, reason, subject, done, res)
		}
		return status
	}
	ctx := r.Context()
	cur, err := s.store.Load(ctx, name)
	if err != nil {
		return bad(http.StatusBadGateway, "load %s: %v", name, err)
	}
	// The page says what the operator saw: act only on that revision, so a
	// click on a stale page never acts on a state nobody looked at.
	if v := r.PostFormValue("revision"); v != "" {
		seen, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return bad(http.StatusBadRequest, "revision %q: not a number", v)
		}
		if seen != cur.Revision {
			return bad(http.StatusConflict, "%s changed since the page showed it (revision %d, now %d: %s); look again and retry", name, seen, cur.Revision, cur)
		}
	}
	// Forcing overrides failed guards as dimmer stage set … --force does
	// (never a skipped stage): offered for an advance only, on the page the
	// operator looked at, with the migration's name typed as confirmation.
	force := r.PostFormValue("force") != ""
	if force {
		switch {
		case r.PostFormValue("force") != "yes" || action != "advance":
			return bad(http.StatusBadRequest, "force=%q with %s: only an advance can be forced (force=yes)", r.PostFormValue("force"), action)
		case r.PostFormValue("revision") == "":
			return bad(http.StatusBadRequest, "a forced advance needs the revision the page showed")
		case r.PostFormValue("confirm") != name:
			return bad(http.StatusBadRequest, "to force, type the migration's name %q as confirmation", name)
		}
	}
	var st flags.State
	switch action {
	case "advance":
		if cur.Stage == flags.Complete {
			return bad(http.StatusConflict, "%s is already complete", name)
		}
		if force {
			st, err = s.ctrl.Set(ctx, flags.Request{Migration: name, Stage: cur.Stage + 1, Actor: actor, Reason: reason, Force: true})
			break
		}
		st, err = s.ctrl.Advance(ctx, name, actor, reason)
	case "rollback":
		to, perr := flags.ParseStage(r.PostFormValue("stage"))
		if perr != nil {
			return bad(http.StatusBadRequest, "%v", perr)
		}
		// Back to the base stage ends a canary ahead of it: its keys step back.
		canary := cur.Rollout != nil && cur.Rollout.Stage > cur.Stage && to == cur.Stage
		if to >= cur.Stage && !canary {
			return bad(http.StatusBadRequest, "roll back to %s: pick a stage before %s", to, cur)
		}
		st, err = s.ctrl.Set(ctx, flags.Request{Migration: name, Stage: to, Actor: actor, Reason: reason})
	case "rollout":
		to, perr := flags.ParseStage(r.PostFormValue("stage"))
		if perr != nil {
			return bad(http.StatusBadRequest, "%v", perr)
		}
		p, perr := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(r.PostFormValue("percent")), "%"), 64)
		if perr != nil || math.IsNaN(p) || p < 0 || p > 100 {
			return bad(http.StatusBadRequest, "percent %q: want a number from 0 to 100", r.PostFormValue("percent"))
		}
		st, err = s.ctrl.Rollout(ctx, name, to, p, actor, reason)
	default:
		return bad(http.StatusNotFound, "unknown action %q (advance, rollback, rollout, backfill-pause, backfill-resume, dead-retry, dead-skip)", action)
	}
	var refused *flags.RefusedError
	switch {
	case errors.As(err, &refused):
		res.Failed = refused.Failed
		return bad(http.StatusConflict, "%s -> %s refused: %d check(s) failed", refused.From, refused.To, len(refused.Failed))
	case errors.Is(err, flags.ErrConflict):
		return bad(http.StatusConflict, "%v", err)
	case errors.Is(err, flags.ErrUnknownStage), errors.Is(err, flags.ErrInvalidName):
		return bad(http.StatusBadRequest, "%v", err)
	case err != nil:
		return bad(http.StatusBadRequest, "%v", err)
	}
	res.Applied, res.State, res.Describe = true, &st, st.String()
	if force {
		res.Describe += " (FORCED)"
	}
	return http.StatusOK
}
