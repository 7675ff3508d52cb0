package browsertest

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/open-feature/go-sdk/openfeature"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/dimmertest"
	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/pgflags"
)

const token = "browser-token-0123456789abcdef"

// evil is text a service or an operator could put into an instance id, an
// actor or a reason; the page must show it as text and never run it.
const evil = `<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'"`

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// chromiumPath finds the browser scripts/need-chromium.sh installed.
func chromiumPath(t *testing.T) string {
	for _, c := range []string{os.Getenv("DIMMER_CHROMIUM"), "chromium", "chromium-browser"} {
		if c == "" {
			continue
		}
		if p, err := exec.LookPath(c); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("chromium is not installed (CI=true makes this a failure): run through `make test`, which installs the Debian package chromium")
	}
	t.Skip("chromium is not installed, skipping (run through `make test`, or apt-get install chromium)")
	return ""
}

// browser starts a headless Chromium with a fresh profile, closed when the
// test ends, and returns a tab's context.
func browser(t *testing.T) context.Context {
	exe := chromiumPath(t)
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(exe),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 1000),
	)
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(alloc)
	t.Cleanup(func() { cancel(); cancelAlloc() })
	// The first run starts the browser; it must not carry a timeout.
	require.NoError(t, chromedp.Do(ctx), "start chromium")
	return ctx
}

// step bounds one browser step.
func step(t *testing.T, tab context.Context, what string, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	c, cancel := context.WithTimeout(tab, 30*time.Second)
	defer cancel()
	require.NoError(t, chromedp.Do(c, actions...), what)
}

func eval[T any](t *testing.T, tab context.Context, js string) T {
	t.Helper()
	c, cancel := context.WithTimeout(tab, 30*time.Second)
	defer cancel()
	v, err := chromedp.Run(c, chromedp.Evaluate[T](js))
	require.NoError(t, err, js)
	return v
}

// waitFor polls a JavaScript predicate in the page until it holds.
func waitFor(t *testing.T, tab context.Context, what, predicate string) {
	t.Helper()
	c, cancel := context.WithTimeout(tab, 30*time.Second)
	defer cancel()
	var err error
	for {
		_, err = chromedp.Run(c, chromedp.Poll[chromedp.Void](predicate, chromedp.WithPollingInterval(50*time.Millisecond)))
		// A poll runs in the page's JavaScript context of the moment; one
		// started as a navigation ends may be handed the context that
		// navigation destroyed, and is started again in the new one.
		if err == nil || c.Err() != nil || !contextGone(err) {
			break
		}
	}
	if err != nil {
		body, _ := chromedp.Run(tab, chromedp.Evaluate[string](`document.body ? document.body.innerText : ""`))
		screenshot(t, tab, "failed-"+strings.ReplaceAll(what, " ", "-"))
		t.Fatalf("waiting for %s (%s): %v\npage text:\n%s", what, predicate, err, body)
	}
}

// contextGone reports whether err says the JavaScript context an
// evaluation ran in went away with a navigation.
func contextGone(err error) bool {
	for _, m := range []string{"Cannot find context with specified id", "Execution context was destroyed", "Inspected target navigated or closed"} {
		if strings.Contains(err.Error(), m) {
			return true
		}
	}
	return false
}

func screenshot(t *testing.T, tab context.Context, name string) {
	t.Helper()
	dir := os.Getenv("DIMMER_SCREENSHOT_DIR")
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "dimmer-console-screenshots")
	}
	require.NoError(t, os.MkdirAll(dir, 0o755))
	c, cancel := context.WithTimeout(tab, 30*time.Second)
	defer cancel()
	png, err := chromedp.Run(c, chromedp.FullScreenshot(100))
	require.NoError(t, err, "screenshot")
	p := filepath.Join(dir, t.Name()+"-"+name+".png")
	require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
	require.NoError(t, os.WriteFile(p, png, 0o644))
	t.Logf("screenshot %s: %s", name, p)
}

type env struct {
	bf     *backfill.Backfiller
	schema string
	store  *pgflags.Store
	ctrl   *flags.Controller
	url    string
}

