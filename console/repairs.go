package console

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/dimmer-dev/dimmer/dualwrite"
	"github.com/dimmer-dev/dimmer/outbox"
)

// RepairLog is what the console reads of a migration's repair log (package
// dualwrite's failed secondary writes, in the outbox) and does with its dead
// letters. [OutboxRepairs] adapts an *outbox.Outbox and its database.
type RepairLog interface {
	TopicStats(ctx context.Context, topic string) (outbox.Stats, error)
	DeadLetters(ctx context.Context, topic string, limit int) ([]outbox.DeadLetter, error)
	RetryDead(ctx context.Context, id uuid.UUID) error
	SkipDead(ctx context.Context, id uuid.UUID) (outbox.DeadLetter, error)
}

// RepairDB is the database holding the outbox: *pgxpool.Pool fits.
type RepairDB interface {
	outbox.Querier
	outbox.Execer
}

// OutboxRepairs is the [RepairLog] of the outbox ob in db.
func OutboxRepairs(ob *outbox.Outbox, db RepairDB) RepairLog { return outboxRepairs{ob, db} }

type outboxRepairs struct {
	ob *outbox.Outbox
	db RepairDB
}

func (o outboxRepairs) TopicStats(ctx context.Context, topic string) (outbox.Stats, error) {
	return o.ob.TopicStats(ctx, o.db, topic)
}
func (o outboxRepairs) DeadLetters(ctx context.Context, topic string, limit int) ([]outbox.DeadLetter, error) {
	return o.ob.DeadLetters(ctx, o.db, topic, limit)
}
func (o outboxRepairs) RetryDead(ctx context.Context, id uuid.UUID) error {
	return o.ob.RetryDead(ctx, o.db, id)
}
func (o outboxRepairs) SkipDead(ctx context.Context, id uuid.UUID) (outbox.DeadLetter, error) {
	return o.ob.SkipDead(ctx, o.db, id)
}

// WithRepairs shows each migration's repair backlog and dead letters and,
// with [WithActions], lets an operator retry or skip a dead letter.
func WithRepairs(r RepairLog) Option {
	return func(s *Server) error {
		if r == nil {
			return errors.New("WithRepairs: nil")
		}
		s.repairs = r
		return nil
	}
}

// deadLettersShown is how many dead letters a page lists.
const deadLettersShown = 20

// RepairView is a migration's repair log as the page shows it.
type RepairView struct {
	Topic   string        `json:"topic"`
	Pending int64         `json:"pending"`
	Dead    int64         `json:"dead"`
	Oldest  time.Duration `json:"oldest_ns"`
	// DeadLetters are the oldest dead letters, at most 20.
	DeadLetters []DeadLetterView `json:"dead_letters"`
	Error       string           `json:"error,omitempty"`
}

// DeadLetterView is one dead letter.
type DeadLetterView struct {
	ID        string    `json:"id"`
	Key       string    `json:"key"`
	Attempts  int       `json:"attempts"`
	LastError string    `json:"last_error"`
	DeadAt    time.Time `json:"dead_at"`
	Waiting   int       `json:"waiting"`
}

func (s *Server) repairView(ctx context.Context, migration string) *RepairView {
	if s.repairs == nil {
		return nil
	}
	v := &RepairView{Topic: dualwrite.RepairTopic(migration), DeadLetters: []DeadLetterView{}}
	st, err := s.repairs.TopicStats(ctx, v.Topic)
	if err != nil {
		v.Error = err.Error()
		return v
	}
	v.Pending, v.Dead, v.Oldest = st.Pending, st.Dead, st.Oldest
	if st.Dead == 0 {
		return v
	}
	dead, err := s.repairs.DeadLetters(ctx, v.Topic, deadLettersShown)
	if err != nil {
		v.Error = err.Error()
		return v
	}
	for _, d := range dead {
		v.DeadLetters = append(v.DeadLetters, DeadLetterView{
			ID: d.ID.String(), Key: d.Key, Attempts: d.Attempts, LastError: d.LastError, DeadAt: d.DeadAt, Waiting: d.Waiting,
		})
	}
	return v
}

func repairAlerts(v *RepairView) []Alert {
	switch {
	case v == nil:
		return nil
	case v.Error != "":
		return []Alert{{"critical", "repair log unreadable: " + v.Error}}
	case v.Dead > 0:
		return []Alert{{"critical", fmt.Sprintf("%d dead letters in the repair log %s: retry or skip them", v.Dead, v.Topic)}}
	case v.Pending > 0 && v.Oldest > time.Minute:
		return []Alert{{"warning", fmt.Sprintf("%d repairs pending, the oldest %v old: is the repair relay running?", v.Pending, v.Oldest.Round(time.Second))}}
	}
	return nil
}

// deadAction retries or skips one dead letter of the migration's repair log.
func (s *Server) deadAction(r *http.Request, name, action string, res *ActionResult) (status int, subject, done string) {
	if s.repairs == nil {
		res.Error = "no repair log is configured for this console"
		return http.StatusNotFound, "", ""
	}
	id, err := uuid.Parse(strings.TrimSpace(r.PostFormValue("id")))
	if err != nil {
		res.Error = fmt.Sprintf("dead letter id %q: %v", r.PostFormValue("id"), err)
		return http.StatusBadRequest, "", ""
	}
	// Only a dead letter of this migration's own repair log.
	topic := dualwrite.RepairTopic(name)
	dead, err := s.repairs.DeadLetters(r.Context(), topic, 100000)
	if err != nil {
		res.Error = fmt.Sprintf("repair log: %v", err)
		return http.StatusBadGateway, "", ""
	}
	found := false
	for _, d := range dead {
		found = found || d.ID == id
	}
	if !found {
		res.Error = fmt.Sprintf("%s has no dead letter %s", topic, id)
		return http.StatusBadRequest, "", ""
	}
	if action == "dead-retry" {
		err = s.repairs.RetryDead(r.Context(), id)
		res.Describe, done = fmt.Sprintf("dead letter %s is pending again", id), "retried"
	} else {
		var rec outbox.DeadLetter
		rec, err = s.repairs.SkipDead(r.Context(), id)
		res.Describe, done = fmt.Sprintf("dead letter %s (key %s) skipped", id, rec.Key), "skipped (key "+rec.Key+")"
	}
	if err != nil {
		res.Describe = ""
		res.Error = fmt.Sprintf("%s %s: %v", action, id, err)
		return http.StatusConflict, "", ""
	}
	res.Applied = true
	return http.StatusOK, "dead letter " + id.String(), done
}
