"""The status page's script and style sheet, served by the agent itself at /static/ (no asset from the
internet, no front-end build). Kept as Python strings so an installed agent carries them without package data.

The script only refreshes: every `data-refresh` seconds (while the tab is visible) it refetches the page
and swaps in the new body. The new body comes from the same origin and the same escaping template, and a
body parsed by DOMParser never runs scripts. Without the script, `<noscript>` meta refresh does the same.
"""

__all__ = ["SCRIPT", "STYLE"]

SCRIPT = r"""'use strict';
(function () {
  var every = parseInt(document.body.getAttribute('data-refresh'), 10) || 10;
  var failedSince = null;
  var refreshes = 0;
  function say(text) {
    var el = document.getElementById('refresh');
    if (el) { el.textContent = text; }
  }
  function refresh() {
    if (document.hidden) { return; }
    fetch(window.location.pathname, {cache: 'no-store', credentials: 'same-origin'})
      .then(function (resp) {
        if (!resp.ok) { throw new Error('HTTP ' + resp.status); }
        return resp.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, 'text/html');
        document.title = doc.title;
        document.body.replaceWith(doc.body);
        refreshes += 1;
        document.documentElement.setAttribute('data-refreshes', String(refreshes));
        failedSince = null;
        say('live: refreshed every ' + every + ' s');
      })
      .catch(function () {
        if (failedSince === null) { failedSince = new Date(); }
        say('the agent does not answer (since ' + failedSince.toLocaleTimeString() + '); retrying');
      });
  }
  document.documentElement.setAttribute('data-live', 'js');
  say('live: refreshed every ' + every + ' s');
  setInterval(refresh, every * 1000);
  document.addEventListener('visibilitychange', function () { if (!document.hidden) { refresh(); } });
}());
"""

STYLE = """\
:root { --fg: #1d1f21; --bg: #fafafa; --card: #fff; --muted: #666; --line: #ddd;
  --ok: #1a7f37; --drift: #b35900; --failed: #c62828; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e6e6; --bg: #15171a; --card: #1f2226; --muted: #9aa0a6; --line: #33373c; }
}
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 64rem; padding: 0.75rem; font: 15px/1.45 system-ui, -apple-system, "Segoe UI",
  Roboto, sans-serif; color: var(--fg); background: var(--bg); overflow-wrap: anywhere; }
h1 { font-size: 1.3rem; margin: 0.2rem 0; }
h2 { font-size: 1.1rem; margin: 0 0 0.5rem; }
header p { margin: 0.2rem 0; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.9em; }
pre { white-space: pre-wrap; margin: 0; }
.meta, .ref, .since, footer, time { color: var(--muted); }
.subject { font-weight: 600; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 0.75rem;
  margin: 0.75rem 0; }
section.error { border-color: var(--failed); }
.badge { display: inline-block; font-size: 0.8rem; font-weight: 600; padding: 0 0.4rem; border-radius: 3px;
  border: 1px solid var(--line); vertical-align: middle; }
.badge.ok, .result-converged, .result-applied, .badge.applied, .badge.corrected { color: var(--ok); border-color: var(--ok); }
.badge.drift, .result-drift { color: var(--drift); border-color: var(--drift); }
.badge.failed, .result-failed, .result-invalid, .result-error, .badge.rolled_back, .badge.invalid,
.badge.error { color: var(--failed); border-color: var(--failed); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 0.2rem 0.4rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: 0.85rem; }
svg.split { width: 100%; height: 1.2rem; display: block; border-radius: 3px; background: var(--line); }
.c0 { fill: #1f77b4; background: #1f77b4; } .c1 { fill: #2ca02c; background: #2ca02c; }
.c2 { fill: #ff7f0e; background: #ff7f0e; } .c3 { fill: #9467bd; background: #9467bd; }
.c4 { fill: #17becf; background: #17becf; } .c5 { fill: #8c564b; background: #8c564b; }
.key { display: inline-block; width: 0.8rem; height: 0.8rem; margin-right: 0.35rem; border-radius: 2px;
  vertical-align: -0.1rem; }
table.legend { width: auto; margin-top: 0.4rem; }
progress { width: 100%; }
.canary.state-failed { color: var(--failed); }
.reason, .note, .wave { margin: 0.3rem 0; }
ol.events { list-style: none; padding: 0; margin: 0; }
ol.events li { padding: 0.2rem 0; border-bottom: 1px solid var(--line); }
a { color: #1f6feb; }
@media (max-width: 40rem) { body { font-size: 14px; padding: 0.4rem; } th, td { padding: 0.15rem 0.25rem; } }
"""
