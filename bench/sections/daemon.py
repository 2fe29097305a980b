"""Sections 6 and 7 with the daemon running: commit-to-converged and hand-edit detection (6), then its idle
CPU and RSS (7). The daemon is the tests' `daemon_helpers.Daemon`, run from the agent's venv on the host's python3
(`harness.agent_cmd`), read through its /metrics."""

from __future__ import annotations

import os
import re
import time
from functools import partial
from pathlib import Path

from harness import (
    CLEANUP,
    Context,
    Figure,
    Section,
    agent_cmd,
    distinct_port,
    log,
    verdict,
    when,
)

# isort: split
from conftest import git
from daemon_helpers import start_daemon
from fixtures import DemoRepo, write_app

__all__ = ["SECTION"]

HOW = """\
6. `gitops-agent run --listen 127.0.0.1:PORT --poll-interval 30` on a local repo. Lock change:
   from `git commit` to the new revision in gitops_agent_applied_revision_info on /metrics
   (polled every 10 ms; each commit needs a uv build and a restart with startsecs=1). Hand edit:
   append a comment to the program file, poll /metrics every 5 ms until
   drift_corrected_total{kind="program"} increments (the daemon noticed and healed it) or the
   drift gauge reads 1; the first edit is a warm-up.
7. Right after 6, nothing changing, no scrapes: /proc/<pid>/stat utime+stime over the window and
   the max VmRSS of the daemon process (not its supervisord or services).
"""


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    """One sample's value from exposition text, by a regex: cheap enough to scrape every 5 ms."""
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def write_traffic_app(repo: DemoRepo) -> None:
    """Two colours of the demo service behind a loopback frontend on the embedded load balancer."""
    repo.write("apps/tr/blue.lock", repo.lock_text("1.0.0"))
    repo.write("apps/tr/green.lock", repo.lock_text("2.0.0"))
    lines = ["apiVersion: gitops-agent/v1", "kind: App", "name: tr", "environments:"]
    for colour in ("blue", "green"):
        lines.append(f"  tr{colour}: {{lockfile: {colour}.lock, find_links: [../../wheelhouse], index: false, "
                     "installer: uv}")
    lines.append("services:")
    for colour in ("blue", "green"):
        port = distinct_port()
        lines += [f"  tr-{colour}:", f"    environment: tr{colour}", f"    port: {port}",
                  f'    command: [demoapp-server, --port, "{port}"]',
                  f'    health: {{http: "http://127.0.0.1:{port}/healthz", timeout_s: 1}}']
    lines += ["traffic:", f'  listen: "127.0.0.1:{distinct_port()}"', "  strategy: canary",
              "  weights: {tr-blue: 90, tr-green: 10}"]
    repo.write("apps/tr/app.yaml", "\n".join(lines) + "\n")


def proc_cpu_ticks(pid: int) -> int:
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields_[11]) + int(fields_[12])          # utime + stime (fields 14 and 15)


