"""The state repo's own CI: `.pre-commit-hooks.yaml` runs `gitops-agent validate`, and the JSON Schemas
carry `$id`s editors can map app.yaml / fleet.yaml to."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO_ROOT


def test_the_hook_runs_validate_on_a_state_repo_and_fails_on_a_broken_one(tmp_path):
    hooks = yaml.safe_load((Path(REPO_ROOT) / ".pre-commit-hooks.yaml").read_text())
    hook = next(h for h in hooks if h["id"] == "gitops-agent-validate")
    assert hook["language"] == "python" and hook["pass_filenames"] is False
    argv = shlex.split(hook["entry"]) + hook["args"]
    assert argv[:2] == ["gitops-agent", "validate"]
    state = tmp_path / "state"
    shutil.copytree(Path(REPO_ROOT) / "desired-state-example", state)
    subprocess.run(["git", "init", "-q", str(state)], check=True)

    def run():   # as pre-commit does: the entry with its args, in the repo's root (the module, for no install)
        return subprocess.run([sys.executable, "-m", "agent.cli", *argv[1:]], cwd=state, capture_output=True,
                              text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})

    ok = run()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    app = next(state.glob("apps/*/app.yaml"))
    app.write_text(app.read_text() + "\nbogus_key: 1\n")
    bad = run()
    assert bad.returncode == 1 and f"{app.relative_to(state)}:" in bad.stdout, bad.stdout


def test_the_schemas_have_ids_for_editors():
    for name in ("app", "fleet"):
        schema = json.loads((Path(REPO_ROOT) / "schemas" / f"{name}.schema.json").read_text())
        assert schema["$id"].endswith(f"/schemas/{name}.schema.json")
        assert schema["$schema"].startswith("https://json-schema.org/")