func newEnv(t *testing.T) *env {
	pool, schema := dimmertest.Schema(t)
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema), pgflags.WithLogger(quiet))
	require.NoError(t, err)
	ctx := context.Background()
	require.NoError(t, store.Install(ctx))
	ctrl, err := flags.NewController(store, flags.WithFleet(store),
		flags.WithGuards(flags.HealthGuard(store, flags.WatchdogConfig{MinSamples: 100})),
		flags.WithControllerLogger(quiet))
	require.NoError(t, err)
	// A backfill job of orders, copied and verified, for the backfill panel.
	_, err = pool.Exec(ctx, `CREATE TABLE orders (id bigint PRIMARY KEY, cents bigint, version bigint NOT NULL);
CREATE TABLE orders_v2 (id bigint PRIMARY KEY, amount numeric, version bigint NOT NULL);
INSERT INTO orders SELECT g, g * 100, 1 FROM generate_series(1, 300) g`)
	require.NoError(t, err)
	bf, err := backfill.New(pool, backfill.WithSchema(schema), backfill.WithFlagStore(store), backfill.WithLogger(quiet))
	require.NoError(t, err)
	require.NoError(t, bf.Install(ctx))
	srv, err := console.New(ctrl, store, token, console.WithActions(), console.WithRefresh(200*time.Millisecond), console.WithBackfills(bf),
		console.WithHistory(100*time.Millisecond, 600), console.WithLogger(quiet))
	require.NoError(t, err)
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	return &env{store: store, ctrl: ctrl, url: hs.URL, bf: bf, schema: schema}
}

// runBackfill copies orders into orders_v2 (the migration must be in dualwrite).
func (e *env) runBackfill(t *testing.T) {
	_, err := e.bf.Run(context.Background(), backfill.Job{Name: "orders-v2", Migration: "orders", Spec: backfill.Spec{
		Source: backfill.Table{Schema: e.schema, Name: "orders"}, Target: backfill.Table{Schema: e.schema, Name: "orders_v2"},
		Key: []string{"id"}, Columns: []string{"id", "amount", "version"}, Exprs: map[string]string{"amount": "cents / 100.0"},
		VersionColumn: "version",
	}})
	require.NoError(t, err)
}

func (e *env) beat(t *testing.T, id string, rev int64, attrs map[string]string) {
	t.Helper()
	require.NoError(t, e.store.Heartbeat(context.Background(), flags.Instance{
		ID: id, Build: "v2.0.1", Applied: map[string]int64{"orders": rev}, Attributes: attrs,
		StartedAt: time.Now().Add(-time.Hour), SeenAt: time.Now(),
	}, time.Minute))
}

func (e *env) state(t *testing.T) flags.State {
	st, err := e.store.Load(context.Background(), "orders")
	require.NoError(t, err)
	return st
}

func (e *env) auditLen(t *testing.T) int {
	a, err := e.store.Audit(context.Background(), "orders", 0)
	require.NoError(t, err)
	return len(a)
}

func shadowHealthy(compared int64) map[string]string {
	b, _ := json.Marshal(flags.Health{Ops: compared, Compared: compared, Mismatches: 3})
	return map[string]string{"dimmer.health/orders/shadow": string(b)}
}

