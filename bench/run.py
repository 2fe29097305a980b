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
  7. the daemon's idle CPU and RSS.

Everything runs under a temporary directory; every process started here (daemons, embedded supervisords
and the services under them) is stopped at the end, also on error or Ctrl-C. Servers bind 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from wheelfactory import lock_line, make_http_app_wheel  # noqa: E402

ANSIBLE_VENV = BENCH / ".venv-ansible"
EXAMPLE = REPO / "desired-state-example"
GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}


# -- small helpers ---------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=cwd, env=GIT_ENV, check=True,
                          capture_output=True, text=True).stdout.strip()


def init_repo(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")


def commit(path: Path, message: str) -> str:
    git(path, "add", "-A", ".")
    git(path, "commit", "-q", "--allow-empty", "-m", message)
    return git(path, "rev-parse", "HEAD")


_taken_ports: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _taken_ports:
            _taken_ports.add(port)
            return port


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def agent_cmd() -> list[str]:
    script = Path(sys.executable).parent / "gitops-agent"
    if script.exists():
        return [str(script)]
    found = shutil.which("gitops-agent")
    return [found] if found else [sys.executable, "-m", "agent.cli"]


def timed_proc(argv: list[str], **kw) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall s, CPU s of the child: user+sys, result)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback)
        return resp.read().decode()


def version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


# -- processes to stop at the end ------------------------------------------------------------------

class Cleanup:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.roots: list[Path] = []

    def proc(self, p: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(p)
        return p

    def root(self, root: Path) -> Path:
        self.roots.append(root)
        return root

    def stop_proc(self, p: subprocess.Popen) -> None:
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def run(self) -> None:
        for p in reversed(self.procs):
            try:
                self.stop_proc(p)
            except Exception as exc:  # noqa: BLE001
                log(f"cleanup: stopping pid {p.pid}: {exc}")
        self.procs.clear()
        for root in reversed(self.roots):
            if (root / "supervisor").exists():
                r = subprocess.run([*agent_cmd(), "down", "--root", str(root)], capture_output=True, text=True,
                                   timeout=60)
                if r.returncode != 0:
                    log(f"cleanup: down --root {root}: {r.stderr.strip()}")
        self.roots.clear()


CLEANUP = Cleanup()


# -- results ---------------------------------------------------------------------------------------

@dataclass
class Figure:
    section: str
    label: str
    unit: str                      # ms | s | % | MB | x | ms/app
    samples: list[float] = field(default_factory=list)
    target: str = ""
    verdict: str = ""              # PASS | FAIL | "" (informational) | n/a
    note: str = ""
    text: str = ""                 # replaces the numbers (skipped, n/a, error)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def cells(self) -> list[str]:
        if self.text or not self.samples:
            return [self.text or "n/a", "", "", ""]
        fmt = _fmt(self.unit)
        if len(self.samples) == 1:
            return [fmt(self.samples[0]), "", "", "1"]
        return [fmt(self.median), fmt(min(self.samples)), fmt(max(self.samples)), str(len(self.samples))]


def _fmt(unit: str):
    if unit == "x":
        return lambda v: f"{v:.1f}x"
    if unit == "%":
        return lambda v: f"{v:.2f}%"
    if unit == "MB":
        return lambda v: f"{v:.1f} MB"
    if unit == "ms/app":
        return lambda v: f"{v:.3f} ms/app"
    if unit == "s":
        return lambda v: f"{v:.3f} s"
    return lambda v: f"{v:.2f} ms"


class Results:
    def __init__(self) -> None:
        self.figures: list[Figure] = []
        self.notes: list[str] = []

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        cells = fig.cells()
        log(f"{fig.label}: {cells[0]}" + (f" (min {cells[1]}, max {cells[2]}, n={cells[3]})" if cells[1] else "")
            + (f" [{fig.verdict}]" if fig.verdict else ""))
        return fig

    def get(self, label: str) -> Figure | None:
        return next((f for f in self.figures if f.label == label and f.samples), None)

    def table(self) -> str:
        head = ["#", "figure", "median", "min", "max", "n", "target", "verdict"]
        rows = [[f.section, f.label, *f.cells(), f.target, f.verdict] for f in self.figures]
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def samples_ms(samples_s: list[float]) -> list[float]:
    return [s * 1000 for s in samples_s]


# -- machine info ----------------------------------------------------------------------------------

def machine_info() -> list[tuple[str, str]]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, AttributeError):
        pass
    from agent.drivers.venv import find_uv

    uv = find_uv()
    ansible = ANSIBLE_VENV / "bin" / "ansible"
    return [
        ("CPU", cpu), ("cores", str(os.cpu_count())), ("RAM", mem),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version() + f" ({sys.executable})"),
        ("git", version_of(["git", "--version"])),
        ("pip", version_of([sys.executable, "-m", "pip", "--version"]).split(" from ")[0]),
        ("uv", version_of([uv, "--version"]) if uv else "not found"),
        ("supervisord", version_of([str(Path(sys.executable).parent / "supervisord"), "--version"])),
        ("ansible", version_of([str(ansible), "--version"]) if ansible.exists() else "not installed"),
    ]


