"""--verify-signatures with real gpg and ssh-keygen keys made in the test.

Only commits signed by a trusted key are applied; an unsigned or untrusted one is refused, shown in
status, and the last good revision keeps running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request

import pytest

from conftest import free_port, git, run_agent

pytestmark = pytest.mark.timeout(300)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=3) as resp:
        return resp.read().decode()


@pytest.fixture
def gpg_homes():
    """GNUPGHOMEs the test makes keys in; their gpg-agents (key generation starts one) are killed after."""
    homes: list = []
    yield homes
    for home in homes:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True, timeout=30)


def _gpg_key(home, name: str, homes: list) -> str:
    home.mkdir(mode=0o700)
    homes.append(home)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", f"{name} <{name}@example.invalid>",
                    "ed25519", "sign", "1d"], env=env, check=True, capture_output=True)
    out = subprocess.run(["gpg", "--batch", "--with-colons", "--list-secret-keys"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr"))


def _commit_signed_gpg(repo, home, fpr: str, message: str) -> str:
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(["git", "-c", f"user.signingkey={fpr}", "-c", "gpg.format=openpgp", "commit", "-q", "-S",
                    "--allow-empty", "-am", message], cwd=repo.path, env=env, check=True, capture_output=True)
    return git(repo.path, "rev-parse", "HEAD")


@pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed")
def test_openpgp_only_trusted_signed_commits_are_applied(tmp_path, state_repo, agent_root, gpg_homes):
    trusted_home, rogue_home = tmp_path / "gpg-trusted", tmp_path / "gpg-rogue"
    trusted, rogue = _gpg_key(trusted_home, "release", gpg_homes), _gpg_key(rogue_home, "mallory", gpg_homes)
    keyring = tmp_path / "trusted.asc"
    keyring.write_bytes(subprocess.run(["gpg", "--batch", "--armor", "--export", trusted], check=True, capture_output=True,
                                       env={**os.environ, "GNUPGHOME": str(trusted_home)}).stdout)
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port, "health": False}})
    git(state_repo.path, "add", "-A")
    good = _commit_signed_gpg(state_repo, trusted_home, trusted, "signed by release")
    args = ["--repo", state_repo.url, "--host", "h1", "--root", str(agent_root), "--verify-signatures",
            "--trusted-keys", str(keyring)]
    proc = run_agent("once", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"

    for label, make in (("untrusted", lambda: _commit_signed_gpg(state_repo, rogue_home, rogue, "rogue")),
                        ("unsigned", lambda: state_repo.commit("unsigned"))):
        state_repo.lock("apps/demo/demo.lock", "2.0.0")
        git(state_repo.path, "add", "-A")
        bad = make()
        proc = run_agent("once", *args)
        assert proc.returncode == 1, (label, proc.stdout)
        assert "refused" in proc.stderr, proc.stderr
        assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"
        status = json.loads(run_agent("status", "--json", "--root", str(agent_root)).stdout)
        assert status["applied"]["sha"] == good and status["attempted"]["sha"] == bad
        assert status["result"] == "invalid" and "refused" in status["last_error"]

    git(state_repo.path, "add", "-A")
    _commit_signed_gpg(state_repo, trusted_home, trusted, "signed again")
    assert run_agent("once", *args).returncode == 0
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 2.0.0\n"


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_ssh_signed_commits_with_allowed_signers(tmp_path, state_repo, agent_root):
    keys = {}
    for name in ("release", "rogue"):
        key = tmp_path / f"{name}_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
        keys[name] = key
    signers = tmp_path / "allowed_signers"
    signers.write_text(f"release@example.invalid {(tmp_path / 'release_ed25519.pub').read_text()}")
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port, "health": False}})
    git(state_repo.path, "add", "-A")

    def commit(key, message):
        subprocess.run(["git", "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-q", "-S",
                        "--allow-empty", "-am", message], cwd=state_repo.path, check=True, capture_output=True)
        return git(state_repo.path, "rev-parse", "HEAD")

    good = commit(keys["release"], "ssh signed")
    args = ["--repo", state_repo.url, "--host", "h1", "--root", str(agent_root), "--verify-signatures",
            "--allowed-signers", str(signers)]
    proc = run_agent("once", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    git(state_repo.path, "add", "-A")
    commit(keys["rogue"], "rogue ssh")
    proc = run_agent("once", *args)
    assert proc.returncode == 1 and "refused" in proc.stderr
    assert json.loads(run_agent("status", "--json", "--root", str(agent_root)).stdout)["applied"]["sha"] == good
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 1.0.0\n"


def test_require_fast_forward_refuses_history_rewrite(state_repo, agent_root):
    port = free_port()
    state_repo.app(services={"demo-web": {"port": port, "health": False}})
    first = state_repo.commit("first")
    state_repo.lock("apps/demo/demo.lock", "2.0.0")
    second = state_repo.commit("second")
    args = ["--repo", state_repo.url, "--host", "h1", "--root", str(agent_root)]
    assert run_agent("once", *args, "--require-fast-forward").returncode == 0
    git(state_repo.path, "reset", "-q", "--hard", first)
    state_repo.lock("apps/demo/demo.lock", "3.0.0")
    state_repo.commit("rewritten")
    proc = run_agent("once", *args, "--require-fast-forward")
    assert proc.returncode == 1 and "not a fast-forward" in proc.stderr
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 2.0.0\n"
    # without the flag, a force-push is followed
    assert run_agent("once", *args).returncode == 0
    assert get(f"http://127.0.0.1:{port}/") == "demoapp 3.0.0\n"
    assert second != first
