"""The bench's machinery without a measurement in it: timing, figures, the result table, RESULTS.md, the CLI.

A section (bench/sections/) measures and adds `Figure`s to `Results`; this module runs the sections it is
given, keeps one broken section from losing the others, stops every process and supervisord they started
(also on error, Ctrl-C or SIGTERM), prints the table and writes the markdown report.
"""

from __future__ import annotations

import argparse
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
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _path in (REPO / "tests", REPO):           # the agent, and the tests' helpers the sections share
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from conftest import free_port
from daemon_helpers import wait_until

__all__ = [
    "BENCH",
    "CLEANUP",
    "REPO",
    "Cleanup",
    "Context",
    "Figure",
    "Results",
    "Section",
    "agent_cmd",
    "agent_python",
    "distinct_port",
    "log",
    "machine_info",
    "main",
    "port_free",
    "precompile",
    "run_alone",
    "samples_ms",
    "timed_proc",
    "verdict",
    "version_of",
    "when",
    "write_markdown",
]


# -- small helpers ---------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# A free 127.0.0.1 port never handed out before in this run: ports are written into app.yaml long before
# their services bind them (200 at once in section 1). The tests' `free_port` keeps that promise.
distinct_port = free_port


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


_AGENT_VENV: list[Path | None] = []
_DISTRO_PYTHON = Path("/usr/bin/python3")


@cache
def host_python() -> str:
    """The interpreter a host runs the agent with: the distro's python3, which the Containerfile and
    deploy/README install the agent into (GITOPS_BENCH_PYTHON overrides; this interpreter if there is none).

    Not the bench's own interpreter: on a development machine that is often a pyenv build, compiled
    without --enable-optimizations (no PGO, no LTO). On the bench machine that build runs Python code
    about 1.4x slower (3M additions: 0.48 s vs 0.35 s) and the agent's no-op 0.258 s vs 0.158 s: a cost of
    the developer's interpreter, not of a host. The agent's venv inherits it, and so do the venvs and the
    supervisord the agent starts (they use the agent's interpreter when the version matches). Asked once."""
    chosen = os.environ.get("GITOPS_BENCH_PYTHON")
    if chosen:
        return chosen
    if _DISTRO_PYTHON.exists():
        probe = subprocess.run([_DISTRO_PYTHON, "-c", "import sys; print(sys.version_info >= (3, 10))"],
                               capture_output=True, text=True, check=False)
        if probe.stdout.strip() == "True":
            return str(_DISTRO_PYTHON)
    return sys.executable


def _agent_venv() -> Path | None:
    """A venv holding the agent installed from this checkout (a wheel, byte-compiled, with its dependencies)
    on the host's interpreter (`host_python`): what `bootstrap`, the Containerfile and `pip install
    gitops-agent` in a venv give a host. Built once per bench process (~5 s with uv's cache warm), deleted
    at exit; None (with a log line) if it cannot be built."""
    if _AGENT_VENV:
        return _AGENT_VENV[0]
    import atexit

    from agent.drivers.venv import find_uv

    venv = Path(tempfile.mkdtemp(prefix="gitops-bench-agent-")) / "venv"
    atexit.register(shutil.rmtree, venv.parent, True)
    uv = find_uv()
    try:
        if uv is None:
            raise OSError("no uv binary")
        subprocess.run([uv, "venv", "-q", "--python", host_python(), venv], check=True, capture_output=True,
                       timeout=300)
        subprocess.run([uv, "pip", "install", "-q", "--compile-bytecode", "--python", venv / "bin" / "python", REPO],
                       check=True, capture_output=True, timeout=600)
        log(f"the agent runs from its own venv, installed from {REPO}: {venv}")
        _AGENT_VENV.append(venv)
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"cannot build the agent's venv ({exc}): the bench runs the agent from {sys.executable}")
        _AGENT_VENV.append(None)
    return _AGENT_VENV[0]


def agent_cmd() -> list[str]:
    """The agent's console script as a host runs it: from a venv of its own (`_agent_venv`), so its start
    costs what it costs there. A development interpreter can be much slower to start: this machine's
    site-packages carries a `.pth` that imports certifi and pathlib on every Python start (~50 ms), paid by
    each `once` and by the embedded supervisord. GITOPS_BENCH_AGENT=current runs this interpreter's script."""
    if os.environ.get("GITOPS_BENCH_AGENT") != "current":
        venv = _agent_venv()
        if venv is not None:
            return [str(venv / "bin" / "gitops-agent")]
    script = Path(sys.executable).parent / "gitops-agent"
    if script.exists():
        return [str(script)]
    found = shutil.which("gitops-agent")
    return [found] if found else [sys.executable, "-m", "agent.cli"]


def agent_python() -> str:
    """The interpreter of `agent_cmd`'s venv (this one when the agent runs from the bench's own): what a
    process that imports the agent, as the daemon does, runs on a host."""
    agent = Path(agent_cmd()[0])
    return str(agent.parent / "python") if agent.name == "gitops-agent" else sys.executable


def timed_proc(argv: list[str], **kw) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall s, CPU s of the child: user+sys, result)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc


def when(pred: Callable[[], object], timeout: float, what: str, step: float, log_file: Path | None = None) -> float:
    """perf_counter() at the first poll where `pred()` holds (the tests' `wait_until` polling)."""
    return wait_until(lambda: pred() and time.perf_counter(), timeout, what, log_file, step)


