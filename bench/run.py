"""The gitops-agent benchmark suite: one command, a table, and bench/RESULTS.md.

    python bench/run.py            # full run (several minutes: 200 apps, pip builds, ansible-pull)
    python bench/run.py --quick    # smoke mode for CI (1 and 10 apps, fewer runs, no ansible / pip build)

What it measures (issue 6), each over several runs (median / min / max), ratios from the same run:
  1. the daemon's no-op reconcile in-process (`Reconciler(settings).reconcile()` on a converged root) for
     1, 10, 50 and 200 apps, and its growth per app;
  2. `gitops-agent once` no-op, whole process, on the bundled example;
  3. `ansible-pull` no-op of an equivalent playbook (ansible-core in bench/.venv-ansible), and the ratio;
  4. a venv build of the example's real lock: pip backend vs uv backend (cold / warm uv cache);
  5. rollback to a kept venv vs a rebuild (switch + restart + healthy);
  6. commit-to-converged with the daemon running (lockfile change; weight change once traffic lands) and
     hand-edit detection latency;
  7. the daemon's idle CPU and RSS;
  8. the real app's release with the daemon running: the example's shop (Django, gunicorn, a migration job,
     workers), commit of a new release -> new version serving, and where the time goes (not in --quick);
  14. push to serving through a signed webhook against a `git daemon` remote, the daemon polling every 300 s
     (target <= 1 s), split into its steps.
  17a-c. a fresh host to the example serving (`once`, warm uv cache); a lock release (daemon); ansible-pull vs
     `once` from scratch on the mandelbrot app, cold and warm caches (17c not in --quick).

Everything runs under a temporary directory; every process started here (daemons, embedded supervisords
and the services under them) is stopped at the end, also on error or Ctrl-C. Servers bind 127.0.0.1.

The harness (timing, the table, RESULTS.md, these flags) is bench/harness.py; each section is a module in
bench/sections/, sharing the tests' helpers (tests/conftest.py, tests/daemon_helpers.py, tests/wheelfactory.py).
"""

from __future__ import annotations

import sys

import harness
from sections import ansible, daemon, fresh, lock_release, once, release, rollback, scale, venv, webhook

SECTIONS = [scale.SECTION, once.SECTION, ansible.SECTION, venv.SECTION, rollback.SECTION, daemon.SECTION,
            release.SECTION, fresh.SECTION, lock_release.SECTION, ansible.FRESH_SECTION, webhook.SECTION]


def main(argv: list[str] | None = None) -> int:
    return harness.main(__doc__.splitlines()[0], SECTIONS, lambda: [ansible.machine_row()], argv)


if __name__ == "__main__":
    sys.exit(main())
