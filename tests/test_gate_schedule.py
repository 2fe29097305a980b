"""The health gate's probe schedule (agent/service/executor.py `_check_health`): every 10 ms for the first
second after the (re)start, every 50 ms to 10 s, then every 0.2 s; a health command (a process per probe)
at most every 50 ms. Real probes (TCP to a closed port, a real `false` command); the clock and sleep are a
FAKE clock, so the schedule is read exactly and no test waits it out, and supervisord is a FAKE that says
STARTING (the program never answers, as a service still importing its code)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import free_port

from agent.core.actions import CheckHealth
from agent.core.errors import HealthCheckFailed
from agent.core.layout import Layout
from agent.service.executor import Drivers, _check_health


class FakeClock:
    """FAKE time: `sleep` advances it and records each step."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.steps: list[tuple[float, float]] = []      # (seconds since the gate began, step)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.steps.append((self.now - 1000.0, seconds))
        self.now += seconds


class FakeStartingSupervisor:
    """FAKE supervisord: the program is STARTING, pid 0, for ever."""

    def ensure(self):
        return self

    def process_info(self) -> dict:
        return {"web": {"name": "web", "group": "web", "statename": "STARTING", "pid": 0}}


def _gate(tmp_path: Path, wait_s: float, **probe) -> FakeClock:
    fake = FakeClock()
    drivers = Drivers(layout=Layout(tmp_path / "root"), venvs=None, supervisor=FakeStartingSupervisor(),
                      health_wait_s=wait_s, clock=fake.clock, sleep=fake.sleep)
    with pytest.raises(HealthCheckFailed, match="not healthy after"):
        _check_health(drivers, CheckHealth("program:web", "gate", name="web", timeout_s=0.5, **probe))
    return fake


def test_a_gate_probes_every_10ms_for_a_second_then_50ms_then_every_200ms(tmp_path):
    fake = _gate(tmp_path, 12.0, tcp=f"127.0.0.1:{free_port()}")
    first = [step for at, step in fake.steps if at < 1.0 - 1e-9]
    middle = [step for at, step in fake.steps if 1.0 + 1e-9 < at < 10.0 - 1e-9]
    late = [step for at, step in fake.steps if at > 10.0 + 1e-9]
    assert first and set(first) == {0.01}
    assert len(first) == pytest.approx(100, abs=1)        # a service up at 0.15 s is seen at once, not at 0.2 s
    assert middle and set(middle) == {0.05}
    assert late and set(late) == {0.2}


@pytest.mark.skipif(shutil.which("false") is None, reason="no `false` binary")
def test_a_health_command_runs_at_most_every_50ms(tmp_path):
    fake = _gate(tmp_path, 1.5, command=(shutil.which("false"),))
    assert fake.steps and {step for _, step in fake.steps} == {0.05}
