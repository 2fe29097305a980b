"""Section 3: `ansible-pull` no-op of a playbook doing the same work as `once` on the example, and the ratios;
section 17c (issue 17): a fresh host from scratch, ansible-pull vs `once`, cold and warm caches.

ansible-core lives in bench/.venv-ansible (installed on first use); full mode only.

    python bench/sections/ansible.py --fresh [--runs N]     # section 17c alone, prints its figures
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":        # run alone: the bench's import paths, as bench/run.py has them
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "tests"),
                    str(Path(__file__).resolve().parents[2])]

from harness import (
    BENCH,
    CLEANUP,
    Context,
    Figure,
    Results,
    Section,
    agent_cmd,
    distinct_port,
    log,
    port_free,
    timed_proc,
    verdict,
    version_of,
)

# isort: split
from conftest import StateRepo
from fixtures import EXAMPLE, EXAMPLE_PORTS

if __name__ == "__main__":
    from sections import once, scale
    from sections.fresh import serves
else:
    from . import once, scale
    from .fresh import serves

__all__ = ["FRESH_SECTION", "SECTION", "machine_row"]

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


# -- section 17c: a fresh host from scratch ---------------------------------------------------------

FRESH_ANSIBLE = "fresh host from scratch: ansible-pull, pip cache {}"
FRESH_AGENT = "fresh host from scratch: `once`, uv cache {}"
FRESH_RATIO = "fresh host from scratch: ansible-pull / `once`, caches {}"
FRESH_TARGET = 10.0

FRESH_HOW = """\
17c. Fresh host from scratch (issue 17), on a mandelbrot-only copy of desired-state-example (blue + green
   behind HAProxy; the shop removed) committed into a temp repo with a generated playbook that does the
   same work: both venvs from the hashed locks (`ansible.builtin.pip`: `python -m venv`, then `pip install
   --require-hashes --no-deps --only-binary :all: --find-links wheelhouse`: the same lock and hashes; numpy
   and pillow from an index, for pip the machine's pip config, for uv PyPI), the `envs/` symlinks, the program files, HAProxy's config (the agent's: same frontend, weights,
   checks, stats socket and exporter) and its program file, supervisord's config; then `supervisord` started
   by a `command:` task (it starts blue, green and HAProxy together: no waits one after the other), each
   service's /healthz polled every 50 ms (`uri` with `until`), and the frontend's /version through HAProxy.
   Timed: `ansible-pull -U file://REPO -d NEW_CHECKOUT -i localhost, -c local` on a new root and checkout,
   and `gitops-agent once` on a new empty root (default installer: uv), each as a fresh process, clock
   stopped when it exits 0; the frontend's /version is then checked through HAProxy, and supervisord (with
   everything under it) stopped and the root deleted before the next run. Cold: an empty cache for each
   (a new `PIP_CACHE_DIR` for ansible, an empty `<root>/installer-home` for uv); warm: pip's cache dir
   from an untimed run, a copy of uv's cache from one. The runs alternate ansible / agent, cold / warm;
   the ratio with the verdict is the median over the pairs (each ansible run / the `once` right after it),
   the ratio of the medians is shown too. Full mode only.
