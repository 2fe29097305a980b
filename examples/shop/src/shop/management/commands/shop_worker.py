"""`django-admin shop_worker`: the shop's background worker.

Every interval (worker.interval_s of SHOP_CONFIG, or --interval) it fulfils the pending orders, asks
the web process's /healthz (SHOP_WEB, if set) and writes a heartbeat, so what it does is observable:
`$SHOP_DATA/heartbeats/<process>.json` (process = SUPERVISOR_PROCESS_NAME, e.g. shop-worker-0, else
pid-N) is replaced atomically on every beat. A database that is not migrated yet is recorded in the
heartbeat, not fatal. SIGTERM or SIGINT ends the loop after the current beat: exit 0.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import signal
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from shop import health
from shop._version import __version__
from shop.models import Order

log = logging.getLogger("shop.worker")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def process_name() -> str:
    name = os.environ.get("SUPERVISOR_PROCESS_NAME") or f"pid-{os.getpid()}"
    return _UNSAFE.sub("_", name)[:64]


def probe_web(base: str) -> int | str:
    """The HTTP status of SHOP_WEB's /healthz, or why there is none."""
    if not base.startswith(("http://", "https://")):
        return "not http"
    try:
        with urllib.request.urlopen(base.rstrip("/") + "/healthz", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return "unreachable"


def write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class Command(BaseCommand):
    help = "Fulfil pending orders and write a heartbeat every few seconds until SIGTERM."

    def add_arguments(self, parser):
        parser.add_argument("--interval", type=float, default=None,
                            help="seconds between beats (default: worker.interval_s of SHOP_CONFIG, 5)")

    def handle(self, *args, interval=None, **options):
        interval = settings.SHOP.worker_interval_s if interval is None else interval
        if not 0 < interval <= 3600:
            raise CommandError("--interval must be in (0, 3600] seconds")
        stop = threading.Event()

        def on_signal(signum, _frame):
            log.info("signal %s: stopping after this beat", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        name = process_name()
        path = settings.SHOP.heartbeat_dir / f"{name}.json"
        web = os.environ.get("SHOP_WEB", "")
        log.info("shop worker %s (%s) started: a beat every %.3g s into %s", name, __version__, interval, path)
        beats = fulfilled_total = 0
        while True:
            beats += 1
            state, fulfilled = self.beat(name)
            fulfilled_total += fulfilled
            record = {"process": name, "pid": os.getpid(), "version": __version__, "beats": beats,
                      "at": timezone.now().isoformat(), "db": state, "fulfilled": fulfilled_total}
            if web:
                record["web"] = probe_web(web)
            write_json_atomically(path, record)
            log.info("beat %d: db %s, fulfilled %d order(s)%s", beats, state, fulfilled,
                     f", web {record['web']}" if web else "")
            if stop.wait(interval):
                break
        log.info("shop worker %s stopped after %d beat(s)", name, beats)

    def beat(self, name: str) -> tuple[str, int]:
        """('ok', orders fulfilled now), or what keeps the worker from the database, and 0."""
        close_old_connections()
        try:
            health.check()
            # one UPDATE: with several workers each order is fulfilled by exactly one of them
            fulfilled = Order.objects.filter(fulfilled_at__isnull=True).update(
                fulfilled_at=dt.datetime.now(dt.timezone.utc), fulfilled_by=name)
        except health.NotReady as e:
            return str(e), 0
        except DatabaseError as e:
            return f"database error ({type(e).__name__})", 0
        return "ok", fulfilled
