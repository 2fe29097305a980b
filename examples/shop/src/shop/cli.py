"""Console scripts: `shop-migrate` (the agent's migration job) and `shop-admin` (django-admin with the
shop's settings as default).

A configuration error ends the process with exit 2 and one line naming the variable or key at fault,
instead of a traceback (it never holds a value).
"""

from __future__ import annotations

import os
import sys

__all__ = ["migrate", "admin"]


def _run(argv: list[str]) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(argv)
    except ImproperlyConfigured as e:
        print(f"{os.path.basename(argv[0])}: {e}", file=sys.stderr)
        return 2
    return 0


def migrate() -> int:
    """`manage.py migrate --noinput`: bring the database in SHOP_DATA to this release's schema."""
    return _run(["shop-migrate", "migrate", "--noinput", *sys.argv[1:]])


def admin() -> int:
    return _run(["shop-admin", *sys.argv[1:]])
