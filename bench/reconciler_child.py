"""The daemon's reconciler in a process of its own, driven line by line: what a host's daemon runs, on the
host's interpreter (the bench's `agent_python`), not inside the bench's process.

    AGENT_PYTHON bench/reconciler_child.py REPO_URL HOST ROOT RETENTION

Builds one `Reconciler`, as `gitops-agent run` does, and prints `ready`. Then, for each line read from
stdin, one reconcile, answered by one JSON line: {"result", "kinds" (the outcomes' action kinds), "error"}.
Exits at the end of stdin. Imports only the agent, so it runs in the agent's own venv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from agent.service.reconciler import Reconciler
    from agent.settings import Settings

    url, host, root, retention = sys.argv[1:5]
    settings = Settings(repo=url, host=host, root=Path(root), installer="uv", retention=int(retention)).check()
    rec = Reconciler(settings)
    print("ready", flush=True)
    for _ in sys.stdin:
        r = rec.reconcile()
        print(json.dumps({"result": str(r.result), "kinds": [str(o.action.kind) for o in r.outcomes],
                          "error": r.error}), flush=True)


if __name__ == "__main__":
    main()