"""

FRESH_PLAYBOOK = """\
# Generated by bench/sections/ansible.py (section 17c): what `gitops-agent once` does for a fresh host on
# the mandelbrot-only state, from scratch: both venvs from the hashed locks, the program files, HAProxy's
# config, supervisord started with blue, green and HAProxy, the health checks, the frontend serving.
- hosts: localhost
  gather_facts: false
  environment:
    PIP_CACHE_DIR: "{{ pip_cache }}"
  vars:
    state: "{{ playbook_dir }}/desired-state-example"
    sup: "{{ root }}/supervisor"
    envs:
      - {name: blue, service: mandelbrot-blue, port: BLUE_PORT, weight: 90, lock: apps/mandelbrot/blue.lock}
      - {name: green, service: mandelbrot-green, port: GREEN_PORT, weight: 10, lock: apps/mandelbrot/green.lock}
  tasks:
    - name: directories
      ansible.builtin.file: {path: "{{ root }}/{{ item }}", state: directory, mode: "0755"}
      loop: [venvs, envs, supervisor/programs, logs, lb]
    - name: venv from the hashed lockfile
      ansible.builtin.pip:
        requirements: "{{ state }}/{{ item.lock }}"
        virtualenv: "{{ root }}/venvs/{{ item.name }}"
        virtualenv_command: "{{ venv_python }} -m venv"
        extra_args: "--require-hashes --no-deps --only-binary :all: --find-links {{ state }}/wheelhouse"
      loop: "{{ envs }}"
    - name: current venv symlink
      ansible.builtin.file: {src: "{{ root }}/venvs/{{ item.name }}", dest: "{{ root }}/envs/{{ item.name }}", state: link}
      loop: "{{ envs }}"
    - name: supervisord program file
      ansible.builtin.template: {src: fresh/program.conf.j2, dest: "{{ sup }}/programs/{{ item.service }}.conf", mode: "0644"}
      loop: "{{ envs }}"
    - name: haproxy config
      ansible.builtin.template: {src: fresh/haproxy.cfg.j2, dest: "{{ root }}/lb/haproxy.cfg", mode: "0644"}
    - name: haproxy program file
      ansible.builtin.template: {src: fresh/haproxy.conf.j2, dest: "{{ sup }}/programs/lb-haproxy.conf", mode: "0644"}
    - name: supervisord config
      ansible.builtin.template: {src: fresh/supervisord.conf.j2, dest: "{{ sup }}/supervisord.conf", mode: "0644"}
    - name: start supervisord (it starts blue, green and haproxy)
      ansible.builtin.command:
        cmd: "{{ supervisord }} -c {{ sup }}/supervisord.conf"
        creates: "{{ sup }}/supervisord.pid"
      register: started
    - name: apply changed program files to a supervisord that was already running
      ansible.builtin.command: "{{ supervisorctl }} -c {{ sup }}/supervisord.conf update"
      when: not started.changed
    - name: each service answers its health check
      ansible.builtin.uri: {url: "http://127.0.0.1:{{ item.port }}/healthz", timeout: 2}
      register: health
      until: health.status == 200
      retries: 1200
      delay: 0.05
      loop: "{{ envs }}"
    - name: the frontend serves through haproxy
      ansible.builtin.uri: {url: "http://127.0.0.1:LB_PORT/version", timeout: 2}
      register: front
      until: front.status == 200
      retries: 1200
      delay: 0.05
"""

FRESH_TEMPLATES = {
    "program.conf.j2": """\
[program:{{ item.service }}]
command={{ root }}/envs/{{ item.name }}/bin/mandelbrot-server --port {{ item.port }}
directory={{ root }}/venvs/{{ item.name }}
umask=022
autostart=true
autorestart=unexpected
startsecs=1
startretries=3
stopwaitsecs=10
stopasgroup=true
killasgroup=true
stdout_logfile={{ root }}/logs/{{ item.service }}.out.log
stderr_logfile={{ root }}/logs/{{ item.service }}.err.log
""",
    "haproxy.conf.j2": """\
[program:lb-haproxy]
command={{ haproxy }} -W -db -f {{ root }}/lb/haproxy.cfg
directory={{ root }}/lb
autostart=true
autorestart=true
startsecs=1
stopwaitsecs=10
stopasgroup=true
killasgroup=true
stdout_logfile={{ root }}/logs/lb-haproxy.out.log
stderr_logfile={{ root }}/logs/lb-haproxy.err.log
""",
    "haproxy.cfg.j2": """\
global
    stats socket {{ root }}/lb/haproxy.sock mode 600 level admin expose-fd listeners
    stats timeout 30s
    pidfile {{ root }}/lb/haproxy.pid

defaults
    mode http
    option http-keep-alive
    option redispatch
    retries 3
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout queue 10s
    default-server inter 2s fall 3 rise 2

frontend mandelbrot
    bind 127.0.0.1:LB_PORT
    default_backend mandelbrot

backend mandelbrot
    balance roundrobin
{% for e in envs %}
    server {{ e.service }} 127.0.0.1:{{ e.port }} weight {{ e.weight }} check
{% endfor %}

frontend prometheus
    bind METRICS_ADDRESS
    no log
    http-request use-service prometheus-exporter if { path /metrics }
""",
    "supervisord.conf.j2": """\
[unix_http_server]
file={{ sup }}/supervisor.sock
chmod=0700

