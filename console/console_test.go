package console_test

import (
	"encoding/json"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/flags"
)

func TestNewValidates(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	_, err := console.New(nil, e.store, token)
	assert.ErrorContains(t, err, "controller is nil")
	_, err = console.New(e.ctrl, nil, token)
	assert.ErrorContains(t, err, "fleet store is nil")
	_, err = console.New(e.ctrl, e.store, "short")
	assert.ErrorContains(t, err, "token has 5 characters")
	_, err = console.New(e.ctrl, e.store, token, console.WithRefresh(time.Millisecond))
	assert.ErrorContains(t, err, "WithRefresh")
}

// walk puts orders in shadow at revision 2 with one refusal on the way.
func walk(t *testing.T, e *env) {
	t.Helper()
	e.beat(t, "api-1", "orders", 0, nil)
	_, err := e.ctrl.Advance(ctx(t), "orders", "alice", "start dual writes")
	require.NoError(t, err)
	_, err = e.ctrl.Advance(ctx(t), "orders", "alice", "too early")
	require.ErrorIs(t, err, flags.ErrRefused, "api-1 has not applied revision 1")
	e.beat(t, "api-1", "orders", 1, nil)
	_, err = e.ctrl.Advance(ctx(t), "orders", "alice", "backfill verified")
	require.NoError(t, err)
}

