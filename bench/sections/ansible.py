"""Section 3: `ansible-pull` no-op of a playbook doing the same work as `once` on the example, and the ratios.

ansible-core lives in bench/.venv-ansible (installed on first use); full mode only.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from harness import (
    BENCH,
    Context,
    Figure,
    Section,
    log,
    timed_proc,
    verdict,
    version_of,
)

# isort: split
from . import once, scale

__all__ = ["SECTION", "machine_row"]

ANSIBLE_VENV = BENCH / ".venv-ansible"
WALL = "ansible-pull no-op, same work, facts off (wall)"

HOW = """\
3. ansible-core in bench/.venv-ansible. The playbook (generated, committed to the same repo) does
   the same work for blue and green: dirs, the venv from the hashed lock via `pip` with
   `virtualenv` + `--require-hashes --no-deps --only-binary :all: --find-links wheelhouse`, the
   `envs/` symlink, the supervisord program file from a template; `gather_facts: false`.
   `ansible-pull -U file://REPO -i localhost, -c local playbook.yml` converges once, then the
   timed no-op runs must report changed=0. It does not drive supervisord (the agent also checks
   supervisord's state over XML-RPC), so ansible's side is if anything less work.
"""


def machine_row() -> tuple[str, str]:
    ansible = ANSIBLE_VENV / "bin" / "ansible"
    return "ansible", version_of([str(ansible), "--version"]) if ansible.exists() else "not installed"


def ensure_ansible() -> Path | None:
    pull = ANSIBLE_VENV / "bin" / "ansible-pull"
    if pull.exists():
        return pull
    log("ansible: installing ansible-core into bench/.venv-ansible")
    subprocess.run([sys.executable, "-m", "venv", str(ANSIBLE_VENV)], check=True)
    r = subprocess.run([str(ANSIBLE_VENV / "bin" / "pip"), "install", "-q", "ansible-core"], capture_output=True, check=False,
                       text=True)
    if r.returncode != 0 or not pull.exists():
        log(f"ansible: install failed: {r.stderr[-2000:]}")
        return None
    return pull


def run(ctx: Context) -> None:
    """Runs on the example repo section 2 committed (its playbook.yml); ratios to sections 1 and 2's figures."""
    res, work = ctx.res, ctx.work
    if ctx.quick:
        res.add(Figure("3", WALL, "s", text="skipped in quick mode"))
        return
    runs = 5
    pull = ensure_ansible()
    if pull is None:
        res.add(Figure("3", "ansible-pull no-op (wall)", "s", text="error: ansible-core could not be installed"))
        return
    from agent.drivers.venv import resolve_python

    repo = work / "example-repo"
    aroot = work / "ansible-root"
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "False",
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False", "ANSIBLE_HOME": str(work / "ansible-home"),
           "ANSIBLE_RETRY_FILES_ENABLED": "False"}
    argv = [str(pull), "-U", f"file://{repo}", "-d", str(work / "ansible-checkout"), "-i", "localhost,",
            "-c", "local", "-e", f"ansible_python_interpreter={ANSIBLE_VENV / 'bin' / 'python'}",
            "-e", f"root={aroot}", "-e", f"venv_python={resolve_python('3.11')}", "playbook.yml"]
    log("ansible-pull: converging (pip builds of the example's two locks)")
    wall, _, proc = timed_proc(argv, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"ansible-pull (converge) failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    log(f"ansible-pull: converged in {wall:.1f}s")
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu, proc = timed_proc(argv, env=env, timeout=300)
        if proc.returncode != 0 or not re.search(r"changed=0\b", proc.stdout):
            raise RuntimeError(f"ansible-pull no-op changed something:\n{proc.stdout[-4000:]}")
        walls.append(wall)
        cpus.append(cpu)
    a = res.add(Figure("3", WALL, "s", walls))
    res.add(Figure("3", "ansible-pull no-op, same work, facts off (CPU user+sys)", "s", cpus))
    once_fig, inproc10 = res.get(once.WALL), res.get(scale.TEN_APPS)
    if once_fig is not None and once_fig.samples:
        r = a.median / once_fig.median
        res.add(Figure("3", "ratio ansible-pull / `once` no-op (wall medians)", "x", [r], ">= 25x", verdict(r >= 25)))
    if inproc10 is not None and inproc10.samples:
        r = a.median * 1000 / inproc10.median
        res.add(Figure("3", "ratio ansible-pull / in-process no-op, 10 apps", "x", [r], ">= 400x", verdict(r >= 400)))


SECTION = Section("3", run, HOW)
