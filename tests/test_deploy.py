"""The shipping assets under deploy/: alert rules (promtool unit tests), the Grafana dashboard (valid JSON,
only metric names from DESIGN.md §5, PromQL that parses), the systemd unit (systemd-analyze verify) and
the supervisord program block (parsed by supervisord's own config code)."""

from __future__ import annotations

import getpass
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "gitops-agent.json"
UNIT = DEPLOY / "systemd" / "gitops-agent.service"
SUPERVISOR_CONF = DEPLOY / "supervisor" / "gitops-agent.conf"

# DESIGN.md §5, the metric names users build on (keep in step with the design and agent/metrics).
METRICS = """
gitops_agent_drift                          gauge
gitops_agent_drifted_resources              gauge
gitops_agent_drift_since_timestamp_seconds  gauge
gitops_agent_drift_corrected_total          counter
gitops_agent_reconcile_total                counter
gitops_agent_reconcile_duration_seconds     histogram
gitops_agent_applied_revision_info          gauge
gitops_agent_revision_invalid               gauge
gitops_agent_source_fetch_errors_total      counter
gitops_agent_last_success_timestamp_seconds gauge
gitops_agent_commit_to_converged_seconds    histogram
gitops_agent_actions_total                  counter
gitops_agent_rollbacks_total                counter
gitops_agent_service_up                     gauge
gitops_agent_traffic_weight                 gauge
"""


def _series_names() -> set[str]:
    names = set()
    for line in METRICS.strip().splitlines():
        name, kind = line.split()
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


SERIES = _series_names()
# plus HAProxy's own exporter (--lb-metrics) for the A/B and canary row, checked against a real HAProxy there
from test_lb_metrics import RELIED_ON as HAPROXY_SERIES  # noqa: E402

SERIES |= HAPROXY_SERIES

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
             "group_right", "inf", "nan"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a small tokenizer, enough for dashboards/rules)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range / subquery selectors
    s = _GROUPING.sub(" ", s)  # by (...), on (...), group_left (...)
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables outside matchers
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        if re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


def test_metric_name_parser():
    assert metric_names('sum by (le) (rate(x_bucket{instance=~"$instance"}[$__rate_interval]))') == {"x_bucket"}
    assert metric_names("time() - a > 1800 unless on (instance) b == 0") == {"a", "b"}
    assert metric_names('histogram_quantile(0.9, c) * 60 and ignoring(x) d{k="v w"}') == {"c", "d"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _all_panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from _all_panels(p.get("panels", []))


def _dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _all_panels(_dashboard()["panels"]) for t in p.get("targets", [])]


def _promtool() -> str:
    exe = shutil.which("promtool")
    if not exe:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    return exe


# --- Prometheus ------------------------------------------------------------------------------------


