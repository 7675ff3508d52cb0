package console

import (
	"context"
	"crypto/subtle"
	"net/http"
	"strings"
	"time"
)

// sessionCookie names the cookie a login sets.
const sessionCookie = "dimmer_ui_session"

// session is one login: who the operator said they are (for the audit log)
// and the CSRF token their page must send with every action.
type session struct {
	operator string
	csrf     string
	expires  time.Time
}

type principalKey struct{}

// principal is who a request acts for. csrf is empty for a bearer-token
// client: a browser never attaches an Authorization header to a cross-site
// request, so such a request cannot be forged and needs no CSRF token.
type principal struct {
	operator string
	csrf     string
	viaToken bool
}

func principalOf(ctx context.Context) principal {
	p, _ := ctx.Value(principalKey{}).(principal)
	return p
}

func (s *Server) tokenOK(got string) bool {
	return subtle.ConstantTimeCompare([]byte(got), []byte(s.token)) == 1
}

// authed lets a request through with the bearer token or a live session;
// anything else gets 401 (pages show the login form with it).
func (s *Server) authed(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if h := r.Header.Get("Authorization"); h != "" {
			client := clientOf(r)
			if wait := s.blocked(client); wait > 0 {
				s.tooMany(w, r, wait)
				return
			}
			tok, ok := strings.CutPrefix(h, "Bearer ")
			if ok && s.tokenOK(tok) {
				op := strings.TrimSpace(r.Header.Get("X-Dimmer-Operator"))
				if op == "" {
					op = "token"
				}
				next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), principalKey{}, principal{operator: op, viaToken: true})))
				return
			}
			s.failedToken(client)
		} else if c, err := r.Cookie(sessionCookie); err == nil {
			if ses := s.session(c.Value); ses != nil {
				p := principal{operator: ses.operator, csrf: ses.csrf}
				next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), principalKey{}, p)))
				return
			}
		}
		s.unauthorized(w, r)
	})
}

func (s *Server) unauthorized(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("WWW-Authenticate", `Bearer realm="dimmer"`)
	if r.Method == http.MethodGet && !strings.HasPrefix(r.URL.Path, "/api/") && r.URL.Query().Get("part") == "" {
		w.WriteHeader(http.StatusUnauthorized)
		s.render(w, "login", loginView{Next: safeNext(r.URL.Path)})
		return
	}
	http.Error(w, "401 unauthorized: send Authorization: Bearer <DIMMER_UI_TOKEN> or log in", http.StatusUnauthorized)
}

// csrf refuses an action from a login session whose form does not carry the
// session's CSRF token.
func (s *Server) csrf(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := principalOf(r.Context())
		if p.viaToken {
			next.ServeHTTP(w, r)
			return
		}
		got := r.Header.Get("X-CSRF-Token")
		if got == "" {
			got = r.PostFormValue("csrf")
		}
		if p.csrf == "" || subtle.ConstantTimeCompare([]byte(got), []byte(p.csrf)) != 1 {
			http.Error(w, "403 forbidden: missing or wrong CSRF token (reload the page)", http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (s *Server) session(id string) *session {
	s.mu.Lock()
	defer s.mu.Unlock()
	ses := s.sessions[id]
	if ses == nil {
		return nil
	}
	if s.now().After(ses.expires) {
		delete(s.sessions, id)
		return nil
	}
	return ses
}

type loginView struct {
	Next  string
	Error string
}

// safeNext keeps a post-login redirect on this site.
func safeNext(p string) string {
	if !strings.HasPrefix(p, "/") || strings.HasPrefix(p, "//") || strings.ContainsAny(p, "\\\r\n") {
		return "/"
	}
	return p
}

func (s *Server) loginPage(w http.ResponseWriter, r *http.Request) {
	s.render(w, "login", loginView{Next: safeNext(r.URL.Query().Get("next"))})
}

func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	next := safeNext(r.PostFormValue("next"))
	operator := strings.TrimSpace(r.PostFormValue("operator"))
	client := clientOf(r)
	// A client that guessed too often is not even compared: its next guess
	// waits, right or wrong.
	if wait := s.blocked(client); wait > 0 {
		s.tooMany(w, r, wait)
		return
	}
	switch {
	case !s.tokenOK(r.PostFormValue("token")):
		s.failedToken(client)
		s.logger.Warn("console login refused: wrong token", "remote", r.RemoteAddr)
		w.WriteHeader(http.StatusUnauthorized)
		s.render(w, "login", loginView{Next: next, Error: "wrong token"})
		return
	case operator == "" || len(operator) > 100:
		w.WriteHeader(http.StatusBadRequest)
		s.render(w, "login", loginView{Next: next, Error: "say who you are (1-100 characters): it goes to the audit log with every action"})
		return
	}
	id := randomHex(32)
	s.mu.Lock()
	now := s.now()
	for k, ses := range s.sessions {
		if now.After(ses.expires) {
			delete(s.sessions, k)
		}
	}
	s.sessions[id] = &session{operator: operator, csrf: randomHex(32), expires: now.Add(s.sessionTTL)}
	s.mu.Unlock()
	http.SetCookie(w, &http.Cookie{
		Name: sessionCookie, Value: id, Path: "/", HttpOnly: true, Secure: r.TLS != nil,
		SameSite: http.SameSiteStrictMode, MaxAge: int(s.sessionTTL / time.Second),
	})
	s.logger.Info("console login", "operator", operator, "remote", r.RemoteAddr)
	http.Redirect(w, r, next, http.StatusSeeOther)
}

func (s *Server) logout(w http.ResponseWriter, r *http.Request) {
	if c, err := r.Cookie(sessionCookie); err == nil {
		s.mu.Lock()
		delete(s.sessions, c.Value)
		s.mu.Unlock()
	}
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: "", Path: "/", MaxAge: -1, HttpOnly: true, SameSite: http.SameSiteStrictMode})
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}
