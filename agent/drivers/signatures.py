"""Signed-commit verification with git's own `verify-commit` (OpenPGP via gpg, SSH via ssh-keygen).

Trust is exactly the keys the agent's config names: an OpenPGP keyring file imported into a private
GNUPGHOME under the agent root, and/or an SSH allowed-signers file. The user's own keyrings are never
consulted, so a key someone added to root's ~/.gnupg does not become trusted by accident.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from agent.core.errors import ConfigError, Permanent

__all__ = ["SignatureRefused", "SignatureVerifier"]


class SignatureRefused(Permanent):
    """The commit is unsigned, or signed by a key that is not trusted: it must not be applied."""


class SignatureVerifier:
    def __init__(self, root: Path, keyring: str | None = None, allowed_signers: str | None = None):
        if not keyring and not allowed_signers:
            raise ConfigError("--verify-signatures needs --trusted-keys (OpenPGP keyring) and/or --allowed-signers (SSH)")
        self.keyring = Path(keyring) if keyring else None
        self.allowed_signers = Path(allowed_signers) if allowed_signers else None
        self.gnupghome = Path(root) / "gnupg"
        for path in filter(None, (self.keyring, self.allowed_signers)):
            if not path.is_file():
                raise ConfigError(f"trusted key file {path} does not exist")
        self._verified: set[str] = set()

    def _prepare_gnupg(self) -> dict[str, str]:
        """A private GNUPGHOME holding only the configured keyring (re-imported when the file changes)."""
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GNUPGHOME": str(self.gnupghome)}
        digest = None if self.keyring is None else hashlib.sha256(self.keyring.read_bytes()).hexdigest()
        stamp = self.gnupghome / ".imported"
        stale = digest is not None and (not stamp.exists() or stamp.read_text() != digest)
        if stale and self.gnupghome.exists():
            import shutil

            shutil.rmtree(self.gnupghome)
        self.gnupghome.mkdir(mode=0o700, parents=True, exist_ok=True)
        _no_agent(self.gnupghome)       # before gpg runs; also for a home imported before gpg.conf existed
        if stale:
            proc = subprocess.run(["gpg", "--batch", "--quiet", "--import", str(self.keyring)],
                                  env=env, capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                raise ConfigError(f"cannot import trusted keys from {self.keyring}: {proc.stderr.strip()[-300:]}")
            stamp.write_text(digest)
        return env

    def verify(self, git_dir: Path, sha: str) -> str:
        """Return who signed `sha`; raise SignatureRefused if the signature is missing or untrusted."""
        if sha in self._verified:
            return "verified"
        env = self._prepare_gnupg()
        cmd = ["git", "--git-dir", str(git_dir)]
        if self.allowed_signers:
            cmd += ["-c", f"gpg.ssh.allowedSignersFile={self.allowed_signers}"]
        proc = subprocess.run([*cmd, "verify-commit", "--raw", sha], env=env, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        out = (proc.stderr or "") + (proc.stdout or "")
        if proc.returncode != 0:
            reason = "the commit is not signed" if not out.strip() else _first_reason(out)
            raise SignatureRefused(f"commit {sha[:12]} refused: {reason}")
        self._verified.add(sha)
        return _signer(out)


def _first_reason(out: str) -> str:
    for marker in ("NO_PUBKEY", "BADSIG", "ERRSIG", "EXPKEYSIG", "REVKEYSIG"):
        if marker in out:
            return {"NO_PUBKEY": "signed by a key that is not trusted", "BADSIG": "bad signature",
                    "ERRSIG": "signature cannot be checked (key not trusted?)",
                    "EXPKEYSIG": "signed by an expired key", "REVKEYSIG": "signed by a revoked key"}[marker]
    lines = [l for l in out.strip().splitlines() if l.strip() and not l.startswith("[GNUPG:]")]
    return (lines[-1] if lines else out.strip())[:300]


def _signer(out: str) -> str:
    for line in out.splitlines():
        if "GOODSIG" in line:
            return line.split("GOODSIG", 1)[1].strip()
        if line.startswith("Good \"git\" signature for"):
            return line.split("for", 1)[1].strip()
    return "verified"


def _no_agent(gnupghome: Path) -> None:
    """Importing public keys and verifying need no gpg-agent; without this, gpg starts one per root
    that outlives the agent (and a rmtree of the home under it)."""
    conf = gnupghome / "gpg.conf"
    if not conf.exists():
        conf.write_text("no-autostart\n")