[supervisord]
logfile={{ root }}/logs/supervisord.log
loglevel=info
minfds=20000
umask=077
pidfile={{ sup }}/supervisord.pid
childlogdir={{ root }}/logs
nodaemon=false

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{{ sup }}/supervisor.sock

[include]
files={{ sup }}/programs/*.conf
""",
}


def _mandelbrot_repo(work: Path) -> tuple[Path, dict[str, int], str]:
    """The example without the shop (blue + green behind HAProxy) and the from-scratch playbook, committed.

    Ports as the example's unless taken here (then free ones); the HAProxy exporter's address likewise."""
    repo = StateRepo(work / "mandelbrot-repo")
    shutil.copytree(EXAMPLE, repo.path / EXAMPLE.name, ignore=shutil.ignore_patterns("shop"))
    names = ("lb", "blue", "green")
    ports = {n: EXAMPLE_PORTS[n] if port_free(EXAMPLE_PORTS[n]) else distinct_port() for n in names}
    metrics = f"127.0.0.1:{8405 if port_free(8405) else distinct_port()}"
    app = repo.path / EXAMPLE.name / "apps" / "mandelbrot" / "app.yaml"
    text = app.read_text()
    for n in names:
        text = re.sub(rf"\b{EXAMPLE_PORTS[n]}\b", str(ports[n]), text)
    app.write_text(text)

    def fill(t: str) -> str:
        return (t.replace("BLUE_PORT", str(ports["blue"])).replace("GREEN_PORT", str(ports["green"]))
                .replace("LB_PORT", str(ports["lb"])).replace("METRICS_ADDRESS", metrics))

    (repo.path / "playbook-fresh.yml").write_text(fill(FRESH_PLAYBOOK))
    (repo.path / "fresh").mkdir()
    for name, text in FRESH_TEMPLATES.items():
        (repo.path / "fresh" / name).write_text(fill(text))
    repo.commit("mandelbrot only, and the from-scratch playbook")
    return repo.path, ports, metrics


def _stop_supervisord(pidfile: Path) -> None:
    """Stop a supervisord the playbook started (SIGTERM: it stops every program under it first), and wait."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    log(f"ansible: supervisord {pid} did not stop within 60 s")


def _wait_ports_free(ports: dict[str, int]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(port_free(p) for p in ports.values()):
        time.sleep(0.05)


class _Fresh:
    """One tool's from-scratch runs on new roots, each cleaned up (stopped, deleted) before the next."""

    def __init__(self, work: Path, pull: Path, repo: Path, ports: dict[str, int], metrics: str):
        from agent.drivers.venv import resolve_python

        self.work, self.pull, self.repo, self.ports, self.metrics = work, pull, repo, ports, metrics
        self.venv_python = resolve_python("3.11")
        self.bindir = Path(sys.executable).parent
        self.n = 0

    def _new(self, tag: str) -> Path:
        self.n += 1
        return self.work / f"{tag}-{self.n}"

    def ansible(self, pip_cache: Path) -> float:
        root, checkout = self._new("ansible-root"), self._new("ansible-checkout")
        pidfile = root / "supervisor" / "supervisord.pid"
        CLEANUP.addfinalizer(lambda: _stop_supervisord(pidfile))
        env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "False",
               "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False", "ANSIBLE_HOME": str(self.work / "ansible-home"),
               "ANSIBLE_RETRY_FILES_ENABLED": "False"}
        argv = [str(self.pull), "-U", f"file://{self.repo}", "-d", str(checkout), "-i", "localhost,", "-c", "local",
                "-e", f"ansible_python_interpreter={ANSIBLE_VENV / 'bin' / 'python'}", "-e", f"root={root}",
                "-e", f"venv_python={self.venv_python}", "-e", f"pip_cache={pip_cache}",
                "-e", f"supervisord={self.bindir / 'supervisord'}", "-e", f"supervisorctl={self.bindir / 'supervisorctl'}",
                "-e", f"haproxy={shutil.which('haproxy') or '/usr/sbin/haproxy'}", "playbook-fresh.yml"]
        try:
            wall, _, proc = timed_proc(argv, env=env, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"ansible-pull (fresh) failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
            if not serves(self.ports["lb"]):
                raise RuntimeError(f"ansible-pull exited 0 but :{self.ports['lb']} does not serve")
            return wall
        finally:
            _stop_supervisord(pidfile)
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(checkout, ignore_errors=True)
            _wait_ports_free(self.ports)

    def agent(self, warm_home: Path | None) -> float:
        root = CLEANUP.root(self._new("agent-root"))
        if warm_home is not None:
            shutil.copytree(warm_home, root / "installer-home", symlinks=True)
        argv = [*agent_cmd(), "once", "--repo", f"file://{self.repo}", "--path", EXAMPLE.name, "--host", "localhost",
                "--root", str(root), "--lb-metrics", self.metrics]
        try:
            wall, _, proc = timed_proc(argv, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"fresh once failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
            if not serves(self.ports["lb"]):
                raise RuntimeError(f"once exited 0 but :{self.ports['lb']} does not serve\n{proc.stdout[-2000:]}")
            return wall
        finally:
            subprocess.run([*agent_cmd(), "down", "--root", str(root)], capture_output=True, timeout=120, check=False)
            if warm_home is None and not (self.work / "uv-warm").exists() and (root / "installer-home").exists():
                shutil.copytree(root / "installer-home", self.work / "uv-warm", symlinks=True)
            shutil.rmtree(root, ignore_errors=True)
            _wait_ports_free(self.ports)


def run_fresh(ctx: Context, runs: int | None = None) -> None:
    """Section 17c: ansible-pull vs `once` from scratch, cold and warm caches, alternating."""
    res, work = ctx.res, ctx.work / "fresh17c"
    labels = [FRESH_ANSIBLE.format("cold"), FRESH_AGENT.format("cold"), FRESH_ANSIBLE.format("warm"),
              FRESH_AGENT.format("warm")]
    if ctx.quick:
        res.add(Figure("17c", FRESH_RATIO.format("cold"), "x", text="skipped in quick mode"))
        return
    runs = runs or 3
    pull = ensure_ansible()
    if pull is None:
        res.add(Figure("17c", FRESH_RATIO.format("cold"), "x", text="error: ansible-core could not be installed"))
        return
    work.mkdir(parents=True, exist_ok=True)
    repo, ports, metrics = _mandelbrot_repo(work)
    fresh = _Fresh(work, pull, repo, ports, metrics)
    pip_warm = work / "pip-warm"
    log("17c: warming pip's cache (ansible-pull, untimed) and uv's (`once`, untimed: its cold run's cache)")
    fresh.ansible(pip_warm)
    samples: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(runs):
        samples[labels[0]].append(fresh.ansible(fresh._new("pip-cold")))
        samples[labels[1]].append(fresh.agent(None))
        samples[labels[2]].append(fresh.ansible(pip_warm))
        samples[labels[3]].append(fresh.agent(work / "uv-warm"))
        log(f"17c: run {i + 1}/{runs}: " + ", ".join(f"{samples[lb][-1]:.2f}s" for lb in labels))
    figs = [res.add(Figure("17c", label, "s", samples[label])) for label in labels]
    for temp, (a, b) in (("cold", figs[:2]), ("warm", figs[2:])):
        # each ansible run against the `once` run right after it: under a varying load, the pair shares it
        pairs = res.add(Figure("17c", FRESH_RATIO.format(temp), "x", [x / y for x, y in zip(a.samples, b.samples)],
                               f">= {FRESH_TARGET:g}x", note="per pair: each ansible-pull run / the `once` run "
                               "right after it (same load); median, min, max over the pairs"))
        pairs.verdict = verdict(pairs.median >= FRESH_TARGET)
        res.add(Figure("17c", FRESH_RATIO.format(temp) + " (ratio of the medians)", "x", [a.median / b.median]))


FRESH_SECTION = Section("17c", run_fresh, FRESH_HOW)


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--fresh", action="store_true", help="section 17c (the only one this entry point runs)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    out = Results()
    with tempfile.TemporaryDirectory(prefix="bench-ansible-fresh-") as tmp:
        try:
            t0 = time.perf_counter()
            run_fresh(Context(out, Path(tmp), quick=False), runs=args.runs)
            log(f"done in {time.perf_counter() - t0:.0f}s")
        finally:
            CLEANUP.run()
    print(out.table())
