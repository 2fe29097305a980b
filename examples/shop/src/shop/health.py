"""Readiness: the database answers and every migration of the code that runs is applied.

Why the migration check: the agent runs `shop-migrate` as a job before it restarts the web process on
a new release; a web process whose schema is behind would serve errors, so it is not healthy until
the migration is recorded as applied (and the health gate then holds the rollout).
"""

from __future__ import annotations

from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor

__all__ = ["NotReady", "check", "pending_migrations"]


class NotReady(Exception):
    """The database cannot be read or is not migrated; the message says which (no values)."""


def pending_migrations() -> list[str]:
    """Names ('shop.0001_initial') of the migrations not yet applied, in the order migrate runs them."""
    try:
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except DatabaseError as e:
        raise NotReady(f"database unavailable ({type(e).__name__})") from None
    return [f"{migration.app_label}.{migration.name}" for migration, _backwards in plan]


def check() -> None:
    """Raise NotReady unless the schema is complete."""
    pending = pending_migrations()
    if pending:
        raise NotReady("not migrated: " + ", ".join(pending))
