"""The daemon's pure parts: backoff, jitter, coalescing, the echo loop guard; and the Runtime loop with a fake reconcile."""

from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import pytest

from agent.service.runtime import Backoff, Runtime, Schedule, jittered

pytestmark = pytest.mark.timeout(30)


def schedule(**kw) -> Schedule:
    kw.setdefault("rng", random.Random(7))
    return Schedule(kw.pop("poll_s", 15.0), **kw)


def run(s: Schedule, now: float, ok: bool = True, applied: bool = False, seconds: float = 1.0) -> str:
    """One run from `now` to `now + seconds`; returns its reason."""
    assert s.due_in(now) <= 0, s.due_in(now)
    reason = s.start(now)
    s.finish(now + seconds, ok, applied)
    return reason


# -- jitter and backoff -------------------------------------------------------------------------

def test_jitter_stays_within_ten_percent_and_varies():
    rng = random.Random(1)
    values = [jittered(15.0, 0.1, rng) for _ in range(500)]
    assert all(13.5 <= v <= 16.5 for v in values)
    assert max(values) - min(values) > 2.0                  # really spread, not a constant
    assert jittered(0.0, 0.1, rng) == 0.0


def test_backoff_doubles_caps_and_is_jittered():
    b = Backoff(delays=(1, 2, 4, 8, 300), jitter=0.0)
    rng = random.Random(0)
    assert [b.delay(n, rng) for n in range(0, 8)] == [0, 1, 2, 4, 8, 300, 300, 300]
    jb = Backoff(delays=(10,), jitter=0.1)
    got = {round(jb.delay(3, rng), 6) for _ in range(50)}
    assert len(got) > 1 and all(9.0 <= d <= 11.0 for d in got)


def test_first_run_is_immediate_then_the_poll_is_jittered():
    s = schedule(poll_s=10.0, now=100.0)
    assert s.due_in(100.0) == 0
    assert run(s, 100.0) == "poll"
    wait = s.due_in(101.0)
    assert 9.0 - 1e-9 <= wait <= 11.0 + 1e-9


def test_failures_back_off_exponentially_and_reset_on_success():
    s = schedule(poll_s=15.0, backoff=Backoff((1, 2, 4, 8), jitter=0.0), jitter=0.0)
    t = 0.0
    delays = []
    for _ in range(5):
        run(s, t, ok=False, seconds=0.0)
        delays.append(s.due_in(t))
        t += delays[-1]
    assert delays == [1, 2, 4, 8, 8]
    assert run(s, t) == "retry"      # still failing before this run: it is a retry
    assert s.failures == 0 and s.due_in(t + 1.0) == pytest.approx(15.0)   # ends at t+1, then the poll


def test_a_permanent_failure_waits_for_the_poll_and_a_temporary_one_backs_off():
    """The error's type decides the retry: an invalid revision cannot pass before a new commit."""
    s = schedule(poll_s=15.0, backoff=Backoff((1, 2, 4), jitter=0.0), jitter=0.0)
    s.start(0.0)
    s.finish(0.0, ok=False, applied=False, backoff=False)        # Permanent (Result.retry is POLL)
    assert s.due_in(0.0) == pytest.approx(15.0) and s.failures == 0
    s.start(15.0)
    s.finish(15.0, ok=False, applied=False, backoff=True)        # Temporary
    assert s.due_in(15.0) == pytest.approx(1.0) and s.failures == 1


def test_the_runtime_reads_the_retry_from_the_result():
    from agent.core.outcome import ReconcileResult, Retry

    results = iter([SimpleNamespace(result=ReconcileResult.INVALID, retry=Retry.POLL, outcomes=(), error="bad"),
                    SimpleNamespace(result=ReconcileResult.ERROR, retry=Retry.BACKOFF, outcomes=(), error="net")])
    seen = []

    def reconcile():
        r = next(results)
        seen.append(r)
        return r

    rt = Runtime(reconcile, Schedule(60.0, now=time.monotonic(), backoff=Backoff((0.01,), jitter=0.0)))
    assert rt._run_once("poll")[3] is False
    assert rt._run_once("poll")[3] is True
    assert len(seen) == 2


# -- coalescing ---------------------------------------------------------------------------------

def test_triggers_during_a_run_coalesce_into_one_follow_up():
    s = schedule()
    run(s, 0.0)
    assert s.due_in(5.0) > 0
    s.trigger(5.0, "host")
    assert s.due_in(5.0) == 0
    s.start(5.0)
    for i in range(20):                                       # a burst during the run
        assert s.trigger(5.1 + i * 0.01, "host")
    s.trigger(5.5, "repo")
    assert s.due_in(5.6) == float("inf")                      # single flight: nothing while running
    s.finish(6.0, ok=True, applied=False)
    assert s.due_in(6.0) == 0
    assert s.start(6.0) == "host+repo (follow-up)"
    s.finish(6.1, ok=True, applied=False)
    assert s.due_in(6.2) > 10                                 # exactly one follow-up: back to the poll


def test_idle_triggers_merge_until_the_run_starts():
    s = schedule()
    run(s, 0.0)
    for t in (3.0, 3.1, 3.2):
        s.trigger(t, "host")
    assert s.start(3.3) == "host"                             # not a follow-up: a fresh event
    s.finish(3.4, ok=True, applied=True)
    assert s.due_in(3.5) > 10


def test_events_older_than_the_last_run_start_are_already_covered():
    s = schedule()
    run(s, 0.0, seconds=2.0)
    # a batch whose events were all seen before the run started, delivered late: that run read them
    assert s.trigger(2.1, "host", since=-0.5, until=-0.1) is False
    assert s.due_in(2.2) > 10
    # one whose last event came after the start is not covered (an echo of the run: follow-up)
    assert s.trigger(2.1, "host", since=-0.5, until=0.5) is True
    assert s.due_in(2.2) == 0


