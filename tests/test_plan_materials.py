"""The planner with secrets, files, jobs and depends_on (DESIGN §3a): pure, on the bundled example's shop app
loaded by the real loader, with secret values handed in (no age, no host).

Facts are simulated as "what the last apply wrote" by applying the plan's writes to a Facts value, so each
case starts from a converged host and changes one input.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from agent.core.facts import Facts, ProgramFact, VenvFact, text_digest
from agent.core.layout import Layout
from agent.core.load import LoadOptions, load_desired
from agent.core.materials import materialize
from agent.core.actions import (
    CheckHealth, EnsureDataDir, PruneFiles, RunJob, SwitchVenv, UpdateProgram, WriteFile, WriteProgram,
    WriteSecretEnv,
)
from agent.core.plan import PlanOptions, make_plan

EXAMPLE = Path(__file__).resolve().parent.parent / "desired-state-example"
LAYOUT = Layout(Path("/srv/agent"))
OPTS = PlanOptions(LAYOUT)
KEY = b"k" * 32
SECRET = 'p%a,s"s= w\'rd %(here)s ;#x'
SECRETS = {"shop": {"django": {"SECRET_KEY": SECRET, "ORDERS_API_TOKEN": "tok-1234567890"}}}


@pytest.fixture(scope="module")
def shop():
    full = load_desired(EXAMPLE, "localhost", LoadOptions(default_installer="uv"))
    return full.with_apps(tuple(a for a in full.apps if a.name == "shop"))


def converged(desired, secrets=SECRETS) -> Facts:
    """The facts of a host on which the plan for `desired` was applied completely."""
    materials = materialize(desired, LAYOUT, secrets, KEY)
    plan = make_plan(desired, Facts("running"), OPTS, materials)
    files, links, jobs, dirs, programs = {}, {}, {}, set(), {}
    for a in plan.actions:
        if isinstance(a, WriteFile):
            files[a.path] = a.digest
            links[a.link] = str(Path(a.path).relative_to(Path(a.link).parent))
        elif isinstance(a, WriteSecretEnv):
            files[a.path] = materials.digest(a.data)
        elif isinstance(a, RunJob):
            jobs[f"{a.app}/{a.name}"] = a.inputs
        elif isinstance(a, EnsureDataDir):
            dirs.add(a.path)
        elif isinstance(a, WriteProgram):
            programs[a.name] = ProgramFact(a.name, a.text, "RUNNING", 100 + len(programs), verified=text_digest(a.text))
        elif a.kind == "write_launcher":
            files[a.path] = materials.digest(a.text.encode())
    venvs = {e.name: VenvFact(e.name, e.identity, (e.identity,), (), e.requirements)
             for e in desired.environments.values()}
    return Facts("running", venvs, programs, files=files, links=links, jobs=jobs, data_dirs=frozenset(dirs))


def plan_for(desired, facts, secrets=SECRETS):
    return make_plan(desired, facts, OPTS, materialize(desired, LAYOUT, secrets, KEY))


def test_first_apply_order_and_needs(shop):
    plan = plan_for(shop, Facts("running"))
    keys = [a.key for a in plan.actions]
    job = keys.index("job:shop/migrate")
    # files and secret env before the job; the job before the venv switch and before any service
    assert keys.index("file:shop/settings.toml") < job and keys.index("secretenv:shop-web") < job
    assert job < keys.index("venv:main", job) and job < keys.index("program:shop-web")
    switch = next(a for a in plan.actions if isinstance(a, SwitchVenv))
    assert "job:shop/migrate" in switch.needs
    # the worker depends on the web: after its health gate, and it needs it
    web_gate = next(i for i, a in enumerate(plan.actions) if isinstance(a, CheckHealth) and a.name == "shop-web")
    worker = next(a for a in plan.actions if isinstance(a, UpdateProgram) and a.name == "shop-worker")
    assert plan.actions.index(worker) > web_gate
    assert {"program:shop-web", "job:shop/migrate", "file:shop/settings.toml", "secretenv:shop-worker"} <= set(worker.needs)


def test_no_secret_value_in_plan_text_json_or_program_files(shop):
    plan = plan_for(shop, Facts("running"))
    shown = plan.render() + json.dumps(plan.to_json())
    assert SECRET not in shown and "tok-1234567890" not in shown
    for a in plan.actions:
        if isinstance(a, WriteProgram):
            assert SECRET not in a.text and "secret django/SECRET_KEY=" in a.text
            assert "gitops-agent-exec" in a.text        # through the launcher, not environment=
        if isinstance(a, (WriteSecretEnv, RunJob)):
            assert SECRET not in repr(a)


def test_converged_host_plans_nothing_and_runs_no_job(shop):
    assert plan_for(shop, converged(shop)).converged


def test_secret_change_restarts_exactly_its_users_and_says_which(shop):
    facts = converged(shop)
    changed = {"shop": {"django": {**SECRETS["shop"]["django"], "ORDERS_API_TOKEN": "tok-NEW-0987654321"}}}
    plan = plan_for(shop, facts, changed)
    writes = {a.name: a.reason for a in plan.actions if isinstance(a, WriteProgram)}
    # ORDERS_API_TOKEN is used by the settings template only: the file changes, so both services that read it
    assert set(writes) == {"shop-web", "shop-worker"}
    assert all("file settings.toml changed" in r for r in writes.values())
    assert all("tok-NEW" not in a.reason for a in plan.actions)
    key_change = {"shop": {"django": {**SECRETS["shop"]["django"], "SECRET_KEY": "another-value-entirely"}}}
    plan = plan_for(shop, facts, key_change)
    reasons = [a.reason for a in plan.actions if isinstance(a, WriteProgram)]
    assert reasons and all("secret django/SECRET_KEY changed" in r for r in reasons)
    # the migration uses SECRET_KEY too: it runs again, before the restarts
    assert any(isinstance(a, RunJob) for a in plan.actions)


def test_a_file_used_only_by_a_job_restarts_nothing(shop):
    app = shop.apps[0]
    job = dataclasses.replace(app.jobs[0], env=app.jobs[0].env + (("EXTRA", __import__("agent.core.model", fromlist=["FileRef"]).FileRef("robots.txt")),))
    base = shop.with_apps((dataclasses.replace(app, jobs=(job,)),))
    facts = converged(base)
    robots = dataclasses.replace(next(f for f in app.files if f.name == "robots.txt"), source=b"User-agent: *\n")
    changed = base.with_apps((dataclasses.replace(base.apps[0], files=tuple(
        robots if f.name == "robots.txt" else f for f in app.files)),))
    plan = plan_for(changed, facts)
    kinds = {a.kind for a in plan.actions}
    assert "run_job" in kinds and "write_file" in kinds
    assert not any(isinstance(a, (WriteProgram, UpdateProgram)) for a in plan.actions)


def test_hand_edited_file_is_drift_and_old_versions_are_pruned(shop):
    facts = converged(shop)
    path = next(p for p in facts.files if p.endswith("settings.toml"))
    edited = dataclasses.replace(facts, files={**facts.files, path: "0" * 20})
    plan = plan_for(shop, edited)
    assert [a.kind for a in plan.actions] == ["write_file"]
    assert "differs on disk" in plan.actions[0].reason
    stale = str(LAYOUT.file_version("shop", "f" * 20, "settings.toml"))
    plan = plan_for(shop, dataclasses.replace(facts, files={**facts.files, stale: "f" * 20}))
    prune = [a for a in plan.actions if isinstance(a, PruneFiles)]
    assert len(prune) == 1 and prune[0].paths == (stale,)


def test_an_app_that_leaves_deletes_its_files_and_secret_env_but_not_its_data(shop):
    facts = converged(shop)
    empty = shop.with_apps(())
    plan = make_plan(empty, facts, OPTS)
    prune = [a for a in plan.actions if isinstance(a, PruneFiles)]
    assert prune and all("/data" not in p for a in prune for p in a.paths)
    assert any(p.endswith(".env") for a in prune for p in a.paths)
    removed = [a.name for a in plan.actions if a.kind == "remove_program"]
    assert removed.index("shop-worker") < removed.index("shop-web")      # the dependent goes first
