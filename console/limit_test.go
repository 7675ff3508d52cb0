package console_test

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/console"
)

// send serves one request from the client address remote.
func send(srv http.Handler, remote, method, path string, form url.Values, bearer string) *httptest.ResponseRecorder {
	var body *strings.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	} else {
		body = strings.NewReader("")
	}
	req := httptest.NewRequest(method, path, body)
	req.RemoteAddr = remote
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, req)
	return rec
}

// Guessing the token is bounded per client, through the login form and the
// Authorization header alike; a blocked client's right token waits too, and
// other clients are unaffected.
func TestWrongTokensAreRateLimitedPerClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	srv, err := console.New(e.ctrl, e.store, token, console.WithLogger(quiet), console.WithLoginLimit(3, time.Hour))
	require.NoError(t, err)
	login := func(remote, tok string) *httptest.ResponseRecorder {
		return send(srv, remote, "POST", "/login", url.Values{"token": {tok}, "operator": {"mallory"}, "next": {"/"}}, "")
	}
	const attacker, other = "192.0.2.7:40000", "198.51.100.9:40000"
	for i := range 3 {
		assert.Equal(t, http.StatusUnauthorized, login(attacker, "guess-"+strconv.Itoa(i)).Code)
	}
	r := login(attacker, token)
	assert.Equal(t, http.StatusTooManyRequests, r.Code, "the right token waits as well: a guess is never compared while blocked")
	assert.Contains(t, r.Body.String(), "too many wrong tokens")
	wait, err := strconv.Atoi(r.Header().Get("Retry-After"))
	require.NoError(t, err)
	assert.InDelta(t, 3600, wait, 5, "one attempt comes back an hour later")
	assert.Empty(t, r.Result().Cookies(), "no session")
	assert.Equal(t, http.StatusTooManyRequests, send(srv, "192.0.2.7:40001", "GET", "/api/overview", nil, token).Code, "same client, another port, the header")

	assert.Equal(t, http.StatusSeeOther, login(other, token).Code, "another client logs in")
	assert.Equal(t, http.StatusOK, send(srv, other, "GET", "/api/overview", nil, token).Code)
	// Wrong bearer tokens count the same way.
	for range 3 {
		assert.Equal(t, http.StatusUnauthorized, send(srv, other, "GET", "/api/overview", nil, "wrong-token-0123456789").Code)
	}
	assert.Equal(t, http.StatusTooManyRequests, send(srv, other, "GET", "/api/overview", nil, token).Code)
	// IPv6 clients are counted per /64.
	for range 3 {
		assert.Equal(t, http.StatusUnauthorized, login("[2001:db8::1]:1", "nope").Code)
	}
	assert.Equal(t, http.StatusTooManyRequests, login("[2001:db8::ffff]:2", token).Code)
}

// The allowance comes back with time.
func TestLoginLimitRecovers(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	srv, err := console.New(e.ctrl, e.store, token, console.WithLogger(quiet), console.WithLoginLimit(1, 100*time.Millisecond))
	require.NoError(t, err)
	const c = "192.0.2.8:1"
	assert.Equal(t, http.StatusUnauthorized, send(srv, c, "GET", "/api/overview", nil, "wrong-token-0123456789").Code)
	assert.Equal(t, http.StatusTooManyRequests, send(srv, c, "GET", "/api/overview", nil, token).Code)
	require.Eventually(t, func() bool {
		return send(srv, c, "GET", "/api/overview", nil, token).Code == http.StatusOK
	}, 5*time.Second, 20*time.Millisecond)
	_, err = console.New(e.ctrl, e.store, token, console.WithLoginLimit(0, time.Second))
	assert.ErrorContains(t, err, "WithLoginLimit(0, 1s)")
}
