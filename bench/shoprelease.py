"""The example shop as a state repo of its own, and its releases, for bench section 8 and bench/profile.py.

Why its own module: the section (with the daemon) and the profile (in-process, under pyinstrument) must
deploy exactly the same thing. A release `1.N.0` is the shop of examples/shop plus migrations 0002..0(N+1),
each adding a nullable column to `Order` and back-filling it (an "expand" migration: the release still
running keeps working between the migration and its restart), so every release's `shop-migrate` job
has real work to do. Wheels come from the shop's own reproducible build (examples/shop/build.py, run
from a scratch copy of the tree that holds the extra migrations); locks from tests/shopfactory.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from harness import log

# isort: split
from conftest import StateRepo
from fixtures import FLEET, IDENTITY
from shopfactory import MAIN_LOCK, SHOP_APP, SHOP_SRC, decrypt_dotenv, shop_lock_text

__all__ = ["ShopRepo", "build_release_wheels", "place_orders", "release_version", "shop_version"]

_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
_SHIPPED_PORT = 8200


def release_version(n: int) -> str:
    """The n-th release after the shipped 1.0.0: 1.n.0 (its migrations: 0002 .. 0(n+1))."""
    return f"1.{n}.0"


def _migration(number: int) -> str:
    previous = "0001_initial" if number == 2 else f"{number - 1:04d}_note_{number - 1}"
    return f'''# bench/shoprelease.py: release migration {number} (add a nullable column, back-fill it)
from django.db import migrations, models


def fill(apps, schema_editor):
    apps.get_model("shop", "Order").objects.update(note_{number}="release {number}")


class Migration(migrations.Migration):
    dependencies = [("shop", "{previous}")]
    operations = [
        migrations.AddField(model_name="order", name="note_{number}",
                            field=models.CharField(max_length=40, null=True, blank=True)),
        migrations.RunPython(fill, migrations.RunPython.noop),
    ]
'''


def _release_tree(n: int, scratch: Path) -> Path:
    """A copy of examples/shop with release n's migrations and model fields."""
    tree = scratch / f"shop-src-{n}"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(SHOP_SRC, tree, ignore=_IGNORED)
    models = tree / "src" / "shop" / "models.py"
    fields = "".join(f"    note_{k} = models.CharField(max_length=40, null=True, blank=True)\n"
                     for k in range(2, n + 2))
    text, count = re.subn(r"(?m)^(    fulfilled_by = .*\n)", lambda m: m.group(1) + fields, models.read_text())
    if count != 1:
        raise RuntimeError(f"{models}: no single `fulfilled_by` field to add the release's fields after")
    models.write_text(text)
    for k in range(2, n + 2):
        (tree / "src" / "shop" / "migrations" / f"{k:04d}_note_{k}.py").write_text(_migration(k))
    return tree


def build_release_wheels(count: int, out: Path, scratch: Path) -> dict[int, Path]:
    """Wheels of releases 1..count ({n: path}), each by the shop's own build run from its scratch tree."""
    wheels = {}
    for n in range(1, count + 1):
        tree = _release_tree(n, scratch)
        proc = subprocess.run([sys.executable, str(tree / "build.py"), "--version", release_version(n),
                               "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=scratch,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"building shop {release_version(n)} failed:\n{proc.stdout}\n{proc.stderr}")
        wheels[n] = out / f"shop-{release_version(n)}-py3-none-any.whl"
        shutil.rmtree(tree, ignore_errors=True)
    log(f"release: built {count} shop wheels")
    return wheels


class ShopRepo(StateRepo):
    """A state repo with the example's shop app (for host h1) on `port`, at the shipped release 1.0.0."""

    def __init__(self, path: Path, port: int):
        super().__init__(path)
        self.port = port
        self.write("fleet.yaml", FLEET)
        app = self.path / "apps" / "shop"
        shutil.copytree(SHOP_APP, app, ignore=shutil.ignore_patterns("README.md"))
        text = (app / "app.yaml").read_text()
        (app / "app.yaml").write_text(re.sub(rf"\b{_SHIPPED_PORT}\b", str(port), text))

    def stage_release(self, wheel: Path) -> None:
        """The release's wheel in wheels/ (in place of the previous one) and main.lock pinning it."""
        wheels = self.path / "apps" / "shop" / "wheels"
        for old in wheels.glob("shop-*.whl"):
            old.unlink()
        shutil.copyfile(wheel, wheels / wheel.name)
        self.write("apps/shop/main.lock", shop_lock_text(wheel, MAIN_LOCK))


def shop_version(port: int, timeout: float = 1.0) -> str | None:
    """The version /version answers, or None (refused, reset, 5xx: mid-restart)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=timeout) as resp:
            return json.loads(resp.read())["version"]
    except (OSError, ValueError, KeyError):
        return None


def place_orders(port: int, count: int) -> None:
    """`count` orders through POST /orders (the token from the demo secret), so migrations touch rows."""
    token = decrypt_dotenv(SHOP_APP / "django.env.age", IDENTITY)["ORDERS_API_TOKEN"]
    for i in range(count):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/orders", data=json.dumps({"item": f"item {i}"}).encode(),
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                if resp.status != 201:
                    raise RuntimeError(f"POST /orders answered {resp.status}")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"POST /orders answered {exc.code}") from None