def proc_rss_mb(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024


def run(ctx: Context) -> None:
    res, work = ctx.res, ctx.work
    runs, idle_s = (1, 10.0) if ctx.quick else (5, 60.0)
    repo = DemoRepo(work / "daemon-repo")
    port = distinct_port()
    write_app(repo, "demo", "demo", repo.lock_text("1.0.0"), {"demo-web": port})
    write_traffic_app(repo)
    sha = repo.commit("demo 1.0.0 + traffic")
    root = CLEANUP.root(work / "daemon-root")
    daemon = start_daemon(CLEANUP, repo.url, root, work, "--installer", "uv", poll=30.0, port=distinct_port(),
                          command=agent_cmd())

    def applied_at(s: str, timeout: float, step: float) -> float:
        """perf_counter() when /metrics first shows commit `s` applied."""
        sample = f'gitops_agent_applied_revision_info{{revision="{s}"}} 1.0'
        return when(lambda: sample in daemon.metrics_text(), timeout, f"commit {s[:12]} applied", step, daemon.log)

    def commit_timed(message: str) -> tuple[str, float]:
        """Commit what is staged: (sha, perf_counter just before `git commit`)."""
        git(repo.path, "add", "-A")
        t0 = time.perf_counter()
        git(repo.path, "commit", "-q", "-m", message)
        return git(repo.path, "rev-parse", "HEAD"), t0

    try:
        applied_at(sha, 180, 0.1)                   # the daemon's first converge
        log("daemon: converged")
        lock_runs = []
        for i in range(1, runs + 1):
            repo.write("apps/demo/demo.lock", repo.lock_text(f"1.{i}.0"))
            new, t0 = commit_timed(f"demo 1.{i}.0")
            lock_runs.append(applied_at(new, 120, 0.01) - t0)
            time.sleep(0.3)
        res.add(Figure("6", "commit-to-converged, lockfile change (uv build + restart + healthy)", "s", lock_runs,
                       note="from `git commit` to the applied_revision_info metric; includes startsecs=1"))
        app = repo.path / "apps" / "tr" / "app.yaml"
        weight_runs = []
        for i in range(max(3, runs)):
            text = app.read_text()
            a, b = ("tr-blue: 90, tr-green: 10", "tr-blue: 10, tr-green: 90")
            app.write_text(text.replace(a, b) if a in text else text.replace(b, a))
            new, t0 = commit_timed(f"weights {i}")
            weight_runs.append(applied_at(new, 60, 0.005) - t0)
            time.sleep(0.3)
        f = res.add(Figure("6", "commit-to-converged, weight-only change (haproxy)", "s", weight_runs,
                           "<= 0.25 s", note="canary 90/10 <-> 10/90 on the embedded HAProxy; from `git "
                           "commit` to the applied_revision_info metric"))
        f.verdict = verdict(f.median <= 0.25)

        program = root / "supervisor" / "programs" / "demo-web.conf"
        original = program.read_text()
        label = '{kind="program"}'
        edits = []

        def seen(before: float) -> bool:
            """The daemon healed the edit (a correction more than `before`) or reports the drift."""
            text = daemon.metrics_text()
            return ((metric_value(text, "gitops_agent_drift_corrected_total", label) or 0.0) > before
                    or metric_value(text, "gitops_agent_drift", '{kind="program",name="demo-web"}') == 1.0)

        for i in range(max(3, runs + 1)):
            before = metric_value(daemon.metrics_text(), "gitops_agent_drift_corrected_total", label) or 0.0
            t0 = time.perf_counter()
            with open(program, "a") as fh:
                fh.write(f"\n# hand edit {i}\n")
            edits.append(when(partial(seen, before), 30, "the hand edit to show in /metrics", 0.005, daemon.log) - t0)
            when(lambda: program.read_text() == original, 30, "the program file healed", 0.02, daemon.log)
            time.sleep(0.3)
        f = res.add(Figure("6", "hand edit of a program file -> drift metric", "s", edits[1:], "<= 0.3 s",
                           note="edit -> drift_corrected_total{kind=program} increments (healed) or drift gauge 1"))
        f.verdict = verdict(f.median <= 0.3)
        _idle(res, daemon.proc.pid, idle_s)
    except Exception:
        log("daemon log (tail):\n" + "\n".join(daemon.log_text().splitlines()[-60:]))
        raise
    finally:
        daemon.stop()


def _idle(res, pid: int, idle_s: float) -> None:
    """7. nothing changes; no scrape during the window."""
    time.sleep(1.0 if idle_s < 30 else 2.0)
    hz = os.sysconf("SC_CLK_TCK")
    ticks0, t0 = proc_cpu_ticks(pid), time.perf_counter()
    rss = [proc_rss_mb(pid)]
    while time.perf_counter() - t0 < idle_s:
        time.sleep(1.0)
        rss.append(proc_rss_mb(pid))
    cpu_pct = (proc_cpu_ticks(pid) - ticks0) / hz / (time.perf_counter() - t0) * 100
    c = res.add(Figure("7", f"idle daemon CPU over {idle_s:g} s (poll every 30 s)", "%", [cpu_pct], "< 1%",
                       note="from /proc/<pid>/stat utime+stime"))
    c.verdict = verdict(cpu_pct < 1.0)
    r = res.add(Figure("7", "idle daemon RSS (max over the window)", "MB", [max(rss)], "< 60 MB",
                       note="from /proc/<pid>/status VmRSS, sampled every 1 s"))
    r.verdict = verdict(max(rss) < 60.0)


SECTION = Section("6", run, HOW)
