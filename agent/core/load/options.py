"""What the agent's own config decides about how a revision is read (shared by the read and validate steps)."""

from __future__ import annotations

import sys
from pathlib import Path

from agent.core._record import record

__all__ = ["LoadOptions", "FLEET_FILE", "APPS_DIR", "APP_FILE", "MAX_APPS"]

FLEET_FILE = "fleet.yaml"
APPS_DIR = "apps"
APP_FILE = "app.yaml"
MAX_APPS = 1000


@record
class LoadOptions:
    """What the agent's own config decides about how a revision is read."""

    default_python: str = f"{sys.version_info.major}.{sys.version_info.minor}"
    default_installer: str = "pip"
    allow_root: bool = False
    allow_chaos: bool = False           # act on apps' `chaos:` blocks (else they are ignored, with a note)
    boundary: Path | None = None        # paths may reach up to here (the checkout, when the state is a tier's
                                        # subdirectory: tiers share one wheelhouse); default: the state dir
