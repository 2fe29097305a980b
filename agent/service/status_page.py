"""The status page (`GET /`) and `GET /api/status` on the agent's `--listen`: read-only, one source.

Both answer from `read_report(layout)`: the status file (and the staged-waves record) turned into the
documented shape by `agent.core.status_view.report`, the same function `gitops-agent status` prints.
Nothing here changes the host; every handler only reads files under the root.

The page is server-rendered (Jinja2, autoescape on: every value from the state repo, a commit subject or an
error message included, is text, never markup) and works without JavaScript (`<noscript>` meta refresh).
With JavaScript, `/static/status.js` (served by the agent; no inline script, so the content security policy
can forbid inline code outright) refetches the page and swaps its body, pausing while the tab is hidden.
The traffic split is drawn as SVG rectangles: geometry in attributes, colours by class, so no inline
`style` is needed either. Headers: CSP `default-src 'none'` plus only what the page uses from itself,
`frame-ancestors 'none'` and `X-Frame-Options: DENY` (no framing: clickjacking), `nosniff`, no referrer.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Callable

from jinja2 import Environment, select_autoescape

from agent import __version__
from agent.core.layout import Layout
from agent.core.status_view import human_age, report
from agent.service.http import Handler, Request, Response
from agent.service.status_assets import SCRIPT, STYLE
from agent.service.store import load_status

__all__ = ["read_report", "render_page", "status_routes", "SECURITY_HEADERS", "REFRESH_S"]

REFRESH_S = 10
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = (("Content-Security-Policy", CSP), ("X-Frame-Options", "DENY"),
                    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                    ("Cache-Control", "no-store"))
HTML = "text/html; charset=utf-8"
JSON = "application/json"


def read_report(layout: Layout, now: float | None = None) -> dict:
    """The documented status of the agent under `layout` (read-only: a corrupt file is not set aside)."""
    status = load_status(layout.status_file).to_json()
    waves = None
    try:
        data = json.loads((layout.state / "waves.json").read_text())
        waves = data if isinstance(data, dict) else None
    except (OSError, ValueError):
        pass
    from agent.service.control import control_file, load_control

    from agent.service.selfupgrade import read_upgrade_state

    control = load_control(control_file(layout.root)).to_json()
    out = report(status, time.time() if now is None else now, waves, __version__, control)
    out["agent_upgrade"] = read_upgrade_state(layout.state) or None     # the agent's own upgrade (self-upgrade)
    return out


def _iso(t: float | None) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else ""


_env = Environment(autoescape=select_autoescape(default=True, default_for_string=True), trim_blocks=True,
                   lstrip_blocks=True)
_env.filters["age"] = human_age
_env.filters["iso"] = _iso

_PAGE = _env.from_string("""\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ r.host or "gitops-agent" }}: {{ r.result or "no reconcile yet" }}</title>
<link rel="stylesheet" href="/static/status.css">
<noscript><meta http-equiv="refresh" content="{{ refresh }}"></noscript>
<script src="/static/status.js" defer></script>
</head>
<body data-refresh="{{ refresh }}">
<header>
  <h1><span class="host">{{ r.host or "this host" }}</span>
    <span class="badge result-{{ r.result or 'none' }}" id="result">{{ r.result or "no reconcile yet" }}</span>
    {% if r.drifted %}<span class="badge drift" id="drifted">{{ r.drifted }} drifted</span>{% endif %}</h1>
  {% if r.applied %}
  <p class="rev" id="applied">applied <code class="sha" title="{{ r.applied.sha }}">{{ r.applied.short }}</code>
    <span class="subject">{{ r.applied.subject }}</span>
    {% if r.applied.age_s is not none %}<time datetime="{{ r.applied.committed_at|iso }}" title="committed {{ r.applied.committed_at|iso }}">committed {{ r.applied.age_s|age }} ago</time>{% endif %}
    {% if r.applied.ref %} · <span class="ref">{{ r.applied.ref }}</span>{% endif %}</p>
  {% else %}
  <p class="rev" id="applied">no revision applied yet</p>
  {% endif %}
  {% if r.attempted and (not r.applied or r.attempted.sha != r.applied.sha) %}
  <p class="rev attempted">attempted <code class="sha" title="{{ r.attempted.sha }}">{{ r.attempted.short }}</code>
    <span class="subject">{{ r.attempted.subject }}</span></p>
  {% endif %}
  <p class="meta">last reconcile <time datetime="{{ r.last_reconcile_at|iso }}">{{ r.last_reconcile_age_s|age }} ago</time>
    · <span id="refresh">refreshes every {{ refresh }} s</span></p>