def test_own_writes_earn_one_follow_up_and_no_more():
    """apply -> events -> follow-up that applies again (e.g. still failing) -> its echo is dropped."""
    s = schedule(backoff=Backoff((30,), jitter=0.0))
    s.trigger(0.0, "host", since=-1.0)   # hand edit (before any run: fresh)
    s.start(0.0)
    s.trigger(0.5, "host", since=0.4)    # the apply's own write
    s.finish(1.0, ok=False, applied=True)
    assert s.due_in(1.0) > 0 and s.due_in(2.0) <= 0           # failing: host triggers wait the 1 s floor
    assert s.start(2.0) == "host (follow-up)"
    assert s.trigger(2.5, "host", since=2.4)                  # during the follow-up: accepted for now...
    s.finish(3.0, ok=False, applied=True)
    assert s.due_in(3.0) == pytest.approx(30.0)               # ...but dropped: only the backoff retry remains
    # the same echo delivered late (after the debounce) is dropped as well
    assert s.trigger(3.1, "host", since=2.99, until=3.0) is False
    assert s.dropped == 2
    # a genuinely new event later is honoured (after the failure floor)
    assert s.trigger(10.0, "host", since=9.9)
    assert s.due_in(10.0) <= 0


def test_late_echo_of_a_fresh_apply_gets_a_follow_up_and_the_converged_follow_up_ends_it():
    s = schedule()
    s.trigger(0.0, "host")
    s.start(0.0)
    s.finish(1.0, ok=True, applied=True)
    # debounced echo of a write at 0.98 arrives after the run ended
    assert s.trigger(1.08, "host", since=0.98, until=0.99)
    assert s.start(1.08) == "host (follow-up)"
    s.finish(1.1, ok=True, applied=False)                     # converged: writes nothing
    assert s.due_in(1.2) > 10


def test_a_new_commit_cuts_the_backoff_short_but_host_events_respect_the_floor():
    s = schedule(backoff=Backoff((300,), jitter=0.0))
    run(s, 0.0, ok=False, seconds=1.0)
    s.trigger(1.2, "host", since=1.2)
    assert s.due_in(1.2) == pytest.approx(0.8)                # floor: 1 s after the failed run
    s2 = schedule(backoff=Backoff((300,), jitter=0.0))
    run(s2, 0.0, ok=False, seconds=1.0)
    s2.trigger(1.2, "repo", since=1.2)
    assert s2.due_in(1.2) == 0


# -- the Runtime loop on real threads, with a fake reconcile --------------------------------------

class FakeReconcile:
    def __init__(self, results=None):
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.results = list(results or [])

    def __call__(self):
        self.calls += 1
        self.entered.set()
        self.gate.wait(10)
        if self.results:
            r = self.results.pop(0)
            if isinstance(r, Exception):
                raise r
            return r
        return SimpleNamespace(result="converged", outcomes=(), revision=None, seconds=0.0, error=None)


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return False


@pytest.fixture
def loop():
    started = []

    def make(fake, **kw):
        rt = Runtime(fake, Schedule(kw.pop("poll_s", 60.0), now=time.monotonic(), **kw))
        th = threading.Thread(target=rt.run, daemon=True)
        th.start()
        started.append((rt, th))
        return rt, th

    yield make
    for rt, th in started:
        rt.stop()
        th.join(5)


def test_runtime_coalesces_a_burst_during_a_run_into_one_more_run(loop):
    fake = FakeReconcile()
    rt, _ = loop(fake)
    assert wait_for(lambda: rt.runs == 1)
    fake.gate.clear()
    fake.entered.clear()
    rt.trigger("host")
    assert fake.entered.wait(5)
    for _ in range(50):
        rt.trigger("host")
    fake.gate.set()
    assert wait_for(lambda: rt.runs == 3)
    time.sleep(0.2)
    assert fake.calls == 3                       # initial, the trigger, ONE follow-up for the burst


def test_runtime_survives_exceptions_and_backs_off(loop):
    fake = FakeReconcile([RuntimeError("boom"), OSError("disk"), None])
    fake.results[2] = SimpleNamespace(result="converged", outcomes=(), revision=None, seconds=0.0, error=None)
    rt, th = loop(fake, backoff=Backoff((0.05, 0.1), jitter=0.0))
    assert wait_for(lambda: rt.runs == 3)
    assert th.is_alive() and rt.schedule.failures == 0


def test_stop_lets_the_current_run_finish_and_takes_no_more_triggers(loop):
    fake = FakeReconcile()
    fake.gate.clear()
    rt, th = loop(fake)
    assert fake.entered.wait(5)
    rt.stop()
    rt.trigger("host")
    assert th.is_alive()                          # still inside the reconcile
    fake.gate.set()
    th.join(5)
    assert not th.is_alive() and fake.calls == 1 and rt.runs == 1


def test_a_dropped_echo_of_a_healthy_run_still_earns_a_recheck_within_a_second():
    """A hand change landing in the echo window of a follow-up that applied is not left to the poll."""
    s = schedule()
    s.trigger(0.0, "host", since=-1.0)
    s.start(0.0)
    s.trigger(0.5, "host", since=0.4)
    s.finish(1.0, ok=True, applied=True)
    assert s.start(1.0) == "host (follow-up)"
    s.finish(1.2, ok=True, applied=True)
    assert s.trigger(1.21, "host", since=1.21) is False        # dropped as the follow-up's echo...
    assert 0 < s.due_in(1.21) <= s.recheck_s                    # ...but looked at again within recheck_s