def test_alert_rules_check():
    out = subprocess.run([_promtool(), "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_unit_tests():
    out = subprocess.run([_promtool(), "test", "rules", str(PROM / "alerts_test.yml")],
                         capture_output=True, text=True, cwd=PROM)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_prometheus_example_config_checks():
    out = subprocess.run([_promtool(), "check", "config", "prometheus.yml"], capture_output=True, text=True, cwd=PROM)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing():
    import yaml

    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"GitopsAgentDrift", "GitopsAgentReconcileFailing", "GitopsAgentRevisionInvalid",
            "GitopsAgentStale", "GitopsAgentDown"} <= alerts
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    firing, quiet = set(), set()
    for unit in tests["tests"]:
        for case in unit.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts <= firing, f"never tested firing: {alerts - firing}"
    assert alerts <= quiet, f"never tested not firing: {alerts - quiet}"


def test_alert_rules_use_design_metric_names():
    import yaml

    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - SERIES - {"up"}  # `up` is Prometheus's own
            assert not unknown, f"{rule.get('alert')}: not DESIGN.md §5 metrics: {unknown}"


# --- Grafana ---------------------------------------------------------------------------------------


def test_dashboard_shape():
    d = _dashboard()
    assert d["schemaVersion"] >= 36
    assert d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    panels = list(_all_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        if p["type"] == "row":
            continue
        assert {"x", "y", "w", "h"} <= p["gridPos"].keys(), p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert 'instance=~"$instance"' in t["expr"], f"{p['title']}: not filtered by $instance"


def test_dashboard_covers_the_issue():
    exprs = "\n".join(e for _, e in _dashboard_exprs())
    for needle in ("gitops_agent_drift", "gitops_agent_drifted_resources",
                   "histogram_quantile", "gitops_agent_reconcile_duration_seconds_bucket",
                   "gitops_agent_reconcile_total", "gitops_agent_applied_revision_info",
                   "gitops_agent_traffic_weight", "gitops_agent_commit_to_converged_seconds_bucket"):
        assert needle in exprs, needle
    tables = [p for p in _all_panels(_dashboard()["panels"]) if p["type"] == "table"]
    assert any("gitops_agent_applied_revision_info" in t["expr"] for p in tables for t in p["targets"])


def test_dashboard_uses_only_design_metric_names():
    seen = set()
    for title, expr in _dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - SERIES
        assert not unknown, f"{title}: not DESIGN.md §5 metrics: {sorted(unknown)} in {expr!r}"
        seen |= names
    assert len(seen) >= 10


def test_dashboard_promql_parses(tmp_path):
    """Every dashboard query, Grafana variables substituted, is valid PromQL for promtool."""
    promtool = _promtool()
    rules = []
    for i, (title, expr) in enumerate(_dashboard_exprs()):
        expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$instance", ".*")
        rules.append({"record": f"dashboard:panel_{i}", "expr": expr})
    import yaml

    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --- systemd ---------------------------------------------------------------------------------------


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit_settings():
    s = _unit_settings()
    assert s["ExecStart"][0].split()[1] == "run"
    assert s["KillMode"] == ["process"]  # services under the embedded supervisord survive agent restarts
    assert s["Restart"] == ["always"]
    assert s["StateDirectory"] == ["gitops-agent"]
    assert s["EnvironmentFile"] == ["/etc/gitops-agent/env"]
    assert s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"] and s["PrivateTmp"] == ["yes"]
    assert "/var/lib/gitops-agent" in " ".join(s["ReadWritePaths"])


def test_systemd_unit_verifies(tmp_path):
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.skip("systemd-analyze not installed")
    # verify checks that ExecStart exists: point it at this checkout's gitops-agent (the unit names
    # /opt/gitops-agent/bin/gitops-agent, the venv deploy/README.md installs into).
    agent = shutil.which("gitops-agent") or str(Path(sys.executable).with_name("gitops-agent"))
    if not Path(agent).exists():
        pytest.skip("gitops-agent is not installed here (pip install -e .)")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/gitops-agent/bin/gitops-agent", agent))
    out = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True)
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if UNIT.name in line]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr


def test_systemd_unit_exposure_is_low(tmp_path):
    """`systemd-analyze security` rates the sandbox (0 = locked down, 10 = none); keep it "OK" (< 3)."""
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text())
    out = subprocess.run([exe, "security", "--offline=yes", "--no-pager", str(unit)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout + out.stderr)
    if out.returncode != 0 and not m:
        pytest.skip(f"systemd-analyze security --offline unsupported here: {out.stderr.strip()[:200]}")
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) < 3.0, out.stdout


# --- supervisord -----------------------------------------------------------------------------------


def test_supervisor_program_block_parses(tmp_path):
    """supervisord's own config loader accepts the block (user and log dir swapped for this machine)."""
    from supervisor.options import ServerOptions

    text = SUPERVISOR_CONF.read_text()
    text = re.sub(r"(?m)^user=.*$", f"user={getpass.getuser()}", text).replace("/var/log/supervisor", str(tmp_path))
    (tmp_path / "gitops-agent.conf").write_text(text)
    main = tmp_path / "supervisord.conf"
    main.write_text(
        f"[supervisord]\nlogfile={tmp_path}/supervisord.log\npidfile={tmp_path}/supervisord.pid\n"
        f"[unix_http_server]\nfile={tmp_path}/supervisor.sock\n"
        "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        f"[include]\nfiles = {tmp_path}/gitops-agent.conf\n"
    )
    options = ServerOptions()
    options.realize(args=["-c", str(main)])  # exits with the parse error on a bad block
    (group,) = options.process_group_configs
    (program,) = group.process_configs
    assert program.name == "gitops-agent"
    assert program.command.split()[1] == "run"
    assert program.environment["GITOPS_AGENT_REPO"]
    assert program.autorestart and program.stopwaitsecs >= 30
    assert program.stopsignal == 15  # SIGTERM: the agent stops cleanly on it
