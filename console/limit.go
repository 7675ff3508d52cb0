package console

import (
	"fmt"
	"math"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// WithLoginLimit sets how many wrong tokens a client may send (the login
// form or an Authorization header) before it must wait, and how fast that
// allowance comes back (default 5, then one every 12s: a token of 16
// random characters stays out of reach). A client is an IP address (an
// IPv6 /64), so behind a proxy every user shares one allowance: put the
// limit in the proxy instead, or raise it.
func WithLoginLimit(burst int, every time.Duration) Option {
	return func(s *Server) error {
		if burst < 1 || every <= 0 {
			return fmt.Errorf("WithLoginLimit(%d, %v): want at least 1 attempt and a positive interval", burst, every)
		}
		s.limitBurst, s.limitEvery = burst, every
		return nil
	}
}

// maxLimited bounds the clients remembered; past it the ones back to their
// full allowance are forgotten first, then any.
const maxLimited = 10000

// failures are the wrong-token allowances per client.
type failures struct {
	mu      sync.Mutex
	clients map[string]*rate.Limiter
}

func clientOf(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return host
	}
	if ip.To4() == nil {
		return ip.Mask(net.CIDRMask(64, 128)).String() + "/64"
	}
	return ip.String()
}

// blocked returns how long the client must wait before its token is looked
// at again (0: it may try now).
func (s *Server) blocked(client string) time.Duration {
	s.failed.mu.Lock()
	defer s.failed.mu.Unlock()
	lim := s.failed.clients[client]
	if lim == nil {
		return 0
	}
	now := s.now()
	if t := lim.TokensAt(now); t < 1 {
		return time.Duration(math.Ceil((1 - t) * float64(s.limitEvery)))
	}
	return 0
}

// failedToken counts a wrong token of the client.
func (s *Server) failedToken(client string) {
	s.failed.mu.Lock()
	defer s.failed.mu.Unlock()
	now := s.now()
	lim := s.failed.clients[client]
	if lim == nil {
		if len(s.failed.clients) >= maxLimited {
			for k, l := range s.failed.clients {
				if l.TokensAt(now) >= float64(s.limitBurst) {
					delete(s.failed.clients, k)
				}
			}
			// Still full: forget any one, so memory stays bounded (a
			// guesser with that many addresses is not slowed by one).
			for k := range s.failed.clients {
				if len(s.failed.clients) < maxLimited {
					break
				}
				delete(s.failed.clients, k)
			}
		}
		lim = rate.NewLimiter(rate.Every(s.limitEvery), s.limitBurst)
		s.failed.clients[client] = lim
	}
	lim.AllowN(now, 1)
}

// tooMany answers a client that sent too many wrong tokens.
func (s *Server) tooMany(w http.ResponseWriter, r *http.Request, wait time.Duration) {
	secs := int(math.Ceil(wait.Seconds()))
	s.logger.Warn("console refused a client with too many wrong tokens", "remote", r.RemoteAddr, "retry_after_s", secs)
	w.Header().Set("Retry-After", strconv.Itoa(secs))
	msg := fmt.Sprintf("too many wrong tokens from %s: try again in %ds", clientOf(r), secs)
	if r.Method == http.MethodPost && r.URL.Path == "/login" {
		w.WriteHeader(http.StatusTooManyRequests)
		s.render(w, "login", loginView{Next: safeNext(r.PostFormValue("next")), Error: msg})
		return
	}
	http.Error(w, "429 too many requests: "+msg, http.StatusTooManyRequests)
}
