// dimmer console: refreshes the #live part of the page in place and sends
// the action forms without leaving the page. Every piece of HTML inserted
// here was rendered and escaped by the server's html/template.
(function () {
  "use strict";
  var body = document.body;
  var live = document.getElementById("live");
  var banner = document.getElementById("banner");
  var every = parseInt(body.dataset.refresh, 10) || 2000;
  var csrf = body.dataset.csrf || "";
  var busy = false;
  var again = false;

  function say(text) {
    if (!banner) return;
    banner.textContent = text;
    banner.hidden = text === "";
  }

  // The action forms act on the revision the page shows.
  function syncRevision() {
    var st = document.getElementById("state");
    if (!st) return;
    document.querySelectorAll("form.action input[name=revision]").forEach(function (i) {
      i.value = st.dataset.revision;
      i.defaultValue = st.dataset.revision;
    });
  }

  function refresh() {
    if (!live) return Promise.resolve();
    if (busy) { again = true; return Promise.resolve(); }
    busy = true;
    var u = new URL(location.href);
    u.searchParams.set("part", "live");
    return fetch(u, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (r.status === 401) { say("session expired: reload the page to log in again"); return; }
        return r.text().then(function (t) {
          if (!r.ok) { say("refresh failed (" + r.status + "): " + t); return; }
          live.innerHTML = t;
          syncRevision();
          say("");
        });
      })
      .catch(function (e) { say("refresh failed: " + e); })
      .finally(function () {
        busy = false;
        // A change announced while a refresh was in flight may have missed it.
        if (again) { again = false; refresh(); }
      });
  }

  document.querySelectorAll("form.action").forEach(function (f) {
    f.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var out = document.getElementById("result");
      // A form with several buttons (pause, resume) posts to the clicked one's formaction.
      var btn = ev.submitter || f.querySelector("button");
      var url = btn.getAttribute("formaction") || f.action;
      btn.disabled = true;
      fetch(url, {
        method: "POST", credentials: "same-origin",
        headers: { "X-CSRF-Token": csrf, Accept: "text/html" },
        body: new URLSearchParams(new FormData(f))
      }).then(function (r) {
        return r.text().then(function (t) {
          out.innerHTML = t;
          if (r.ok) f.querySelectorAll("input[name=reason], input[name=percent], input[name=confirm]").forEach(function (i) { i.value = ""; });
          busy = false;
          return refresh();
        });
      }).catch(function (e) {
        out.textContent = "request failed: " + e;
      }).finally(function () { btn.disabled = false; });
    });
  });

  if (live) setInterval(refresh, every);
  // A stage change shows at once; polling still brings the rest.
  if (live && body.dataset.events && window.EventSource) {
    var es = new EventSource(body.dataset.events);
    es.addEventListener("change", function () { refresh(); });
    es.onopen = function () { body.dataset.stream = "open"; };
    es.onerror = function () { body.dataset.stream = "reconnecting"; };
  }
})();
