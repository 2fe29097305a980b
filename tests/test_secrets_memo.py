"""A no-op `once` plans from sealed materials (agent.core.materials, agent.drivers.materials_memo): it does not
run `age` nor render templates, and anything that changed still decrypts and renders for real.

`age` is probed, not faked: a wrapper named `age` first on PATH appends its argv to a log and execs the real
binary, so the agent's decryptions still happen, and are counted. The host is test_secrets_e2e's (real age,
git, supervisord, uv): a secret used by two services, a job and a template.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from shopfactory import new_identity
from test_secrets_e2e import ROTATED, Host, deployed, leaks

from agent.core.layout import Layout
from agent.core.load import LoadOptions, load_desired
from agent.core.materials import Sealed, SealedMiss, materialize, seal
from agent.core.actions import WriteFile
from agent.core.plan import PlanOptions, make_plan

pytestmark = pytest.mark.timeout(600)

EXAMPLE = REPO_ROOT / "desired-state-example"
KEY = b"k" * 32            # test_plan_materials' key: its `converged` facts are digested with it
VALUES = {"SECRET_KEY": "s3cr3t-value-Aq9", "ORDERS_API_TOKEN": "tok-Zx81-value"}


# -- pure: sealed materials give the same digests as the real ones -------------------------------------------

@pytest.fixture(scope="module")
def shop():
    full = load_desired(EXAMPLE, "localhost", LoadOptions(default_installer="uv"))
    return full.with_apps(tuple(a for a in full.apps if a.name == "shop"))


def _sealed(desired, values=VALUES, memo=None):
    layout = Layout(Path("/srv/agent"))
    real = materialize(desired, layout, {"shop": {"django": values}}, KEY)
    sealed = materialize(desired, layout, {"shop": {"django": seal(VALUES, KEY)}}, KEY,
                         memo=real.memo if memo is None else memo)
    return real, sealed


def test_sealed_materials_have_the_real_digests_and_paths_and_no_value(shop):
    real, sealed = _sealed(shop)
    assert sealed.sealed and not real.sealed
    assert {k: (f.digest, f.path, f.link, f.mode) for k, f in sealed.files.items()} == \
           {k: (f.digest, f.path, f.link, f.mode) for k, f in real.files.items()}
    templates = {("shop", f.name) for a in shop.apps for f in a.files if f.template is not None}
    assert templates and all(sealed.files[k].data == b"" for k in templates)   # not rendered
    assert all(sealed.files[k].data == real.files[k].data for k in set(real.files) - templates)   # copied bytes
    for name, env in real.services.items():
        got = sealed.services[name]
        assert (got.plain, got.inputs, got.secret_file, got.secret_digest, got.needs) == \
               (env.plain, env.inputs, env.secret_file, env.secret_digest, env.needs)
        assert got.secret == ()
    assert sealed.job_inputs == real.job_inputs
    assert sealed.secret_values == () and sealed.index_passwords == {}
    # what is remembered holds no value
    text = json.dumps([real.memo, dict(seal(VALUES, KEY).digests)])
    assert not leaks(text, VALUES.values())


def test_a_changed_value_or_context_is_not_in_the_memo(shop):
    layout = Layout(Path("/srv/agent"))
    real = materialize(shop, layout, {"shop": {"django": VALUES}}, KEY)
    changed = seal({**VALUES, "ORDERS_API_TOKEN": "another-token"}, KEY)
    with pytest.raises(SealedMiss):
        materialize(shop, layout, {"shop": {"django": changed}}, KEY, memo=real.memo)
    other_host = dataclasses.replace(shop, host="web-9")
    with pytest.raises(SealedMiss):
        materialize(other_host, layout, {"shop": {"django": seal(VALUES, KEY)}}, KEY, memo=real.memo)
    with pytest.raises(ValueError):
        materialize(shop, layout, {"shop": {"django": Sealed({})}}, KEY)      # sealed needs a memo


def test_a_sealed_plan_of_a_converged_host_is_empty_and_of_a_drifted_one_names_the_action(shop):
    from test_plan_materials import converged

    real, sealed = _sealed(shop)
    facts = converged(shop, {"shop": {"django": VALUES}})
    opts = PlanOptions(Layout(Path("/srv/agent")))
    assert not make_plan(shop, facts, opts, sealed).actions and not make_plan(shop, facts, opts, real).actions
    path = str(real.files[("shop", "settings.toml")].path)
    drifted = dataclasses.replace(facts, files={k: v for k, v in facts.files.items() if k != path})
    sealed_plan, real_plan = make_plan(shop, drifted, opts, sealed), make_plan(shop, drifted, opts, real)
    assert [a.key for a in sealed_plan.actions] == [a.key for a in real_plan.actions]
    assert any(isinstance(a, WriteFile) for a in sealed_plan.actions)


# -- end to end, `age` probed ----------------------------------------------------------------------------------

class AgeProbe:
    """`age` first on PATH: logs each call's argv (paths and flags only: the plaintext is on stdin/stdout),
    then execs the real age."""

    def __init__(self, base: Path):
        real = shutil.which("age")
        assert real, "the age CLI is needed"
        self.bin = base / "probe-bin"
        self.bin.mkdir()
        self.log = base / "age-calls.log"
        script = self.bin / "age"
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{self.log}"\nexec "{real}" "$@"\n')
        script.chmod(0o755)

    def calls(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0

    def once(self, host: Host, *extra: str, expect: int = 0) -> tuple[subprocess.CompletedProcess, int]:
        """`once` with the probe on PATH; (its result, how many times it ran age)."""
        before = self.calls()
        env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        proc = subprocess.run([sys.executable, "-m", "agent.cli", "once", *host.args(*extra)], capture_output=True,
                              text=True, timeout=300, cwd=REPO_ROOT, env=env, check=False)
        assert proc.returncode == expect, f"once exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc, self.calls() - before


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    base = tmp_path_factory.mktemp("memo")
    with deployed(base) as h:
        yield h, AgeProbe(base)


def test_a_no_op_once_does_not_run_age(probed):
    host, age = probed
    proc, calls = age.once(host)
    assert "result: converged" in proc.stdout, proc.stdout
    assert calls == 0
    memo = host.root / "state/materials.memo"
    assert stat.S_IMODE(memo.stat().st_mode) == 0o600
    assert not leaks(memo.read_bytes(), host.secrets())
    assert not leaks(memo.read_bytes(), host.values.values())


def test_a_drift_that_needs_a_value_decrypts_and_heals_with_the_real_content(probed):
    host, age = probed
    link = host.root / "apps/shop/files/settings.toml"
    good = link.read_bytes()
    link.resolve().unlink()
    secret_env = min((host.root / "apps/shop/env").glob("*.env"))
    env_text = secret_env.read_bytes()
    secret_env.unlink()
    proc, calls = age.once(host)
    assert calls == 1, proc.stdout
    assert link.read_bytes() == good and secret_env.read_bytes() == env_text
    assert age.once(host)[1] == 0


def test_a_changed_ciphertext_decrypts_again(probed):
    host, age = probed
    host.encrypt(dict(host.values))            # the same values, a new ciphertext
    host.repo.commit("re-encrypt, same values")
    before = host.pids()
    proc, calls = age.once(host)
    assert calls == 1 and "result: converged" in proc.stdout, proc.stdout
    assert host.pids() == before               # same values: nothing restarts
    assert age.once(host)[1] == 0


def test_a_changed_identity_file_decrypts_again(probed):
    host, age = probed
    original = host.identity.read_bytes()
    try:
        host.identity.write_bytes(original + b"# the same key, one more line\n")
        os.utime(host.identity, ns=(0, 0))     # even an mtime that says nothing changed
        proc, calls = age.once(host)
        assert calls == 1 and "result: converged" in proc.stdout, proc.stdout
        assert age.once(host)[1] == 0
        # a key that is not a recipient: the memo of the old key must not stand in for it
        stranger = new_identity(host.base / "other-keys", "stranger")
        host.identity.write_bytes(stranger.read_bytes())
        proc, calls = age.once(host, expect=1)
        assert calls >= 1 and "cannot be decrypted" in proc.stdout + proc.stderr, proc.stdout
    finally:
        host.identity.write_bytes(original)
    assert age.once(host)[1] == 1


def test_a_new_value_restarts_its_users_and_runs_age_once(probed):
    host, age = probed
    before = host.pids()
    host.encrypt({**host.values, "SECRET_KEY": ROTATED})
    host.repo.commit("rotate SECRET_KEY")
    proc, calls = age.once(host)
    assert calls == 1, proc.stdout
    after = host.pids()
    assert after["web-a"] != before["web-a"] and after["web-c"] == before["web-c"]
    assert host.env_of("web-a")["env"]["SECRET_KEY"] == ROTATED
    assert age.once(host)[1] == 0


def test_a_memo_that_is_not_private_is_ignored(probed):
    host, age = probed
    memo = host.root / "state/materials.memo"
    memo.chmod(0o644)
    assert age.once(host)[1] == 1
    assert stat.S_IMODE(memo.stat().st_mode) == 0o600     # written anew
    memo.write_text("{not json")
    memo.chmod(0o600)
    assert age.once(host)[1] == 1
    assert age.once(host)[1] == 0