</header>
<main id="status">
{% set up = r.agent_upgrade %}
{% if up and up.phase in ("failed", "waiting") %}
<section class="{{ 'error' if up.phase == 'failed' else 'app' }}" id="agent-upgrade"><h2>agent upgrade to {{ up.to }} {{ "failed" if up.phase == "failed" else "waiting for this host's wave" }} (running {{ r.agent_version }})</h2>
<pre>{{ up.reason }}</pre></section>
{% endif %}
{% if r.last_error %}
<section class="error" id="last-error"><h2>last error <time datetime="{{ r.last_error_at|iso }}">{{ r.last_error_at|iso }}</time></h2>
<pre>{{ r.last_error }}</pre></section>
{% endif %}
{% for app in r.apps %}
<section class="app" id="app-{{ app.name }}" data-app="{{ app.name }}">
  <h2>{{ app.name }}
    {% if app.drifted %}<span class="badge drift">{{ app.drifted }} drifted</span>{% else %}<span class="badge ok">in sync</span>{% endif %}
    {% if app.mode %}<span class="badge">{{ app.mode }}</span>{% endif %}</h2>
  {% if app.frontend %}
  {% set fe = app.frontend %}
  <div class="frontend" data-frontend="{{ app.name }}">
    <p><a class="fe-link" href="{{ fe.url }}">{{ fe.listen }}</a> · {{ fe.strategy }}
      {% if fe.ab %} · A/B: {{ fe.ab.percent }}% of clients to {{ fe.ab.variant }}{% endif %}
      {% if not fe.live %} · <em>desired split (the load balancer was not read)</em>{% endif %}</p>
    <svg class="split" viewBox="0 0 100 6" preserveAspectRatio="none" role="img" aria-label="traffic split of {{ app.name }}">
      {% set ns = namespace(x=0) %}
      {% for b in fe.split %}
      <rect class="c{{ loop.index0 % 6 }}" x="{{ ns.x }}" y="0" width="{{ b.percent }}" height="6"><title>{{ b.backend }} {{ b.percent }}%</title></rect>
      {% set ns.x = ns.x + b.percent %}
      {% endfor %}
    </svg>
    <table class="legend">
      <tr><th>backend</th><th>weight</th><th>share</th></tr>
      {% for b in fe.split %}
      <tr class="backend" data-backend="{{ b.backend }}" data-percent="{{ b.percent }}"><td><span class="key c{{ loop.index0 % 6 }}"></span>{{ b.backend }}</td><td>{{ b.weight }}</td><td>{{ b.percent }}%</td></tr>
      {% endfor %}
    </table>
  </div>
  {% endif %}
  {% if app.canary %}
  {% set c = app.canary %}
  <div class="canary state-{{ c.state }}" data-canary="{{ c.state }}">
    <p>canary <strong>{{ c.service }}</strong>: {{ c.state }} at step {{ c.step }}/{{ c.steps|length }} ({{ c.percent }}%)
      {% if c.age_s is not none %}for {{ c.age_s|age }}{% endif %}
      {% if c.probes %} · {{ c.errors }}/{{ c.probes }} probes failed{% endif %}</p>
    <progress max="{{ c.steps|length }}" value="{{ c.step if c.state != 'complete' else c.steps|length }}">step {{ c.step }} of {{ c.steps|length }}</progress>
    {% if c.reason %}<p class="reason">{{ c.reason }}</p>{% endif %}
    {% if c.analysis %}<p class="reason">analysis: {{ c.analysis }}</p>{% endif %}
  </div>
  {% endif %}
  {% if app.suspended %}
  <p class="suspended" data-suspended="{{ 'host' if app.suspended.host_wide else 'app' }}">suspended{{ ' (the whole host)' if app.suspended.host_wide else '' }}: {{ app.suspended.reason }}{% if app.suspended.at %} (since {{ app.suspended.at|iso }}){% endif %}; drift is reported, not healed</p>
  {% endif %}
  {% if app.quarantined %}
  <p class="quarantined" data-quarantined="{{ app.quarantined.revision }}">quarantined: revision <code>{{ app.quarantined.revision }}</code>: {{ app.quarantined.reason }} (a new commit for the app, or <code>gitops-agent retry --app {{ app.name }}</code>, lifts it)</p>
  {% endif %}
  {% if app.window %}
  <p class="window" data-window="{{ 'open' if app.window.open else 'closed' }}">release window {{ 'open' if app.window.open else 'closed' }}{% if not app.window.open and app.window.opens_at %}: opens {{ app.window.opens_at|iso }}{% endif %}</p>
  {% endif %}
  {% if app.wave %}
  <p class="wave">wave {{ app.wave.wave }}: change <code>{{ app.wave.change }}</code> {{ app.wave.state }}: {{ app.wave.reason }}</p>
  {% endif %}
  {% for note in app.notes %}<p class="note">{{ note }}</p>{% endfor %}
  <div class="scroll"><table class="services">
    <tr><th>service</th><th>env</th><th>port</th><th>state</th><th>detail</th></tr>
    {% for s in app.services %}
    <tr class="service state-{{ s.state }}" data-service="{{ s.name }}"><td>{{ s.name }}</td><td>{{ s.environment }}</td><td>{{ s.port or "" }}</td>
      <td><span class="badge {{ s.state }}">{{ s.state }}</span>{% if s.drift_since %} <span class="since">since <time datetime="{{ s.drift_since|iso }}">{{ s.drift_age_s|age }}</time></span>{% endif %}</td>
      <td>{{ s.message }}</td></tr>
    {% endfor %}
    {% for e in app.environments %}
    <tr class="env state-{{ e.state }}" data-environment="{{ e.name }}"><td>venv {{ e.name }}</td><td></td><td></td>
      <td><span class="badge {{ e.state }}">{{ e.state }}</span>{% if e.drift_since %} <span class="since">since <time datetime="{{ e.drift_since|iso }}">{{ e.drift_age_s|age }}</time></span>{% endif %}</td>
      <td>{{ e.message }}</td></tr>
    {% endfor %}
  </table></div>