func TestConsoleInBrowser(t *testing.T) {
	e := newEnv(t)
	bg := context.Background()
	// orders: off -> dualwrite -> shadow, with evil text in an instance id,
	// an actor and a reason; users: dualwrite.
	e.beat(t, "api-1", 0, nil)
	e.beat(t, evil, 0, nil)
	_, err := e.ctrl.Advance(bg, "orders", evil, evil)
	require.NoError(t, err)
	e.runBackfill(t)
	_, err = e.ctrl.Advance(bg, "users", "alice", "start")
	require.NoError(t, err)
	e.beat(t, "api-1", 1, nil)
	e.beat(t, evil, 1, nil)
	_, err = e.ctrl.Advance(bg, "orders", "alice", "backfill verified")
	require.NoError(t, err)
	// api-2 still routes by revision 1, and nobody published shadow
	// windows: going live must fail the fleet barrier and the health check.
	e.beat(t, "api-2", 1, nil)

	tab := browser(t)

	// Without the token: the data is refused, and pages show the login form.
	resp, err := chromedp.Run(tab, chromedp.NavigateResponse(e.url+"/api/overview"))
	require.NoError(t, err)
	assert.Equal(t, int64(http.StatusUnauthorized), resp.Status)
	assert.NotContains(t, eval[string](t, tab, `document.body.innerText`), "orders")
	resp, err = chromedp.Run(tab, chromedp.NavigateResponse(e.url+"/"))
	require.NoError(t, err)
	assert.Equal(t, int64(http.StatusUnauthorized), resp.Status)
	screenshot(t, tab, "login")

	resp, err = chromedp.RunResponse(tab,
		chromedp.SetValue(chromedp.ID("token"), token),
		chromedp.SetValue(chromedp.ID("operator"), "carol"),
		chromedp.Click(chromedp.CSS(`#login button`)),
	)
	require.NoError(t, err, "log in")
	require.Equal(t, int64(http.StatusOK), resp.Status)

	t.Run("OverviewListsMigrations", func(t *testing.T) {
		waitFor(t, tab, "overview rows", `document.querySelectorAll("tr.migration").length === 2`)
		rows := eval[[]string](t, tab, `[...document.querySelectorAll("tr.migration")].map(r => r.innerText)`)
		assert.Contains(t, rows[0], "orders")
		assert.Contains(t, rows[0], "shadow")
		assert.Contains(t, rows[0], "NO-GO")
		assert.Contains(t, rows[0], "3 of 3 instances have not applied revision 2")
		assert.Contains(t, rows[1], "users")
		assert.Contains(t, rows[1], "dualwrite")
		screenshot(t, tab, "overview")
	})

	step(t, tab, "open orders", chromedp.Navigate(e.url+"/m/orders"))
	waitFor(t, tab, "migration page", `document.getElementById("stage") !== null`)
	// Set once: a reload of the page would lose it.
	eval[bool](t, tab, `window.__sameDocument = true`)

	t.Run("TextIsEscaped", func(t *testing.T) {
		assert.Nil(t, eval[any](t, tab, `window.__pwned === undefined ? null : window.__pwned`), "no injected script ran")
		reasons := eval[[]string](t, tab, `[...document.querySelectorAll("#timeline .reason")].map(e => e.textContent)`)
		assert.Contains(t, reasons, evil, "the reason is shown as the text it is")
		actors := eval[[]string](t, tab, `[...document.querySelectorAll("#timeline .actor")].map(e => e.textContent)`)
		assert.Contains(t, actors, evil)
		ids := eval[[]string](t, tab, `[...document.querySelectorAll("#fleet td:first-child")].map(e => e.textContent)`)
		assert.Contains(t, ids, evil)
		assert.Zero(t, eval[int](t, tab, `document.querySelectorAll("#live script, #live img").length`))
	})

	t.Run("RefusedAdvanceShowsEveryFailedCheck", func(t *testing.T) {
		before, n := e.state(t), e.auditLen(t)
		step(t, tab, "advance",
			chromedp.SetValue(chromedp.CSS(`#advance input[name=reason]`), "go live now"),
			chromedp.Click(chromedp.CSS(`#advance button`)),
		)
		waitFor(t, tab, "refusal", `document.querySelectorAll("#action-result li.fail").length > 0`)
		failed := eval[[]string](t, tab, `[...document.querySelectorAll("#action-result li.fail b")].map(e => e.textContent)`)
		assert.ElementsMatch(t, []string{"fleet-acknowledged", "health"}, failed)
		text := eval[string](t, tab, `document.getElementById("action-result").innerText`)
		assert.Contains(t, text, "api-2 at revision 1")
		assert.Contains(t, text, "only 0 comparisons in shadow")
		assert.Equal(t, before, e.state(t))
		assert.Equal(t, n+1, e.auditLen(t), "the refusal is audited")
		waitFor(t, tab, "refusal in the timeline", `document.querySelector("#timeline li.event.refused .reason")?.textContent === "go live now"`)
		screenshot(t, tab, "refused")
	})

	t.Run("AllowedAdvanceChangesThePageInPlace", func(t *testing.T) {
		e.beat(t, "api-1", 2, shadowHealthy(500))
		e.beat(t, "api-2", 2, shadowHealthy(500))
		e.beat(t, evil, 2, nil)
		// The page refreshes itself: the verdict turns to GO without a click.
		waitFor(t, tab, "GO verdict", `document.querySelector("#next .verdict")?.textContent === "GO"`)
		step(t, tab, "advance",
			chromedp.SetValue(chromedp.CSS(`#advance input[name=reason]`), "shadow clean for a day"),
			chromedp.Click(chromedp.CSS(`#advance button`)),
		)
		waitFor(t, tab, "stage live", `document.getElementById("stage")?.textContent === "live"`)
		waitFor(t, tab, "timeline entry", `document.querySelector("#timeline li.event .reason")?.textContent === "shadow clean for a day"`)
		assert.Equal(t, "carol (console)", eval[string](t, tab, `document.querySelector("#timeline li.event .actor").textContent`))
		assert.True(t, eval[bool](t, tab, `window.__sameDocument === true`), "the page was not reloaded")
		assert.Equal(t, flags.Live, e.state(t).Stage)
		screenshot(t, tab, "advanced")
	})

	t.Run("WatchdogRollbackAppearsByItself", func(t *testing.T) {
		// A 3s window has 50ms slots; the watchdog judges only slots after
		// the stage's last change, so observe until a judgement trips.
		wd, err := flags.NewWatchdog(e.ctrl, flags.WatchdogConfig{Window: 3 * time.Second, Interval: 100 * time.Millisecond, MinSamples: 20}, flags.WithWatchdogLogger(quiet))
		require.NoError(t, err)
		var trips []flags.Trip
		for deadline := time.Now().Add(20 * time.Second); len(trips) == 0 && time.Now().Before(deadline); {
			for i := range 40 {
				wd.Observe(flags.Observation{Migration: "orders", Stage: flags.Live, Op: flags.Write, Side: flags.New, Latency: time.Millisecond, Err: i%2 == 0})
			}
			trips = wd.Judge(bg)
			if len(trips) == 0 {
				time.Sleep(50 * time.Millisecond) // the next slot
			}
		}
		require.Len(t, trips, 1)
		require.NoError(t, trips[0].Err)
		waitFor(t, tab, "stage shadow", `document.getElementById("stage")?.textContent === "shadow"`)
		waitFor(t, tab, "automatic rollback", `document.querySelector("#timeline li.event")?.classList.contains("automatic")`)
		first := eval[string](t, tab, `document.querySelector("#timeline li.event").innerText`)
		assert.Contains(t, first, "AUTOMATIC ROLLBACK")
		assert.Contains(t, first, "new-side error rate 50.00%")
		assert.Contains(t, eval[string](t, tab, `document.querySelector("#state .alerts").innerText`), "automatic rollback live -> shadow")
		assert.True(t, eval[bool](t, tab, `window.__sameDocument === true`), "the page was not reloaded")
		screenshot(t, tab, "watchdog")
	})

	t.Run("BackfillPauseAndResume", func(t *testing.T) {
		waitFor(t, tab, "backfill row", `document.querySelector("#backfills tr.job")?.dataset.job === "orders-v2"`)
		step(t, tab, "pause",
			chromedp.SetValue(chromedp.CSS(`#backfill input[name=reason]`), "replica lag"),
			chromedp.Click(chromedp.CSS(`#backfill button[formaction$="backfill-pause"]`)),
		)
		waitFor(t, tab, "paused row", `document.querySelector("#backfills tr.job.paused .jobstate")?.textContent.includes("replica lag (carol (console))")`)
		screenshot(t, tab, "backfill-paused")
		step(t, tab, "resume",
			chromedp.SetValue(chromedp.CSS(`#backfill input[name=reason]`), "lag gone"),
			chromedp.Click(chromedp.CSS(`#backfill button[formaction$="backfill-resume"]`)),
		)
		waitFor(t, tab, "resumed row", `document.querySelector("#backfills tr.job") !== null && document.querySelector("#backfills tr.job.paused") === null`)
		// Both are on the migration's timeline, with who and why.
		waitFor(t, tab, "actions in the timeline", `[...document.querySelectorAll("#timeline li.event.action .move")].map(e => e.textContent).join("|") === "backfill orders-v2 → resumed|backfill orders-v2 → paused"`)
		assert.Equal(t, "lag gone", eval[string](t, tab, `document.querySelector("#timeline li.event.action .reason").textContent`))
		assert.True(t, eval[bool](t, tab, `window.__sameDocument === true`), "the page was not reloaded")
	})

	t.Run("ForcedAdvanceOverridesRefusedChecks", func(t *testing.T) {
		// After the automatic rollback the fleet has not applied the new
		// revision: an advance is refused, but the on-call engineer knows
		// why and forces it, typing the migration's name.
		require.Equal(t, flags.Shadow, e.state(t).Stage)
		step(t, tab, "open the override", chromedp.Click(chromedp.CSS(`details.force summary`)))
		step(t, tab, "force without confirmation",
			chromedp.SetValue(chromedp.CSS(`#force input[name=reason]`), "rollback was a false alarm"),
			chromedp.SetValue(chromedp.CSS(`#force input[name=confirm]`), "users"),
			chromedp.Click(chromedp.CSS(`#force button`)),
		)
		waitFor(t, tab, "confirmation refused", `document.getElementById("action-result")?.innerText.includes("type the migration's name")`)
		assert.Equal(t, flags.Shadow, e.state(t).Stage)
		step(t, tab, "force",
			chromedp.SetValue(chromedp.CSS(`#force input[name=confirm]`), "orders"),
			chromedp.Click(chromedp.CSS(`#force button`)),
		)
		waitFor(t, tab, "stage live", `document.getElementById("stage")?.textContent === "live"`)
		waitFor(t, tab, "forced in the timeline", `document.querySelector("#timeline li.event")?.classList.contains("forced")`)
		first := eval[string](t, tab, `document.querySelector("#timeline li.event").innerText`)
		assert.Contains(t, first, "FORCED")
		assert.Contains(t, first, "rollback was a false alarm")
		assert.Contains(t, first, "carol (console)")
		assert.Contains(t, first, "fleet-acknowledged", "the overridden check is listed")
		assert.True(t, eval[bool](t, tab, `window.__sameDocument === true`), "the page was not reloaded")
		screenshot(t, tab, "forced")
	})

	t.Run("CrossSitePostIsRefused", func(t *testing.T) {
		before, n := e.state(t), e.auditLen(t)
		// Another origin (another port) whose page posts a rollback form to
		// the console: the browser sends the session cookie along (same
		// site), but not the CSRF token.
		evilSite := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "text/html")
			fmt.Fprintf(w, `<form id="f" method="post" action="%s/m/orders/rollback">
<input name="reason" value="pwned"><input name="stage" value="off"></form>
<script>document.getElementById("f").submit()</script>`, e.url)
		}))
		defer evilSite.Close()
		step(t, tab, "visit the other site", chromedp.Navigate(evilSite.URL))
		waitFor(t, tab, "the forged POST's answer", `location.pathname === "/m/orders/rollback" && document.readyState === "complete"`)
		text := eval[string](t, tab, `document.body.innerText`)
		assert.Regexp(t, `(?i)403|forbidden|cross-origin`, text)
		assert.Equal(t, before, e.state(t), "nothing changed")
		assert.Equal(t, n, e.auditLen(t), "nothing audited")
		screenshot(t, tab, "cross-site")
	})
}