def version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


# -- what to stop at the end -----------------------------------------------------------------------

class Cleanup:
    """Finalizers run last-in first-out at the end of each section (and of the run), like pytest's
    `request.addfinalizer`.

    It is passed as `request` to the tests' starters (`daemon_helpers.start_daemon`), so a process the
    bench starts is stopped the way the tests stop it."""

    def __init__(self) -> None:
        self._finalizers: list[Callable[[], object]] = []

    def addfinalizer(self, fn: Callable[[], object]) -> None:
        self._finalizers.append(fn)

    def root(self, root: Path) -> Path:
        """An agent root whose embedded supervisord (and everything it runs) is stopped at the end."""
        from agent.drivers.supervisor import EmbeddedSupervisor

        self.addfinalizer(lambda: (root / "supervisor").exists() and EmbeddedSupervisor(root).stop())
        return root

    def run(self) -> None:
        while self._finalizers:
            fn = self._finalizers.pop()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 (the other finalizers must still run)
                log(f"cleanup: {exc}")


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


def _fmt(unit: str) -> Callable[[float], str]:
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

        def line(r: list[str]) -> str:
            return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"

        return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def samples_ms(samples_s: list[float]) -> list[float]:
    return [s * 1000 for s in samples_s]


# -- sections --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """What a section gets: the results to add to, a temp dir of its own run, and the mode."""

    res: Results
    work: Path
    quick: bool


@dataclass(frozen=True)
class Section:
    """One numbered part of the report: `run` measures, `how` is its item of "How each figure is made"."""

    number: str
    run: Callable[[Context], None]
    how: str


# -- machine info and the report -------------------------------------------------------------------

def _version_of(python: str) -> str:
    out = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return f"{out or 'unknown'} ({python})"


def machine_info(extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The machine and the tool versions the figures depend on; `extra`: rows the sections add."""
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
    return [
        ("CPU", cpu), ("cores", str(os.cpu_count())), ("RAM", mem),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python (the bench)", platform.python_version() + f" ({sys.executable})"),
        ("Python (the agent: `host_python`)", _version_of(host_python())),
        ("git", version_of(["git", "--version"])),
        ("pip", version_of([sys.executable, "-m", "pip", "--version"]).split(" from ")[0]),
        ("uv", version_of([uv, "--version"]) if uv else "not found"),
        ("supervisord", version_of([str(Path(sys.executable).parent / "supervisord"), "--version"])),
        *extra,
    ]


def write_markdown(res: Results, info: list[tuple[str, str]], quick: bool, seconds: float, path: Path,
                   how: list[str], only: str | None = None) -> None:
    flags = (" --quick" if quick else "") + (f" --only {only}" if only else "")
    lines = ["# gitops-agent benchmark results", "",
             (f"`python bench/run.py{flags}` on {time.strftime('%Y-%m-%d %H:%M')} "
              f"({seconds:.0f} s). Targets from issue 6. Times are wall clock unless marked CPU."), "",
             "## Machine", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in info], "",
             "## Results", "", res.table(), ""]
    notes = [f"- **{f.label}**: {f.note}" for f in res.figures if f.note]
    if notes:
        lines += ["## Notes on figures", "", *notes, ""]
    lines += ["## How each figure is made", "", "\n".join(h.rstrip("\n") for h in how)]
    if res.notes:
        lines += ["", "## Run notes", "", *[f"- {n}" for n in res.notes]]
    path.write_text("\n".join(lines) + "\n")


def run_alone(run: Callable[..., None], prefix: str, default_runs: int) -> None:
    """One section run on its own (`python bench/sections/X.py [--runs N]`): its figures printed as a table."""
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=default_runs)
    args = ap.parse_args()
    out = Results()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        try:
            run(Context(out, Path(tmp), quick=False), runs=args.runs)
        finally:
            CLEANUP.run()      # inside: the roots must still exist to be stopped
    print(out.table())
    log("done")


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


# -- the command line ------------------------------------------------------------------------------

def main(description: str, sections: list[Section], machine_rows: Callable[[], list[tuple[str, str]]],
         argv: list[str] | None = None) -> int:
    """Run `sections` (or those --only names), print the table, write the report; 1 if a section failed."""
    ap = argparse.ArgumentParser(description=description)
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
    info = machine_info(machine_rows())
    precompile(res)
    ctx = Context(res, work, quick)
    failed = False
    try:
        only = set(args.only.split(",")) if args.only else None
        for section in sections:
            if only is not None and section.number not in only:
                continue
            try:
                section.run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 (one broken section must not lose the others)
                failed = True
                traceback.print_exc()
                res.add(Figure(section.number, f"section {section.number}", "",
                               text=f"error: {exc}".splitlines()[0][:160], verdict="ERROR"))
            finally:
                # what a section started is stopped before the next one is timed: section 1 alone leaves a
                # supervisord with 200 programs (~15% of a core), which loaded every later section. And what
                # it wrote is flushed: a build's os.sync would otherwise write out the last section's venvs
                CLEANUP.run()
                os.sync()
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
    write_markdown(res, info, quick, seconds, out, [s.how for s in sections], args.only)
    print(f"written {out}")
    return 1 if failed else 0
