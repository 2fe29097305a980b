"""Release windows (DESIGN §3b `rollout.windows`): when an app's changes may restart or re-weight. Pure:
the time is an argument (an aware UTC datetime).

A window is a set of weekdays and a local start/end time in an IANA zone (`zoneinfo`). An end at or
before the start crosses midnight: the window belongs to the day it starts on (`fri 22:00-02:00` is open
Saturday 01:00). Local times are resolved per day, so a DST change moves the window with the wall clock:
`02:00-04:00 Europe/Berlin` is 01:00-03:00 UTC in winter and 00:00-02:00 UTC in summer. A start that
falls in a spring-forward gap opens at the first instant after it; a start in a repeated hour opens at
its first occurrence (fold 0).
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from agent.core._record import record

__all__ = ["Window", "DAYS", "is_open", "next_open", "parse_hhmm"]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@record
class Window:
    days: tuple[str, ...]       # of DAYS
    start: str                  # "HH:MM" local
    end: str                    # "HH:MM" local; <= start: crosses midnight
    timezone: str = "UTC"       # IANA name

    def describe(self) -> str:
        return f"{','.join(self.days)} {self.start}-{self.end} {self.timezone}"


def parse_hhmm(text: str) -> time:
    hh, mm = text.split(":")
    h, m = int(hh), int(mm)
    if h == 24 and m == 0:
        return time(23, 59, 59, 999999)
    return time(h, m)


def _local(day: date, at: time, zone: ZoneInfo) -> datetime:
    """`day at` in `zone` as UTC; a wall time skipped by DST resolves to the instant after the gap."""
    naive = datetime.combine(day, at)
    aware = naive.replace(tzinfo=zone, fold=0)
    back = aware.astimezone(timezone.utc).astimezone(zone).replace(tzinfo=None)
    if back == naive:
        return aware.astimezone(timezone.utc)
    # in a spring-forward gap: the first instant whose wall time is at or past `naive` (the gap's end)
    t = naive.replace(tzinfo=zone, fold=1).astimezone(timezone.utc)
    while t.astimezone(zone).replace(tzinfo=None) < naive:
        t += timedelta(minutes=1)
    return t.replace(second=0, microsecond=0)


def _spans(w: Window, around: datetime):
    """(open, close) UTC instants of `w` for the local days from 2 before to 8 after `around`."""
    zone = ZoneInfo(w.timezone)
    today = around.astimezone(zone).date()
    start, end = parse_hhmm(w.start), parse_hhmm(w.end)
    for offset in range(-2, 9):
        day = today + timedelta(days=offset)
        if DAYS[day.weekday()] not in w.days:
            continue
        opens = _local(day, start, zone)
        closes = _local(day + timedelta(days=1) if end <= start else day, end, zone)
        yield opens, closes


def is_open(windows, now: datetime) -> bool:
    """True when no window is declared, or `now` is inside one."""
    if not windows:
        return True
    return any(o <= now < c for w in windows for o, c in _spans(w, now))


def next_open(windows, now: datetime) -> datetime | None:
    """When the next window opens after `now` (None: no window, or none within a week)."""
    future = [o for w in windows for o, _c in _spans(w, now) if o > now]
    return min(future) if future else None