// With the store's notifications a stage change shows on an open page at
// once: the page here polls only once an hour, so nothing else could bring
// the change in time.
func TestStageChangeArrivesByEvent(t *testing.T) {
	pool, schema := dimmertest.Schema(t)
	store, err := pgflags.NewStore(pool, pgflags.WithSchema(schema), pgflags.WithLogger(quiet))
	require.NoError(t, err)
	bg := context.Background()
	require.NoError(t, store.Install(bg))
	ctrl, err := flags.NewController(store, flags.WithControllerLogger(quiet))
	require.NoError(t, err)
	_, err = ctrl.Advance(bg, "orders", "alice", "start")
	require.NoError(t, err)
	prov, err := pgflags.NewProvider(pool, pgflags.WithSchema(schema), pgflags.WithLogger(quiet))
	require.NoError(t, err)
	require.NoError(t, prov.InitWithContext(bg, openfeature.EvaluationContext{}))
	t.Cleanup(prov.Shutdown)
	srv, err := console.New(ctrl, store, token, console.WithRefresh(time.Hour), console.WithChanges(prov.EventChannel()), console.WithLogger(quiet))
	require.NoError(t, err)
	runCtx, stop := context.WithCancel(bg)
	ran := make(chan error, 1)
	go func() { ran <- srv.Run(runCtx) }()
	hs := httptest.NewServer(srv)
	t.Cleanup(func() { stop(); <-ran; hs.Close() }) // Run ends the event streams, so Close does not wait on them

	tab := browser(t)
	_, err = chromedp.Run(tab, chromedp.NavigateResponse(hs.URL+"/"))
	require.NoError(t, err)
	_, err = chromedp.RunResponse(tab,
		chromedp.SetValue(chromedp.ID("token"), token),
		chromedp.SetValue(chromedp.ID("operator"), "carol"),
		chromedp.Click(chromedp.CSS(`#login button`)),
	)
	require.NoError(t, err, "log in")
	step(t, tab, "open orders", chromedp.Navigate(hs.URL+"/m/orders"))
	waitFor(t, tab, "stage dualwrite", `document.getElementById("stage")?.textContent === "dualwrite"`)
	eval[bool](t, tab, `window.__sameDocument = true`)
	// A change made before the stream connects would only show at the next
	// poll.
	waitFor(t, tab, "event stream open", `document.body.dataset.stream === "open"`)

	_, err = ctrl.Advance(bg, "orders", "alice", "shadow next")
	require.NoError(t, err)
	waitFor(t, tab, "stage shadow", `document.getElementById("stage")?.textContent === "shadow"`)
	assert.True(t, eval[bool](t, tab, `window.__sameDocument === true`), "the page was not reloaded")
	screenshot(t, tab, "event")
}