# -- state repos -----------------------------------------------------------------------------------

FLEET = """\
apiVersion: gitops-agent/v1
kind: Fleet
hosts:
  bench: {groups: [web]}
"""


def write_app(repo: Path, name: str, env: str, lock_text: str, services: dict[str, int],
              installer: str = "uv") -> None:
    d = repo / "apps" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{env}.lock").write_text(lock_text)
    lines = ["apiVersion: gitops-agent/v1", "kind: App", f"name: {name}",
             "environments:",
             f"  {env}: {{lockfile: {env}.lock, find_links: [../../wheelhouse], index: false, installer: {installer}}}",
             "services:" if services else "services: {}"]
    for svc, port in services.items():
        lines += [f"  {svc}:", f"    environment: {env}", f"    port: {port}",
                  f'    command: [demoapp-server, --port, "{port}"]',
                  f'    health: {{http: "http://127.0.0.1:{port}/healthz", timeout_s: 1}}']
    (d / "app.yaml").write_text("\n".join(lines) + "\n")


class DemoRepo:
    """A state repo of tiny demoapp wheels (tests/wheelfactory.py): ~1 ms per wheel, stable hashes."""

    def __init__(self, path: Path):
        self.path = path
        init_repo(path)
        (path / "fleet.yaml").write_text(FLEET)
        self.url = f"file://{path}"

    def lock(self, version: str) -> str:
        wheel = make_http_app_wheel(self.path / "wheelhouse", "demoapp", version)
        return lock_line(wheel) + "\n"


def settings_for(url: str, root: Path, **kw):
    from agent.settings import Settings

    return Settings(repo=url, host="bench", root=root, installer="uv", **kw).check()


def converge_in_process(settings, what: str) -> None:
    from agent.service.reconciler import Reconciler

    rec = Reconciler(settings)
    t0 = time.perf_counter()
    result = rec.reconcile()
    if result.result not in ("applied", "converged"):
        raise RuntimeError(f"{what}: converge failed: {result.result}: {result.error}")
    again = rec.reconcile()
    if again.result != "converged":
        raise RuntimeError(f"{what}: not converged after apply: {again.result} {again.error} "
                           f"{[a.describe() for a in again.plan.actions] if again.plan else ''}")
    log(f"{what}: converged in {time.perf_counter() - t0:.1f}s")


# -- 1. no-op reconcile in-process, by number of apps -----------------------------------------------

