package console

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/open-feature/go-sdk/openfeature"
)

// WithChanges makes the pages refresh as soon as a stage changes, on top of
// their polling: events is the event channel of an OpenFeature provider over
// the same store (pgflags and redisflags providers follow the store's
// LISTEN/NOTIFY or pub/sub), which the caller initialises and shuts down.
// [Server.Run] reads it and tells every open page through server-sent
// events (GET /api/events). Polling stays: heartbeats, refusals and the
// other panels change without a flag notification.
func WithChanges(events <-chan openfeature.Event) Option {
	return func(s *Server) error {
		if events == nil {
			return errors.New("WithChanges: nil channel")
		}
		s.changes = events
		return nil
	}
}

// forwardChanges hands every configuration change of the provider to the
// open event streams until ctx ends, then ends the streams.
func (s *Server) forwardChanges(ctx context.Context) {
	defer s.stopStreams.Do(func() { close(s.streamsDone) })
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-s.changes:
			if !ok {
				return
			}
			if ev.EventType != openfeature.ProviderConfigChange {
				continue
			}
			s.evMu.Lock()
			for ch := range s.streams {
				select {
				case ch <- ev.FlagChanges:
				default: // a change is already pending: the page refreshes once
				}
			}
			s.evMu.Unlock()
		}
	}
}

// keepAliveEvery keeps idle event streams from being cut by proxies.
const keepAliveEvery = 15 * time.Second

// events streams "change" events naming the migrations that changed.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	ch := make(chan []string, 1)
	s.evMu.Lock()
	s.streams[ch] = struct{}{}
	s.evMu.Unlock()
	defer func() {
		s.evMu.Lock()
		delete(s.streams, ch)
		s.evMu.Unlock()
	}()
	// The browser reconnects by itself after this long.
	if _, err := fmt.Fprintf(w, "retry: %d\n\n", s.refresh.Milliseconds()); err != nil || rc.Flush() != nil {
		return
	}
	keep := time.NewTicker(keepAliveEvery)
	defer keep.Stop()
	for {
		var err error
		select {
		case <-r.Context().Done():
			return
		case <-s.streamsDone:
			return
		case names := <-ch:
			b, _ := json.Marshal(names)
			_, err = fmt.Fprintf(w, "event: change\ndata: %s\n\n", b)
		case <-keep.C:
			_, err = fmt.Fprint(w, ": keep-alive\n\n")
		}
		if err != nil || rc.Flush() != nil {
			return
		}
	}
}
