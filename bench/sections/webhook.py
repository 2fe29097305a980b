"""Section 14 (issue 14): push to serving through a signed webhook, against a remote repo.

    python bench/sections/webhook.py [--runs N]     # this section alone, prints its figures

The state repo is served by a real `git daemon` (a remote the agent's watcher cannot see), the daemon polls
every 5 minutes, and each push is followed by a signed `POST /hooks/git`. The clock runs from just before
the POST to the first answer of the pushed version on the service's own port (polled every 5 ms). Pushes
alternate between two versions whose venvs are kept (retention), so each is a switch: fetch, load, plan,
program rewrite, restart, health gate. The agent's log (ms timestamps) splits each push into its steps.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import re
import sys
import time
from datetime import datetime
from pathlib import Path

if __name__ == "__main__":        # run alone: the bench's import paths, as bench/run.py has them
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "tests"),
                    str(Path(__file__).resolve().parents[2])]

from harness import CLEANUP, Context, Figure, Section, agent_cmd, distinct_port, log, run_alone, verdict, when

# isort: split
from conftest import served_version, start_git_daemon
from daemon_helpers import start_daemon

from fixtures import DemoRepo, write_app

__all__ = ["SECTION", "PUSH"]

PUSH = "push to serving: signed webhook -> new version serving (daemon polling every 300 s, git daemon remote)"
TARGET_S = 1.0
SECRET = b"bench-webhook-secret"

HOW = """\
14. Push to serving (issue 14): `gitops-agent run --poll-interval 300 --webhook-secret-file F` on a state repo
   served by `git daemon` (one health-gated demoapp service, installer uv). Each push (a commit switching
   between two versions whose venvs are kept) is followed by a signed `POST /hooks/git`; the figure is from
   just before the POST to the first answer of the pushed version on the service's port (polled every 5 ms),
   with the daemon idle before each push. The step rows split the same pushes by the agent's log timestamps:
   webhook received -> fetched, fetched -> apply started (checkout, load, facts, plan), apply started ->
   supervisord update done (switch, program file, stop old, start new), update done -> serving (the
   service's own start, seen from outside).
"""

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ ([\w.]+): (.*)$")
_STEPS = (("webhook", "gitops_agent.webhook", "webhook from"), ("fetched", "agent.drivers.git", "fetched "),
          ("apply", "gitops_agent.apply", ""), ("updated", "gitops_agent.apply", "update_program "))


def post(port: int) -> int:
    body = b'{"ref": "refs/heads/main"}'
    sig = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/hooks/git", body=body, headers={"X-Hub-Signature-256": sig, "X-GitHub-Event": "push"})
        return conn.getresponse().status
    finally:
        conn.close()


def steps_after(log_path: Path, since: float) -> dict[str, float]:
    """Wall times of the push's steps from the agent's text log (lines after `since`): the first of each."""
    found: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
        if at < since - 0.002:
            continue
        for step, logger, prefix in _STEPS:
            if step not in found and m.group(3) == logger and m.group(4).startswith(prefix):
                # each step after the one before it (the apply line of a previous run must not count)
                order = [s for s, _, _ in _STEPS]
                if all(p in found for p in order[:order.index(step)]):
                    found[step] = at
    return found


def run(ctx: Context, runs: int | None = None) -> None:
    res, work = ctx.res, ctx.work
    runs = runs or (2 if ctx.quick else 8)
    served_dir = work / "webhook-remote"
    repo = DemoRepo(served_dir / "state")
    port = distinct_port()
    locks = {v: repo.lock_text(v) for v in ("1.0.0", "2.0.0")}    # wheels made up front
    write_app(repo, "demo", "demo", locks["1.0.0"], {"demo-web": port})
    repo.commit("demo 1.0.0")
    git_port = start_git_daemon(CLEANUP, served_dir)
    secret = work / "webhook.secret"
    secret.write_bytes(SECRET + b"\n")
    secret.chmod(0o600)
    root = CLEANUP.root(work / "webhook-root")
    daemon = start_daemon(CLEANUP, f"git://127.0.0.1:{git_port}/state", root, work,
                          "--webhook-secret-file", str(secret), poll=300.0, port=distinct_port(), command=agent_cmd())
    when(lambda: served_version(port) == "1.0.0", 300, "first converge", 0.1, daemon.log)

    def idle(sha: str) -> None:
        sample = f'gitops_agent_applied_revision_info{{revision="{sha}"}} 1.0'
        when(lambda: sample in daemon.metrics_text(), 300, "applied", 0.05, daemon.log)
        time.sleep(0.5)             # the run's own writes echo back as one follow-up run: let it pass

    idle(_head(repo))

    def push(version: str) -> tuple[float, dict[str, float]]:
        write_app(repo, "demo", "demo", locks[version], {"demo-web": port})
        sha = repo.commit(f"demo {version}")
        wall0, t0 = time.time(), time.perf_counter()
        if post(daemon.port) != 202:
            raise RuntimeError("webhook: the signed POST was not accepted")
        seen = when(lambda: served_version(port) == version, 300, f"{version} serving", 0.005, daemon.log)
        served_wall = wall0 + (seen - t0)
        idle(sha)
        steps = steps_after(daemon.log, wall0)
        steps["served"] = served_wall
        return seen - t0, steps

    first, _ = push("2.0.0")        # builds the second venv: not a switch
    res.add(Figure("14", "push to serving, first push of a version (its venv built in the reconcile)", "s", [first]))
    walls, parts = [], {"received -> fetched": [], "fetched -> apply started (checkout, load, facts, plan)": [],
                        "apply started -> supervisord update done": [], "update done -> serving (service start)": []}
    for i in range(runs):
        wall, steps = push("1.0.0" if i % 2 == 0 else "2.0.0")
        walls.append(wall)
        if all(k in steps for k in ("webhook", "fetched", "apply", "updated", "served")):
            parts["received -> fetched"].append(steps["fetched"] - steps["webhook"])
            parts["fetched -> apply started (checkout, load, facts, plan)"].append(steps["apply"] - steps["fetched"])
            parts["apply started -> supervisord update done"].append(steps["updated"] - steps["apply"])
            parts["update done -> serving (service start)"].append(max(0.0, steps["served"] - steps["updated"]))
        else:
            log(f"webhook: push {i + 1}: steps not all found in the agent's log: {sorted(steps)}")
    fig = res.add(Figure("14", PUSH, "s", walls, f"<= {TARGET_S} s",
                         note="a switch between kept venvs; the steps below split the same pushes "
                              "(log timestamps are ms, the first apply line is logged when switch_venv ends)"))
    fig.verdict = verdict(fig.median <= TARGET_S)
    for label, samples in parts.items():
        if samples:
            res.add(Figure("14", f"  push step: {label}", "ms", [s * 1000 for s in samples]))


def _head(repo) -> str:
    from conftest import git

    return git(repo.path, "rev-parse", "HEAD")


SECTION = Section("14", run, HOW)


if __name__ == "__main__":
    run_alone(run, "bench-webhook-", 6)