def bench_scale(res: Results, work: Path, sizes: list[int], runs: int) -> None:
    from agent.service.reconciler import Reconciler

    repo = DemoRepo(work / "scale-repo")
    lock = repo.lock("1.0.0")           # ONE lock shared by every app (each app still has its own env/venv)
    root = CLEANUP.root(work / "scale-root")
    settings = settings_for(repo.url, root, health_wait_s=30.0)
    points: list[tuple[int, float]] = []
    made = 0
    for n in sizes:
        for i in range(made, n):
            write_app(repo.path, f"app{i:03d}", f"env{i:03d}", lock, {f"svc{i:03d}": free_port()})
        made = n
        commit(repo.path, f"{n} apps")
        converge_in_process(settings, f"scale: {n} apps")
        rec = Reconciler(settings)       # what the daemon holds: one reconciler, many reconciles
        time.sleep(1.0)                  # let the services just started settle
        for _ in range(5):
            rec.reconcile()
        samples = []
        for _ in range(runs if n < 200 else max(5, runs // 2)):
            t0 = time.perf_counter()
            r = rec.reconcile()
            samples.append(time.perf_counter() - t0)
            if r.result != "converged" or r.outcomes:
                raise RuntimeError(f"scale {n}: no-op reconcile was not a no-op: {r.result} {r.error}")
        fig = Figure("1", f"no-op reconcile in-process, {n} app{'s' if n > 1 else ''}", "ms", samples_ms(samples))
        if n == 10:
            fig.target, fig.verdict = "<= 10 ms", verdict(fig.median <= 10.0)
        res.add(fig)
        points.append((n, fig.median))
    if len(points) >= 2:
        (n0, t0_), (n1, t1_) = points[0], points[-1]
        slope = (t1_ - t0_) / (n1 - n0)
        fig = Figure("1", f"growth per app ({n0} -> {n1} apps)", "ms/app", [slope],
                     note=f"fixed part ~{t0_ - slope * n0:.2f} ms")
        if len(points) >= 4:
            # linear: the marginal cost per app over the top range is not above 1.5x that of the lower range
            lo = (points[2][1] - points[1][1]) / (points[2][0] - points[1][0])
            hi = (points[3][1] - points[2][1]) / (points[3][0] - points[2][0])
            fig.target = "linear"
            fig.verdict = verdict(hi <= 1.5 * lo + 0.02)
            fig.note = (f"marginal {lo:.3f} ms/app ({points[1][0]}->{points[2][0]}), {hi:.3f} ms/app "
                        f"({points[2][0]}->{points[3][0]}); " + fig.note)
        else:
            fig.target, fig.verdict = "linear", "n/a"
            fig.note = "linearity needs the 50 and 200 app points (full mode); " + fig.note
        res.add(fig)


# -- 2. `once` no-op on the example; 3. ansible-pull no-op of the same work --------------------------

PLAYBOOK = """\
# Generated by bench/run.py: the same work as `gitops-agent once` on desired-state-example.
- hosts: localhost
  gather_facts: false
  vars:
    state: "{{ playbook_dir }}/desired-state-example"
    envs:
      - {name: blue, service: mandelbrot-blue, port: BLUE_PORT, lock: apps/mandelbrot/blue.lock}
      - {name: green, service: mandelbrot-green, port: GREEN_PORT, lock: apps/mandelbrot/green.lock}
  tasks:
    - name: directories
      ansible.builtin.file: {path: "{{ root }}/{{ item }}", state: directory, mode: "0755"}
      loop: [venvs, envs, programs, logs]
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
      ansible.builtin.template: {src: program.conf.j2, dest: "{{ root }}/programs/{{ item.service }}.conf", mode: "0644"}
      loop: "{{ envs }}"
"""

PROGRAM_TEMPLATE = """\
[program:{{ item.service }}]
command={{ root }}/envs/{{ item.name }}/bin/mandelbrot-server --port {{ item.port }}
autostart=true
autorestart=true
startsecs=1
stopwaitsecs=10
stopasgroup=true
killasgroup=true
stdout_logfile={{ root }}/logs/{{ item.service }}.out.log
stderr_logfile={{ root }}/logs/{{ item.service }}.err.log
"""


def example_repo(work: Path) -> tuple[Path, dict[str, int]]:
    """The bundled example committed into a temp repo (plus the generated playbook at the repo's top).

    Its ports (8101/8102) are kept unless taken on this host, then moved to free ones (same work)."""
    repo = work / "example-repo"
    init_repo(repo)
    shutil.copytree(EXAMPLE, repo / EXAMPLE.name)
    app = repo / EXAMPLE.name / "apps" / "mandelbrot" / "app.yaml"
    text = app.read_text()
    ports = {}
    for svc, port in (("blue", 8101), ("green", 8102)):
        new = port if port_free(port) else free_port()
        if new != port:
            text = text.replace(str(port), str(new))
        ports[svc] = new
    app.write_text(text)
    (repo / "playbook.yml").write_text(PLAYBOOK.replace("BLUE_PORT", str(ports["blue"]))
                                       .replace("GREEN_PORT", str(ports["green"])))
    (repo / "templates").mkdir()
    (repo / "templates" / "program.conf.j2").write_text(PROGRAM_TEMPLATE)
    commit(repo, "example")
    return repo, ports


def bench_once(res: Results, work: Path, runs: int, quick: bool) -> Figure:
    repo, ports = example_repo(work)
    root = CLEANUP.root(work / "example-root")
    base = [*agent_cmd(), "once", "--repo", f"file://{repo}", "--path", EXAMPLE.name, "--host", "localhost",
            "--root", str(root)]
    if ports != {"blue": 8101, "green": 8102}:
        res.notes.append(f"The example's ports 8101/8102 were taken on this host: the bench's copy uses {ports}.")
    first = base + (["--installer", "uv"] if quick else [])
    log("once: converging the example" + (" (uv: quick mode)" if quick else " (pip, the example's default)"))
    wall, _, proc = timed_proc(first, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"once (converge) failed:\n{proc.stdout}\n{proc.stderr}")
    log(f"once: converged in {wall:.1f}s")
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu, proc = timed_proc(first, timeout=120)
        if proc.returncode != 0 or "result: converged" not in proc.stdout:
            raise RuntimeError(f"once no-op was not a no-op:\n{proc.stdout}\n{proc.stderr}")
        walls.append(wall)
        cpus.append(cpu)
    fig = res.add(Figure("2", "`once` no-op, whole process, example (wall)", "s", walls, "<= 0.15 s"))
    fig.verdict = verdict(fig.median <= 0.15)
    res.add(Figure("2", "`once` no-op, whole process, example (CPU user+sys)", "s", cpus))
    return fig


def ensure_ansible() -> Path | None:
    pull = ANSIBLE_VENV / "bin" / "ansible-pull"
    if pull.exists():
        return pull
    log("ansible: installing ansible-core into bench/.venv-ansible")
    subprocess.run([sys.executable, "-m", "venv", str(ANSIBLE_VENV)], check=True)
    r = subprocess.run([str(ANSIBLE_VENV / "bin" / "pip"), "install", "-q", "ansible-core"], capture_output=True,
                       text=True)
    if r.returncode != 0 or not pull.exists():
        log(f"ansible: install failed: {r.stderr[-2000:]}")
        return None
    return pull


def bench_ansible(res: Results, work: Path, runs: int, once_fig: Figure | None, inproc10: Figure | None) -> None:
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
    a = res.add(Figure("3", "ansible-pull no-op, same work, facts off (wall)", "s", walls))
    res.add(Figure("3", "ansible-pull no-op, same work, facts off (CPU user+sys)", "s", cpus))
    if once_fig is not None and once_fig.samples:
        r = a.median / once_fig.median
        res.add(Figure("3", "ratio ansible-pull / `once` no-op (wall medians)", "x", [r], ">= 25x", verdict(r >= 25)))
    if inproc10 is not None and inproc10.samples:
        r = a.median * 1000 / inproc10.median
        res.add(Figure("3", "ratio ansible-pull / in-process no-op, 10 apps", "x", [r], ">= 400x", verdict(r >= 400)))


# -- 4. venv build of the real lock: pip vs uv ------------------------------------------------------

def bench_venv(res: Results, work: Path, runs: int, quick: bool) -> None:
    from agent.drivers.venv import VenvManager, VenvSpec

    lock = EXAMPLE / "apps" / "mandelbrot" / "blue.lock"
    wheelhouse = EXAMPLE / "wheelhouse"

    def build(installer: str, tag: str) -> float:
        root = work / f"venv-{tag}"
        spec = VenvSpec(name="blue", python="3.11", lockfile=lock, find_links=(wheelhouse,), installer=installer)
        t0 = time.perf_counter()
        VenvManager(root).build(spec)
        dt = time.perf_counter() - t0
        shutil.rmtree(root, ignore_errors=True)
        return dt

    saved = os.environ.get("UV_CACHE_DIR")
    try:
        cold = []
        for i in range(1 if quick else runs):
            os.environ["UV_CACHE_DIR"] = str(work / f"uv-cache-cold-{i}")
            cold.append(build("uv", f"uv-cold-{i}"))
            shutil.rmtree(work / f"uv-cache-cold-{i}", ignore_errors=True)
        os.environ["UV_CACHE_DIR"] = str(work / "uv-cache-warm")
        build("uv", "uv-prime")
        warm = [build("uv", f"uv-warm-{i}") for i in range(2 if quick else runs)]
    finally:
        if saved is None:
            os.environ.pop("UV_CACHE_DIR", None)
        else:
            os.environ["UV_CACHE_DIR"] = saved
    res.add(Figure("4", "venv build, real lock, uv cold cache (--compile-bytecode)", "s", cold,
                   note="fresh UV_CACHE_DIR per run: downloads numpy + pillow"))
    w = res.add(Figure("4", "venv build, real lock, uv warm cache (--compile-bytecode)", "s", warm))
    if quick:
        res.add(Figure("4", "venv build, real lock, pip (compiles bytecode)", "s", text="skipped in quick mode"))
        return
    pip = res.add(Figure("4", "venv build, real lock, pip (compiles bytecode)", "s",
                         [build("pip", f"pip-{i}") for i in range(runs)], note="pip's own (warm) http/wheel cache"))
    r = pip.median / w.median
    res.add(Figure("4", "ratio pip / uv warm", "x", [r], ">= 5x", verdict(r >= 5)))
    rc = pip.median / statistics.median(cold)
    res.add(Figure("4", "ratio pip / uv cold", "x", [rc]))


# -- 5. rollback to a kept venv vs rebuild ----------------------------------------------------------

def service_start_time(venv: Path, runs: int) -> list[float]:
    """The demo service's own start: spawn its console script, poll /healthz until 200."""
    out = []
    for _ in range(runs):
        port = free_port()
        t0 = time.perf_counter()
        p = subprocess.Popen([str(venv / "bin" / "demoapp-server"), "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                try:
                    http_get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
                    break
                except OSError:
                    if time.perf_counter() - t0 > 10:
                        raise RuntimeError("demo service did not start in 10 s") from None
                    time.sleep(0.005)
            out.append(time.perf_counter() - t0)
        finally:
            CLEANUP.stop_proc(p)
    return out


class ServedWatch:
    """Polls a service's /version from a thread: when did it first answer `want` (perf_counter)?

    What a user of a rollback waits for is the kept version answering again, healthy: this sees it
    from outside the agent, whatever the agent does after (supervisord's startsecs confirmation).
    """

    def __init__(self, port: int, want: str):
        import threading
        self.url, self.want, self.at = f"http://127.0.0.1:{port}/version", want, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "ServedWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _poll(self) -> None:
        deadline = time.perf_counter() + 60
        while not self._stop.is_set() and self.at is None and time.perf_counter() < deadline:
            try:
                if http_get(self.url, timeout=0.5).strip() == self.want:
                    self.at = time.perf_counter()
                    return
            except OSError:
                pass
            time.sleep(0.002)


def bench_rollback(res: Results, work: Path, rounds: int, quick: bool) -> None:
    from agent.service.reconciler import Reconciler

    repo = DemoRepo(work / "rollback-repo")
    port = free_port()
    base_lock = repo.lock("1.0.0")
    write_app(repo.path, "demo", "demo", base_lock, {"demo-web": port})
    commit(repo.path, "demo 1.0.0")
    root = CLEANUP.root(work / "rollback-root")
    once = [*agent_cmd(), "once", "--repo", repo.url, "--host", "bench", "--root", str(root),
            "--retention", "20", "--installer", "uv", "--json"]
    wall, _, proc = timed_proc(once, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"rollback: converge failed:\n{proc.stdout}\n{proc.stderr}")
    version = iter(range(1, 1000))

    def change(lock_text: str, message: str) -> None:
        (repo.path / "apps" / "demo" / "demo.lock").write_text(lock_text)
        commit(repo.path, message)

    def timed(run, expect_build: bool) -> tuple[float, float]:
        """(until 1.0.0 answers again, until `run` returns); a rebuild reports its return for both.

        `run()` -> (ok, action kinds, what to say if it went wrong)."""
        with ServedWatch(port, "1.0.0") as watch:
            t0 = time.perf_counter()
            ok, kinds, what = run()
            wall = time.perf_counter() - t0
        if not ok or ("build_venv" in kinds) != expect_build or "switch_venv" not in kinds:
            raise RuntimeError(f"rollback: unexpected outcome {what} {kinds}")
        return ((watch.at - t0) if (watch.at and not expect_build) else wall), wall

    def rounds_of(run) -> tuple[list[float], list[float], list[float]]:
        """(rebuild, rollback until serving, rollback until returned) over `rounds` new-lock/revert pairs."""
        rebuild, served, returned = [], [], []
        for _ in range(rounds):
            change(repo.lock(f"1.{next(version)}.0"), "new lock")
            rebuild.append(timed(run, True)[1])
            change(base_lock, "revert the lock")
            at, wall = timed(run, False)
            served.append(at)
            returned.append(wall)
        return rebuild, served, returned

    def run_once():
        proc = subprocess.run(once, capture_output=True, text=True, timeout=300)
        data = json.loads(proc.stdout)
        return proc.returncode == 0, [o["action"] for o in data["outcomes"]], f"{data['result']} {data['error']}"

    rebuild, rollback, rollback_wall = rounds_of(run_once)
    start = service_start_time(root / "envs" / "demo", 3 if quick else 10)
    own = statistics.median(start)
    budget = 0.2 + own
    res.add(Figure("5", "demo service's own start (spawn -> /healthz 200)", "s", start))
    res.add(Figure("5", "rollback to a kept venv, `once`: launch -> kept version serving", "s", rollback,
                   note="includes the `once` process start and a changed commit's load (~0.2 s); the "
                        "daemon row below is the target's case"))
    res.add(Figure("5", "rollback to a kept venv, `once` returns (after startsecs=1 confirmation)", "s",
                   rollback_wall, note="AwaitRunning: supervisord calls it RUNNING after startsecs=1"))
    res.add(Figure("5", "rebuild (new lock, uv): `once` whole process", "s", rebuild))
    settings = settings_for(repo.url, root, retention=20)
    rec = Reconciler(settings)
    rec.reconcile()

    def run_inproc():
        r = rec.reconcile()
        return r.result == "applied", [o.action.kind for o in r.outcomes], f"{r.result} {r.error}"

    rebuild_ip, rollback_ip, rollback_ip_wall = rounds_of(run_inproc)
    ri = res.add(Figure("5", "rollback to a kept venv, daemon: reconcile -> kept version serving", "s",
                        rollback_ip, f"<= {budget:.2f} s (0.2 + start)",
                        note="switch + restart + health gate passed, seen from outside the agent"))
    ri.verdict = verdict(ri.median <= budget)
    res.add(Figure("5", "rollback to a kept venv, daemon: reconcile returns (after startsecs=1)", "s",
                   rollback_ip_wall))
    res.add(Figure("5", "rebuild (new lock, uv): in-process reconcile (daemon)", "s", rebuild_ip))


# -- 6. the daemon: commit-to-converged, hand-edit detection; 7. idle CPU and RSS --------------------

def metrics(port: int) -> str:
    return http_get(f"http://127.0.0.1:{port}/metrics")


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def wait_for(pred, timeout: float, interval: float = 0.005, what: str = "") -> float:
    t0 = time.perf_counter()
    while True:
        try:
            if pred():
                return time.perf_counter()
        except OSError:
            pass
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def traffic_supported() -> bool:
    return bool(re.search(r"class \w*(Traffic|Weight)\w*\(", (REPO / "agent" / "core" / "plan.py").read_text()))


def write_traffic_app(repo: DemoRepo) -> None:
    """Two colours of the demo service behind a loopback frontend on the embedded load balancer."""
    d = repo.path / "apps" / "tr"
    d.mkdir(parents=True, exist_ok=True)
    (d / "blue.lock").write_text(repo.lock("1.0.0"))
    (d / "green.lock").write_text(repo.lock("2.0.0"))
    lines = ["apiVersion: gitops-agent/v1", "kind: App", "name: tr", "environments:"]
    for colour in ("blue", "green"):
        lines.append(f"  tr{colour}: {{lockfile: {colour}.lock, find_links: [../../wheelhouse], index: false, "
                     "installer: uv}")
    lines.append("services:")
    for colour in ("blue", "green"):
        port = free_port()
        lines += [f"  tr-{colour}:", f"    environment: tr{colour}", f"    port: {port}",
                  f'    command: [demoapp-server, --port, "{port}"]',
                  f'    health: {{http: "http://127.0.0.1:{port}/healthz", timeout_s: 1}}']
    lines += ["traffic:", f'  listen: "127.0.0.1:{free_port()}"', "  strategy: canary",
              "  weights: {tr-blue: 90, tr-green: 10}"]
    (d / "app.yaml").write_text("\n".join(lines) + "\n")


def proc_cpu_ticks(pid: int) -> int:
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields_[11]) + int(fields_[12])          # utime + stime (fields 14 and 15)


def proc_rss_mb(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024


def bench_daemon(res: Results, work: Path, runs: int, idle_s: float) -> None:
    repo = DemoRepo(work / "daemon-repo")
    port = free_port()
    write_app(repo.path, "demo", "demo", repo.lock("1.0.0"), {"demo-web": port})
    traffic = traffic_supported()
    if traffic:
        write_traffic_app(repo)
    sha = commit(repo.path, "demo 1.0.0" + (" + traffic" if traffic else ""))
    root = CLEANUP.root(work / "daemon-root")
    mport = free_port()
    logf = open(work / "daemon.log", "w")  # noqa: SIM115 (closed with the process)
    daemon = CLEANUP.proc(subprocess.Popen(
        [*agent_cmd(), "run", "--repo", repo.url, "--host", "bench", "--root", str(root), "--installer", "uv",
         "--listen", f"127.0.0.1:{mport}", "--poll-interval", "30"],
        stdout=logf, stderr=subprocess.STDOUT, start_new_session=True))

    def applied(s: str) -> bool:
        return f'gitops_agent_applied_revision_info{{revision="{s}"}} 1.0' in metrics(mport)

    try:
        wait_for(lambda: applied(sha), 180, 0.1, "the daemon's first converge")
        log("daemon: converged")
        lock_runs = []
        for i in range(1, runs + 1):
            (repo.path / "apps" / "demo" / "demo.lock").write_text(repo.lock(f"1.{i}.0"))
            git(repo.path, "add", "-A", ".")
            t0 = time.perf_counter()
            git(repo.path, "commit", "-q", "-m", f"demo 1.{i}.0")
            new = git(repo.path, "rev-parse", "HEAD")
            lock_runs.append(wait_for(lambda: applied(new), 120, 0.01, f"commit {new[:12]} applied") - t0)
            time.sleep(0.3)
        res.add(Figure("6", "commit-to-converged, lockfile change (uv build + restart + healthy)", "s", lock_runs,
                       note="from `git commit` to the applied_revision_info metric; includes startsecs=1"))
        if traffic:
            app = repo.path / "apps" / "tr" / "app.yaml"
            weight_runs = []
            for i in range(max(3, runs)):
                text = app.read_text()
                a, b = ("tr-blue: 90, tr-green: 10", "tr-blue: 10, tr-green: 90")
                app.write_text(text.replace(a, b) if a in text else text.replace(b, a))
                git(repo.path, "add", "-A", ".")
                t0 = time.perf_counter()
                git(repo.path, "commit", "-q", "-m", f"weights {i}")
                new = git(repo.path, "rev-parse", "HEAD")
                weight_runs.append(wait_for(lambda: applied(new), 60, 0.005, f"commit {new[:12]} applied") - t0)
                time.sleep(0.3)
            f = res.add(Figure("6", "commit-to-converged, weight-only change (haproxy)", "s", weight_runs,
                               "<= 0.25 s", note="canary 90/10 <-> 10/90 on the embedded HAProxy; from `git "
                               "commit` to the applied_revision_info metric"))
            f.verdict = verdict(f.median <= 0.25)
        else:
            res.add(Figure("6", "commit-to-converged, weight-only change", "s", target="<= 0.25 s", verdict="n/a",
                           text="n/a: no traffic actions in agent/plan.py yet"))

        program = root / "supervisor" / "programs" / "demo-web.conf"
        original = program.read_text()
        label = '{kind="program"}'
        edits = []
        for i in range(max(3, runs + 1)):
            before = metric_value(metrics(mport), "gitops_agent_drift_corrected_total", label) or 0.0

            def seen() -> bool:
                text = metrics(mport)
                return ((metric_value(text, "gitops_agent_drift_corrected_total", label) or 0.0) > before
                        or metric_value(text, "gitops_agent_drift", '{kind="program",name="demo-web"}') == 1.0)
            t0 = time.perf_counter()
            with open(program, "a") as f:
                f.write(f"\n# hand edit {i}\n")
            edits.append(wait_for(seen, 30, 0.005, "the hand edit to show in /metrics") - t0)
            wait_for(lambda: program.read_text() == original, 30, 0.02, "the program file healed")
            time.sleep(0.3)
        f = res.add(Figure("6", "hand edit of a program file -> drift metric", "s", edits[1:], "<= 0.3 s",
                           note="edit -> drift_corrected_total{kind=program} increments (healed) or drift gauge 1"))
        f.verdict = verdict(f.median <= 0.3)

        # 7. idle: nothing changes; no scrape during the window
        time.sleep(1.0 if idle_s < 30 else 2.0)
        hz = os.sysconf("SC_CLK_TCK")
        ticks0, t0 = proc_cpu_ticks(daemon.pid), time.perf_counter()
        rss = [proc_rss_mb(daemon.pid)]
        while time.perf_counter() - t0 < idle_s:
            time.sleep(1.0)
            rss.append(proc_rss_mb(daemon.pid))
        cpu_pct = (proc_cpu_ticks(daemon.pid) - ticks0) / hz / (time.perf_counter() - t0) * 100
        c = res.add(Figure("7", f"idle daemon CPU over {idle_s:g} s (poll every 30 s)", "%", [cpu_pct], "< 1%",
                           note="from /proc/<pid>/stat utime+stime"))
        c.verdict = verdict(cpu_pct < 1.0)
        r = res.add(Figure("7", "idle daemon RSS (max over the window)", "MB", [max(rss)], "< 60 MB",
                           note="from /proc/<pid>/status VmRSS, sampled every 1 s"))
        r.verdict = verdict(max(rss) < 60.0)
    except Exception:
        logf.flush()
        tail = (work / "daemon.log").read_text(errors="replace").splitlines()[-60:]
        log("daemon log (tail):\n" + "\n".join(tail))
        raise
    finally:
        CLEANUP.stop_proc(daemon)
        logf.close()


# -- main ------------------------------------------------------------------------------------------

def write_markdown(res: Results, info: list[tuple[str, str]], quick: bool, seconds: float, path: Path) -> None:
    lines = ["# gitops-agent benchmark results", "",
             f"`python bench/run.py{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M')} "
             f"({seconds:.0f} s). Targets from issue 6. Times are wall clock unless marked CPU.", "",
             "## Machine", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in info], "",
             "## Results", "", res.table(), ""]
    notes = [f"- **{f.label}**: {f.note}" for f in res.figures if f.note]
    if notes:
        lines += ["## Notes on figures", "", *notes, ""]
    lines += ["## How each figure is made", "", textwrap.dedent("""\
        1. A state repo of N apps (each: one environment `envNNN`, one service `svcNNN`, a tiny hand-made
           demoapp wheel from tests/wheelfactory.py, ONE shared lockfile content, `installer: uv` so setup
           builds take ~0.2 s instead of ~3.6 s with pip; every service is a real `demoapp-server` on its own
           127.0.0.1 port under the embedded supervisord). Converged in-process, then one `Reconciler` (as
           the daemon holds it) times `.reconcile()` with nothing changed: git resolve, load & validate,
           facts (venv markers, program files, supervisord over XML-RPC), plan, record status. Apps are
           added to the same repo and root between sizes (1 -> 10 -> 50 -> 200). Growth per app is the
           slope between the smallest and largest size; "linear" compares the marginal cost per app of the
           top range with that of the range below it (PASS when not above 1.5x).
        2. desired-state-example committed into a temp git repo; `gitops-agent once --path
           desired-state-example --host localhost` converges it (pip; uv in quick mode), then each timed
           run is the console script as a fresh process, exit 0 and "result: converged" checked.
        3. ansible-core in bench/.venv-ansible. The playbook (generated, committed to the same repo) does
           the same work for blue and green: dirs, the venv from the hashed lock via `pip` with
           `virtualenv` + `--require-hashes --no-deps --only-binary :all: --find-links wheelhouse`, the
           `envs/` symlink, the supervisord program file from a template; `gather_facts: false`.
           `ansible-pull -U file://REPO -i localhost, -c local playbook.yml` converges once, then the
           timed no-op runs must report changed=0. It does not drive supervisord (the agent also checks
           supervisord's state over XML-RPC), so ansible's side is if anything less work.
        4. `VenvManager(root).build(VenvSpec(installer=...))` of desired-state-example/apps/mandelbrot/
           blue.lock (numpy, pillow, mandelbrot), full agent build path (venv, install, check, entry
           points, marker), bytecode compiled by both (pip by default, uv with --compile-bytecode). Cold
           uv = a fresh UV_CACHE_DIR per run; warm = a primed one. pip uses its normal cache.
        5. A demoapp repo: each round commits a new lock (a new venv: rebuild) and then reverts it (the
           kept venv: switch + restart + healthy), timed as `gitops-agent once --json` (whole process)
           and as in-process reconciles; the outcome kinds are checked (build_venv or not). The budget is
           0.2 s + the service's own start, taken as max(startsecs=1, measured spawn -> healthy).
        6. `gitops-agent run --listen 127.0.0.1:PORT --poll-interval 30` on a local repo. Lock change:
           from `git commit` to the new revision in gitops_agent_applied_revision_info on /metrics
           (polled every 10 ms; each commit needs a uv build and a restart with startsecs=1). Hand edit:
           append a comment to the program file, poll /metrics every 5 ms until
           drift_corrected_total{kind="program"} increments (the daemon noticed and healed it) or the
           drift gauge reads 1; the first edit is a warm-up.
        7. Right after 6, nothing changing, no scrapes: /proc/<pid>/stat utime+stime over the window and
           the max VmRSS of the daemon process (not its supervisord or services).""")]
    if res.notes:
        lines += ["", "## Run notes", "", *[f"- {n}" for n in res.notes]]
    path.write_text("\n".join(lines) + "\n")


def precompile(res: Results) -> None:
    """Byte-compile the agent package, as `pip install` of the wheel (and the container image) does.

    An editable checkout under PYTHONDONTWRITEBYTECODE=1 (set on the bench machines) never writes
    .pyc files, so every `once` would recompile all ~30 modules from source (~21 ms): a cost of the
    dev checkout, not of an installed agent.
    """
    import compileall

    import agent
    package = Path(agent.__file__).parent
    compileall.compile_dir(str(package), quiet=1)
    if os.environ.get("PYTHONDONTWRITEBYTECODE") or sys.flags.dont_write_bytecode:
        res.notes.append(f"PYTHONDONTWRITEBYTECODE is set here: the bench byte-compiled {package} first, "
                         "as a pip or container install does (otherwise every `once` recompiles the agent, ~21 ms).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke mode: well under a minute")
    ap.add_argument("--out", help="where to write the markdown report (default bench/RESULTS.md; "
                    "--quick: bench/RESULTS-quick.md, so a smoke run never overwrites the full results)")
    ap.add_argument("--only", help="comma-separated sections to run (e.g. 1,6); default all")
    ap.add_argument("--keep", action="store_true", help="keep the temp work dir (processes are still stopped)")
    args = ap.parse_args(argv)
    quick = args.quick
    out = Path(args.out) if args.out else BENCH / ("RESULTS-quick.md" if quick else "RESULTS.md")
    started = time.perf_counter()

    def on_term(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="gitops-bench-"))
    res = Results()
    info = machine_info()
    precompile(res)
    failed = False
    try:
        steps = [
            ("1", lambda: bench_scale(res, work, [1, 10] if quick else [1, 10, 50, 200], 10 if quick else 30)),
            ("2", lambda: bench_once(res, work, 5 if quick else 15, quick)),
            ("3", lambda: (res.add(Figure("3", "ansible-pull no-op, same work, facts off (wall)", "s",
                                          text="skipped in quick mode")) if quick else
                           bench_ansible(res, work, 5, res.get("`once` no-op, whole process, example (wall)"),
                                         res.get("no-op reconcile in-process, 10 apps")))),
            ("4", lambda: bench_venv(res, work, 3, quick)),
            ("5", lambda: bench_rollback(res, work, 1 if quick else 5, quick)),
            ("6", lambda: bench_daemon(res, work, 1 if quick else 5, 10.0 if quick else 60.0)),
        ]
        only = set(args.only.split(",")) if args.only else None
        for section, step in steps:
            if only is not None and section not in only:
                continue
            try:
                step()
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 (one broken section must not lose the others)
                failed = True
                traceback.print_exc()
                res.add(Figure(section, f"section {section}", "", text=f"error: {exc}".splitlines()[0][:160],
                               verdict="ERROR"))
    finally:
        CLEANUP.run()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work dir kept: {work}")
    seconds = time.perf_counter() - started
    print()
    print("\n".join(f"{k}: {v}" for k, v in info))
    print()
    print(res.table())
    print(f"\n{'quick' if quick else 'full'} run in {seconds:.0f} s")
    write_markdown(res, info, quick, seconds, out)
    print(f"written {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