</section>
{% endfor %}
{% set others = r.resources|dictsort|selectattr("1.app", "equalto", "")|list %}
{% if others %}
<section class="app" id="host-resources"><h2>host</h2>
  <div class="scroll"><table>
    {% for key, res in others %}
    <tr class="state-{{ res.state }}"><td>{{ key }}</td><td><span class="badge {{ res.state }}">{{ res.state }}</span>{% if res.drift_since %} <span class="since">since {{ res.drift_age_s|age }}</span>{% endif %}</td><td>{{ res.message }}</td></tr>
    {% endfor %}
  </table></div>
</section>
{% endif %}
<section id="events"><h2>last events</h2>
  {% if r.events %}
  <ol class="events">
    {% for e in r.events[:20] %}
    <li class="event kind-{{ e.kind }}"><time datetime="{{ e.at|iso }}">{{ e.at|iso }}</time> <span class="badge {{ e.kind }}">{{ e.kind }}</span>
      {% if e.app %}<strong>{{ e.app }}</strong>{% endif %} {{ e.message }}</li>
    {% endfor %}
  </ol>
  {% else %}<p>none yet</p>{% endif %}
</section>
</main>
<footer>gitops-agent {{ r.agent_version }} · generated <time datetime="{{ r.generated_at|iso }}">{{ r.generated_at|iso }}</time>
  · <a href="/api/status">/api/status</a> · <a href="/metrics">/metrics</a></footer>
</body>
</html>
""")


def render_page(r: dict, refresh_s: int = REFRESH_S) -> str:
    return _PAGE.render(r=r, refresh=refresh_s)


_ASSETS = {"status.js": (SCRIPT, "text/javascript; charset=utf-8"), "status.css": (STYLE, "text/css; charset=utf-8")}


def _static(name: str) -> Handler:
    text, kind = _ASSETS[name]
    body = text.encode()
    return lambda _r: Response(200, body, kind, SECURITY_HEADERS)


def status_routes(layout: Layout, clock: Callable[[], float] = time.time) -> dict[tuple[str, str], Handler]:
    """`/` (the page), `/api/status` (its JSON) and the page's two static files."""

    def page(_request: Request) -> Response:
        return Response(200, render_page(read_report(layout, clock())).encode(), HTML, SECURITY_HEADERS)

    def api(_request: Request) -> Response:
        return Response(200, (json.dumps(read_report(layout, clock()), indent=1) + "\n").encode(), JSON,
                        SECURITY_HEADERS)

    return {("GET", "/"): page, ("GET", "/api/status"): api,
            ("GET", "/static/status.js"): _static("status.js"), ("GET", "/static/status.css"): _static("status.css")}