func TestOverviewAndMigrationData(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	walk(t, e)
	// api-1 saw 10 lasting mismatches of 200 comparisons in shadow; api-2
	// still evaluates revision 1.
	e.beat(t, "api-1", "orders", 2, health("orders", flags.Shadow, flags.Health{Ops: 200, Compared: 200, Mismatches: 14, Lasting: 10}))
	e.beat(t, "api-2", "orders", 1, nil)

	r := e.do(t, nil, "GET", "/api/overview", nil, true, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	var ov console.Overview
	require.NoError(t, json.Unmarshal([]byte(r.body), &ov))
	assert.Equal(t, 2, ov.Fleet.Live)
	require.Len(t, ov.Migrations, 1)
	m := ov.Migrations[0]
	assert.Equal(t, "orders", m.Name)
	assert.Equal(t, flags.Shadow, m.State.Stage)
	assert.Equal(t, "live", m.Next)
	assert.False(t, m.Ready)
	assert.Equal(t, 2, m.Failing, "fleet barrier and health both fail: %+v", m.Checks)
	texts := alertTexts(m.Alerts)
	assert.Contains(t, texts, "1 of 2 instances have not applied revision 2")
	assert.Contains(t, texts, "10 lasting mismatches in shadow (5.00% of 200 comparisons)")

	r = e.do(t, nil, "GET", "/api/m/orders", nil, true, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	var mig console.Migration
	require.NoError(t, json.Unmarshal([]byte(r.body), &mig))
	require.Len(t, mig.Instances, 2)
	assert.Equal(t, "api-1", mig.Instances[0].ID)
	assert.Equal(t, "shadow", mig.Instances[0].Observes)
	assert.True(t, mig.Instances[0].Acknowledged)
	assert.Equal(t, "dualwrite", mig.Instances[1].Observes, "api-2 at revision 1 routes by dualwrite")
	assert.False(t, mig.Instances[1].Acknowledged)
	require.Len(t, mig.Health, 1)
	assert.Equal(t, "shadow", mig.Health[0].Stage)
	assert.Equal(t, int64(4), mig.Health[0].Transient)
	assert.InDelta(t, 0.05, mig.Health[0].Mismatch, 1e-9)
	require.Len(t, mig.Timeline, 3)
	assert.Equal(t, "backfill verified", mig.Timeline[0].Reason)
	assert.Equal(t, flags.Refused, mig.Timeline[1].Outcome)
	require.Len(t, mig.Timeline[1].Failed, 1)
	assert.Equal(t, "fleet-acknowledged", mig.Timeline[1].Failed[0].Name)

	page := e.do(t, nil, "GET", "/m/orders", nil, true, nil)
	require.Equal(t, http.StatusOK, page.status)
	assert.Contains(t, page.body, "NO-GO (2 failing)")
	assert.Contains(t, page.body, "REFUSED")
	assert.NotContains(t, page.body, `id="advance"`, "read-only: no action forms")

	r = e.do(t, nil, "GET", "/api/m/Bad%20Name", nil, true, nil)
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.Contains(t, r.body, "invalid migration name")
}

func alertTexts(as []console.Alert) []string {
	var out []string
	for _, a := range as {
		out = append(out, a.Text)
	}
	return out
}

func TestEveryRequestNeedsTheToken(t *testing.T) {
	t.Parallel()
	e := newEnv(t, console.WithActions())
	walk(t, e)
	before := e.state(t, "orders")
	nAudit := len(e.audit(t, "orders"))
	for _, tc := range []struct {
		method, path string
		hdr          map[string]string
	}{
		{"GET", "/", nil},
		{"GET", "/m/orders", nil},
		{"GET", "/m/orders?part=live", nil},
		{"GET", "/api/overview", nil},
		{"GET", "/api/m/orders", map[string]string{"Authorization": "Bearer wrong-token-0123456789"}},
		{"POST", "/m/orders/advance", nil},
		{"POST", "/m/orders/rollback", map[string]string{"Authorization": "Bearer wrong-token-0123456789"}},
		{"POST", "/m/orders/advance", map[string]string{"Cookie": "dimmer_ui_session=forged"}},
	} {
		var form url.Values
		if tc.method == "POST" {
			form = url.Values{"reason": {"no token"}, "stage": {"off"}}
		}
		r := e.do(t, nil, tc.method, tc.path, form, false, tc.hdr)
		assert.Equal(t, http.StatusUnauthorized, r.status, "%s %s", tc.method, tc.path)
		assert.NotContains(t, r.body, "shadow", "%s %s leaks the stage", tc.method, tc.path)
		assert.NotContains(t, r.body, "alice", "%s %s leaks the audit log", tc.method, tc.path)
	}
	assert.Equal(t, before, e.state(t, "orders"), "nothing changed")
	assert.Len(t, e.audit(t, "orders"), nAudit, "nothing audited")

	login := e.do(t, nil, "GET", "/m/orders", nil, false, nil)
	assert.Contains(t, login.body, `name="token"`, "a page without the token shows the login form")
	wrong := e.do(t, nil, "POST", "/login", url.Values{"token": {"nope-nope-nope-nope"}, "operator": {"mallory"}}, false, nil)
	assert.Equal(t, http.StatusUnauthorized, wrong.status)
	assert.Contains(t, wrong.body, "wrong token")
}

var csrfRE = regexp.MustCompile(`data-csrf="([0-9a-f]+)"`)

func TestActionsNeedCSRFAndAreAuditedAsTheOperator(t *testing.T) {
	t.Parallel()
	e := newEnv(t, console.WithActions())
	walk(t, e)
	e.beat(t, "api-1", "orders", 2, nil)
	c := e.login(t, "alice")
	page := e.do(t, c, "GET", "/m/orders", nil, false, nil)
	require.Equal(t, http.StatusOK, page.status)
	m := csrfRE.FindStringSubmatch(page.body)
	require.Len(t, m, 2, "the page carries its CSRF token")
	csrf := m[1]
	before := e.state(t, "orders")
	nAudit := len(e.audit(t, "orders"))

	form := url.Values{"reason": {"canary"}, "stage": {"dualwrite"}}
	r := e.do(t, c, "POST", "/m/orders/rollback", form, false, nil)
	assert.Equal(t, http.StatusForbidden, r.status, "a session POST without the CSRF token")
	assert.Contains(t, r.body, "CSRF")
	wrongCSRF := "0" + csrf[1:]
	if csrf[0] == '0' {
		wrongCSRF = "1" + csrf[1:]
	}
	form.Set("csrf", wrongCSRF)
	r = e.do(t, c, "POST", "/m/orders/rollback", form, false, nil)
	assert.Equal(t, http.StatusForbidden, r.status, "a wrong CSRF token")
	// What a browser sends for a form posted from another site: the session
	// cookie rides along (when SameSite allows) but the token cannot.
	form.Del("csrf")
	r = e.do(t, c, "POST", "/m/orders/rollback", form, false, map[string]string{"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
	assert.Equal(t, http.StatusForbidden, r.status, "a cross-site POST")
	assert.Equal(t, before, e.state(t, "orders"))
	assert.Len(t, e.audit(t, "orders"), nAudit)

	form.Set("csrf", csrf)
	form.Set("revision", "2")
	r = e.do(t, c, "POST", "/m/orders/rollback", form, false, map[string]string{"Sec-Fetch-Site": "same-origin"})
	require.Equal(t, http.StatusOK, r.status, r.body)
	assert.Contains(t, r.body, "is now <b class=\"now\">dualwrite</b>")
	st := e.state(t, "orders")
	assert.Equal(t, flags.DualWrite, st.Stage)
	assert.Equal(t, "alice (console)", st.UpdatedBy)
	a := e.audit(t, "orders")
	require.Len(t, a, nAudit+1)
	assert.Equal(t, "alice (console)", a[0].Actor)
	assert.Equal(t, "canary", a[0].Reason)

	// The page showed revision 2; the migration is at 3 now.
	r = e.do(t, c, "POST", "/m/orders/advance", form, false, nil)
	assert.Equal(t, http.StatusConflict, r.status)
	assert.Contains(t, r.body, "changed since the page showed it")
	assert.Equal(t, flags.DualWrite, e.state(t, "orders").Stage)

	form.Del("revision")
	form.Set("reason", "  ")
	r = e.do(t, c, "POST", "/m/orders/advance", form, false, nil)
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.Contains(t, r.body, "a reason is required")
}

func TestRefusalListsEveryFailedCheck(t *testing.T) {
	t.Parallel()
	e := newEnv(t, console.WithActions())
	walk(t, e)
	e.beat(t, "api-2", "orders", 1, nil)
	nAudit := len(e.audit(t, "orders"))
	r := e.do(t, nil, "POST", "/m/orders/advance", url.Values{"reason": {"go live"}}, true,
		map[string]string{"Accept": "application/json", "X-Dimmer-Operator": "bob"})
	require.Equal(t, http.StatusConflict, r.status, r.body)
	var res console.ActionResult
	require.NoError(t, json.Unmarshal([]byte(r.body), &res))
	assert.False(t, res.Applied)
	var names []string
	for _, f := range res.Failed {
		names = append(names, f.Name)
	}
	assert.ElementsMatch(t, []string{"fleet-acknowledged", "health"}, names)
	assert.Equal(t, flags.Shadow, e.state(t, "orders").Stage)
	a := e.audit(t, "orders")
	require.Len(t, a, nAudit+1, "the refusal is audited, as in the CLI")
	assert.Equal(t, flags.Refused, a[0].Outcome)
	assert.Equal(t, "bob (console)", a[0].Actor)

	r = e.do(t, nil, "POST", "/m/orders/advance", url.Values{"reason": {"go live"}}, true, nil)
	assert.Contains(t, r.body, "<b>fleet-acknowledged</b>")
	assert.Contains(t, r.body, "<b>health</b>")
}

// An on-call engineer can override refused checks from the page, as with
// dimmer stage set … --force: only with a reason, the revision the page
// showed and the migration's name typed; audited as forced.
func TestForcedAdvance(t *testing.T) {
	t.Parallel()
	e := newEnv(t, console.WithActions())
	walk(t, e)
	e.beat(t, "api-2", "orders", 1, nil) // behind: the fleet barrier fails
	rev := strconv.FormatInt(e.state(t, "orders").Revision, 10)
	nAudit := len(e.audit(t, "orders"))
	force := func(form url.Values) response {
		return e.do(t, nil, "POST", "/m/orders/advance", form, true, map[string]string{"X-Dimmer-Operator": "carol"})
	}
	for _, bad := range []struct {
		form url.Values
		want string
	}{
		{url.Values{"reason": {"api-2 is gone"}, "force": {"yes"}, "revision": {rev}}, "type the migration&#39;s name"},
		{url.Values{"reason": {"api-2 is gone"}, "force": {"yes"}, "revision": {rev}, "confirm": {"users"}}, "type the migration&#39;s name"},
		{url.Values{"reason": {"api-2 is gone"}, "force": {"yes"}, "confirm": {"orders"}}, "needs the revision"},
		{url.Values{"force": {"yes"}, "revision": {rev}, "confirm": {"orders"}}, "a reason is required"},
		{url.Values{"reason": {strings.Repeat("x", flags.MaxText+1)}, "force": {"yes"}, "revision": {rev}, "confirm": {"orders"}},
			"the reason is 1025 bytes; at most 1024 are kept in the audit log"},
		{url.Values{"reason": {"x"}, "force": {"yes"}, "revision": {"1"}, "confirm": {"orders"}}, "changed since the page showed it"},
	} {
		r := force(bad.form)
		assert.Contains(t, []int{http.StatusBadRequest, http.StatusConflict}, r.status, r.body)
		assert.Contains(t, r.body, bad.want)
	}
	r := e.do(t, nil, "POST", "/m/orders/rollback", url.Values{"reason": {"x"}, "stage": {"off"}, "force": {"yes"}, "confirm": {"orders"}, "revision": {rev}}, true, nil)
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.Contains(t, r.body, "only an advance can be forced")
	assert.Equal(t, flags.Shadow, e.state(t, "orders").Stage, "nothing applied")
	assert.Len(t, e.audit(t, "orders"), nAudit, "nothing audited: the guards were never asked")

	r = force(url.Values{"reason": {"api-2 is gone"}, "force": {"yes"}, "revision": {rev}, "confirm": {"orders"}})
	require.Equal(t, http.StatusOK, r.status, r.body)
	assert.Contains(t, r.body, "(FORCED)")
	assert.Equal(t, flags.Live, e.state(t, "orders").Stage)
	a := e.audit(t, "orders")
	require.Len(t, a, nAudit+1)
	assert.True(t, a[0].Forced)
	assert.Equal(t, flags.Applied, a[0].Outcome)
	assert.Equal(t, "carol (console)", a[0].Actor)
	assert.Equal(t, "api-2 is gone", a[0].Reason)
	var failed []string
	for _, c := range a[0].Checks {
		if !c.Passed {
			failed = append(failed, c.Name)
		}
	}
	assert.Contains(t, failed, "fleet-acknowledged", "the overridden check is in the entry")
	assert.Contains(t, e.do(t, nil, "GET", "/m/orders", nil, true, nil).body, "applied FORCED")
}

func TestReadOnlyRefusesActions(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	walk(t, e)
	r := e.do(t, nil, "POST", "/m/orders/rollback", url.Values{"reason": {"x"}, "stage": {"off"}}, true, nil)
	assert.Equal(t, http.StatusForbidden, r.status)
	assert.Contains(t, r.body, "read-only")
	assert.Equal(t, flags.Shadow, e.state(t, "orders").Stage)
}

func TestTextIsEscaped(t *testing.T) {
	t.Parallel()
	e := newEnv(t, console.WithActions())
	const evil = `<script>alert("x")</script>' onmouseover="alert(1)`
	e.beat(t, evil, "orders", 0, nil)
	_, err := e.ctrl.Advance(ctx(t), "orders", evil, evil)
	require.NoError(t, err)
	for _, path := range []string{"/", "/m/orders", "/m/orders?part=live"} {
		r := e.do(t, nil, "GET", path, nil, true, nil)
		require.Equal(t, http.StatusOK, r.status, path)
		assert.NotContains(t, r.body, "<script>alert", path)
		assert.NotContains(t, r.body, `" onmouseover="`, path)
		assert.Contains(t, r.body, "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&#39; onmouseover=&#34;alert(1)", path)
	}
	c := e.login(t, evil)
	page := e.do(t, c, "GET", "/m/orders", nil, false, nil)
	assert.NotContains(t, page.body, "<script>alert")
	csrf := csrfRE.FindStringSubmatch(page.body)[1]
	r := e.do(t, c, "POST", "/m/orders/rollback", url.Values{"reason": {evil}, "stage": {"off"}, "csrf": {csrf}}, false, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	assert.NotContains(t, r.body, "<script>alert")
	r = e.do(t, nil, "GET", "/m/%3Cscript%3E", nil, true, nil)
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.Equal(t, "text/plain; charset=utf-8", r.header.Get("Content-Type"), "an error echoing the name is never HTML")
}

func TestRollbackEndsACanary(t *testing.T) {
	t.Parallel()
	e := newEnv(t, console.WithActions())
	walk(t, e)
	_, err := e.ctrl.Set(ctx(t), flags.Request{Migration: "orders", Stage: flags.Live, Percent: 5, Actor: "alice", Reason: "canary", Force: true})
	require.NoError(t, err)
	r := e.do(t, nil, "POST", "/m/orders/rollback", url.Values{"stage": {"shadow"}, "reason": {"canary errors"}}, true, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	st := e.state(t, "orders")
	assert.Equal(t, flags.Shadow, st.Stage)
	assert.Nil(t, st.Rollout, "the 5% on live stepped back to shadow")

	r = e.do(t, nil, "POST", "/m/orders/rollback", url.Values{"stage": {"shadow"}, "reason": {"again"}}, true, nil)
	assert.Equal(t, http.StatusBadRequest, r.status, "nothing is ahead of shadow any more")
	assert.Contains(t, r.body, "pick a stage before shadow")
}

// One corrupt stored flag does not blank the console: the overview and the
// metrics show the other migrations, an alert names the corrupt one and the
// way out, and its own page says it is corrupt rather than that the store
// is unavailable.
func TestCorruptFlagIsAnAlertNotAnOutage(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	walk(t, e)
	_, err := e.pool.Exec(ctx(t), `INSERT INTO `+pgx.Identifier{e.store.Schema(), "stage_flags"}.Sanitize()+
		` (migration, doc, revision) VALUES ('broken', '{"migration":"broken","stage":"sideways","revision":1}', 1)`)
	require.NoError(t, err)

	r := e.do(t, nil, "GET", "/api/overview", nil, true, nil)
	require.Equal(t, http.StatusOK, r.status, r.body)
	var ov console.Overview
	require.NoError(t, json.Unmarshal([]byte(r.body), &ov))
	require.Len(t, ov.Migrations, 1)
	assert.Equal(t, "orders", ov.Migrations[0].Name)
	texts := strings.Join(alertTexts(ov.Alerts), "\n")
	assert.Contains(t, texts, "flag broken is corrupt in the store")
	assert.Contains(t, texts, "dimmer stage set broken STAGE --force --reason TEXT")
	page := e.do(t, nil, "GET", "/", nil, true, nil)
	require.Equal(t, http.StatusOK, page.status)
	assert.Contains(t, page.body, "flag broken is corrupt in the store")

	r = e.do(t, nil, "GET", "/api/m/broken", nil, true, nil)
	assert.Equal(t, http.StatusInternalServerError, r.status)
	assert.Contains(t, r.body, "stored flag is corrupt")
	assert.NotContains(t, r.body, "store unavailable")

	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	reg, err := e.srv.RegisterMetrics(mp.Meter("console-test"))
	require.NoError(t, err)
	defer reg.Unregister()
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(ctx(t), &rm))
	var names []string
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			names = append(names, m.Name)
		}
	}
	assert.NotEmpty(t, names, "the other migrations' metrics are still collected")
}
