package console

import (
	"crypto/rand"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/open-feature/go-sdk/openfeature"
	"golang.org/x/time/rate"

	"github.com/dimmer-dev/dimmer/flags"
)

//go:embed templates/*.html static/*
var assets embed.FS

// Server is the operator console: an http.Handler serving the overview, a
// page per migration, their JSON data and, when enabled, the guarded
// actions. Build it with [New]; it holds no goroutine, so it needs no Close.
type Server struct {
	ctrl   *flags.Controller
	store  flags.Store
	fleet  flags.FleetStore
	token  string
	logger *slog.Logger

	actions       bool
	refresh       time.Duration
	timelineLimit int
	thresholds    flags.WatchdogConfig
	sessionTTL    time.Duration
	now           func() time.Time

	metrics     http.Handler
	backfills   Backfills
	repairs     RepairLog
	plans       SchemaPlans
	slots       ReplicationSlots
	maxRetained int64

	tmpl    *template.Template
	handler http.Handler

	mu       sync.Mutex
	sessions map[string]*session

	limitBurst int
	limitEvery time.Duration
	failed     failures

	changes     <-chan openfeature.Event
	evMu        sync.Mutex
	streams     map[chan []string]struct{}
	streamsDone chan struct{}
	stopStreams sync.Once

	sampleEvery time.Duration
	sampleKeep  int
	histMu      sync.Mutex
	hist        map[string]*history
	sampleStore SampleStore
	seeded      map[string]bool // under histMu: history read from sampleStore

	tlMu sync.Mutex
	tl   map[string]*timelineCache
}

// Option configures a [Server].
type Option func(*Server) error

// WithActions enables the actions (advance, roll back, rollout). Without it
// the console is read-only and every action answers 403.
func WithActions() Option {
	return func(s *Server) error { s.actions = true; return nil }
}

// WithRefresh sets how often the pages fetch fresh data (default 2s).
func WithRefresh(d time.Duration) Option {
	return func(s *Server) error {
		if d < 50*time.Millisecond {
			return fmt.Errorf("WithRefresh %v: must be at least 50ms", d)
		}
		s.refresh = d
		return nil
	}
}

// WithTimelineLimit sets how many of the newest audit entries a migration
// page shows (default 100).
func WithTimelineLimit(n int) Option {
	return func(s *Server) error {
		if n < 1 {
			return fmt.Errorf("WithTimelineLimit %d: must be positive", n)
		}
		s.timelineLimit = n
		return nil
	}
}

// WithThresholds sets the thresholds alerts are raised at and the name the
// watchdog audits its rollbacks under; it should be the services'
// [flags.WatchdogConfig]. Zero fields take the watchdog's defaults.
func WithThresholds(cfg flags.WatchdogConfig) Option {
	return func(s *Server) error {
		if err := cfg.Validate(); err != nil {
			return fmt.Errorf("WithThresholds: %w", err)
		}
		s.thresholds = cfg
		return nil
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(s *Server) error {
		if l == nil {
			return errors.New("WithLogger: logger is nil")
		}
		s.logger = l
		return nil
	}
}

// WithSessionTTL sets how long a login lasts (default 12h).
func WithSessionTTL(d time.Duration) Option {
	return func(s *Server) error {
		if d <= 0 {
			return fmt.Errorf("WithSessionTTL %v: must be positive", d)
		}
		s.sessionTTL = d
		return nil
	}
}

// MinTokenLength is the shortest token [New] accepts.
const MinTokenLength = 16

// New returns a console over the controller (and so its store and guards)
// and the fleet registry. token is the secret every request must carry
// (DIMMER_UI_TOKEN in the CLI); it must be at least [MinTokenLength]
// characters.
func New(ctrl *flags.Controller, fleet flags.FleetStore, token string, opts ...Option) (*Server, error) {
	switch {
	case ctrl == nil:
		return nil, errors.New("console.New: controller is nil")
	case fleet == nil:
		return nil, errors.New("console.New: fleet store is nil")
	case len(token) < MinTokenLength:
		return nil, fmt.Errorf("console.New: token has %d characters: use at least %d random ones", len(token), MinTokenLength)
	}
	s := &Server{
		ctrl: ctrl, store: ctrl.Store(), fleet: ShareFleet(fleet), token: token, logger: slog.Default(),
		refresh: 2 * time.Second, timelineLimit: 100, sessionTTL: 12 * time.Hour, now: time.Now,
		sessions: map[string]*session{}, limitBurst: 5, limitEvery: 12 * time.Second,
		failed: failures{clients: map[string]*rate.Limiter{}}, sampleEvery: 10 * time.Second, sampleKeep: 360,
		hist: map[string]*history{}, seeded: map[string]bool{}, tl: map[string]*timelineCache{}, streams: map[chan []string]struct{}{}, streamsDone: make(chan struct{}),
	}
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, fmt.Errorf("console.New: %w", err)
		}
	}
	if s.thresholds.Actor == "" {
		s.thresholds.Actor = "watchdog"
	}
	tmpl, err := template.New("").Funcs(funcs).ParseFS(assets, "templates/*.html")
	if err != nil {
		return nil, fmt.Errorf("console.New: templates: %w", err)
	}
	s.tmpl = tmpl
	s.handler = s.routes()
	return s, nil
}

// ServeHTTP serves the console.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.handler.ServeHTTP(w, r) }

// ActionsEnabled reports whether the console accepts actions.
func (s *Server) ActionsEnabled() bool { return s.actions }

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	static, _ := fs.Sub(assets, "static")
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(static)))
	mux.HandleFunc("GET /login", s.loginPage)
	mux.HandleFunc("POST /login", s.login)
	mux.Handle("POST /logout", s.authed(http.HandlerFunc(s.logout)))
	mux.Handle("GET /{$}", s.authed(http.HandlerFunc(s.overviewPage)))
	mux.Handle("GET /api/overview", s.authed(http.HandlerFunc(s.overviewJSON)))
	mux.Handle("GET /m/{name}", s.authed(http.HandlerFunc(s.migrationPage)))
	mux.Handle("GET /api/m/{name}", s.authed(http.HandlerFunc(s.migrationJSON)))
	if s.changes != nil {
		mux.Handle("GET /api/events", s.authed(http.HandlerFunc(s.events)))
	}
	if s.metrics != nil {
		mux.Handle("GET /metrics", s.authed(s.metrics))
	}
	mux.Handle("POST /m/{name}/{action}", s.authed(s.csrf(http.HandlerFunc(s.act))))
	// Cross-origin state-changing requests are refused by the browser's own
	// Sec-Fetch-Site/Origin headers before the CSRF token is even looked at.
	cop := http.NewCrossOriginProtection()
	return securityHeaders(cop.Handler(mux))
}

// securityHeaders keeps the pages from being framed, sniffed or running any
// script but the console's own.
func securityHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-store")
		next.ServeHTTP(w, r)
	})
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return hex.EncodeToString(b)
}
