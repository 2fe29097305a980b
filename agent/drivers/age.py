"""Decrypt secret files with the stock `age` CLI (DESIGN §3a "Secrets"; Debian package `age`).

Why the CLI: users encrypt with `age`/`rage` to each host's recipient, and the agent decrypts with the
same well-reviewed implementation instead of a second one in Python. Why this shape:

- The ciphertext goes in on stdin and the plaintext comes back on stdout: the plaintext is never in a
  file, an argv or a log. Only identity *paths* are on the command line.
- age runs in a new session (no controlling terminal), so an identity or file that would ask for a
  passphrase fails instead of waiting on the agent's terminal, with a small environment (PATH for
  age plugins, HOME, LC_ALL=C for stable messages).
- On failure whatever age wrote to stdout is dropped (age streams: a file tampered in its last chunk
  has already produced its first chunks). age's message is quoted only after every `"..."` in it
  that is not an identity path is cut out (age quotes the first line of a file it cannot parse,
  which is plaintext when someone committed the file unencrypted), and after checking it holds no
  line of that partial output; it is capped at 300 characters.
- A file that is not age-encrypted is refused before age sees it, with a message that says so.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from agent.core.errors import ConfigError, Permanent, Temporary

__all__ = ["AgeMissing", "AgeTimeout", "SecretUndecryptable", "decrypt", "public_recipient"]

log = logging.getLogger(__name__)

_BINARY_HEADER = b"age-encryption.org/v1\n"
_ARMOR_HEADER = b"-----BEGIN AGE ENCRYPTED FILE-----"
_MAX_REASON = 300
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_NO_IDENTITY_HELP = "pass --age-identity FILE (or set GITOPS_AGENT_AGE_IDENTITY) with this host's age identity"


class AgeMissing(Permanent):
    """The `age` (or `age-keygen`) program is not installed."""


class SecretUndecryptable(Permanent, ValueError):
    """A secret file cannot be decrypted on this host. `what` names the file (e.g.
    `apps/shop/django.env.age`), `reason` says why; neither holds plaintext."""

    def __init__(self, what: str, reason: str):
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: cannot decrypt: {reason}")


class AgeTimeout(Temporary):
    """age did not finish in time (a host too busy): a retry may pass."""


def _program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise AgeMissing(f"the {name!r} program is not on PATH: install the age package "
                         f"(Debian/Ubuntu: apt-get install age)")
    return found


def _environment() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    return env


def _path_arg(path: Path) -> str:
    text = str(path)
    return f"./{text}" if text.startswith("-") else text


def _check_identity(identity: Path, what: str) -> None:
    """Open each identity ourselves first: a clear reason naming the file, whatever age would say."""
    try:
        with open(identity, "rb"):
            pass
    except IsADirectoryError:
        raise SecretUndecryptable(what, f"identity file {str(identity)!r} is a directory") from None
    except OSError as e:
        raise SecretUndecryptable(what, f"identity file {str(identity)!r} cannot be read: "
                                        f"{e.strerror or type(e).__name__}") from None


def _age_message(stderr: bytes, identities: Sequence[Path], partial: bytes) -> str:
    """age's own reason, safe to show: its `age: error:` lines, quotes cut unless they are an identity
    path, withheld if it holds a line of the partial plaintext, capped."""
    text = stderr.decode("utf-8", "replace")
    lines = [ln[len("age: error: "):] for ln in text.splitlines() if ln.startswith("age: error: ")]
    message = "; ".join(lines) if lines else " ".join(text.split())
    paths = {str(p) for p in identities} | {_path_arg(p) for p in identities}

    def keep_paths(m: re.Match[str]) -> str:
        return m.group(0) if m.group(0)[1:-1] in paths else '"..."'

    message = _QUOTED.sub(keep_paths, message)
    for line in partial.decode("utf-8", "replace").splitlines():
        if len(line.strip()) >= 4 and line.strip() in message:
            return "(age's message is withheld: it could hold plaintext)"
    if len(message) > _MAX_REASON:
        message = message[: _MAX_REASON - 3] + "..."
    return message


def _explain(message: str) -> str:
    """The person's next step, from age's reason."""
    if "no identity matched" in message:
        return ("this host's identity is not a recipient of the file: re-encrypt it with "
                "`age -r <recipient>` for this host too (`age-keygen -y IDENTITY_FILE` prints the recipient)")
    if "unknown identity type" in message or "secret keys file" in message or "reading \"" in message:
        return "an identity file is not a usable age identity"
    if "passphrase" in message:
        return "the file or an identity needs a passphrase, which the agent cannot type: use an unencrypted identity"
    if "authenticate" in message or "header" in message or "EOF" in message or "armor" in message:
        return "the file is damaged: changed or truncated after it was encrypted"
    return "age refused it"


def decrypt(ciphertext: bytes, identities: Sequence[Path], what: str, timeout_s: float = 30) -> bytes:
    """The plaintext of an age file (armored or binary), decrypted with any of `identities`.

    `what` names the file in errors. Raises SecretUndecryptable (no identity configured, not a
    recipient, damaged, unreadable identity, not an age file), AgeMissing, AgeTimeout."""
    identities = [Path(p) for p in identities]
    if not identities:
        raise SecretUndecryptable(what, f"no age identity is configured on this host: {_NO_IDENTITY_HELP}")
    data = bytes(ciphertext)
    stripped = data.lstrip()
    if stripped.startswith(_ARMOR_HEADER):
        data = stripped     # age wants the armor at the very start; an editor's leading newline is harmless
    elif not data.startswith(_BINARY_HEADER):
        raise SecretUndecryptable(what, "not an age-encrypted file (it starts neither with 'age-encryption.org/v1' "
                                        "nor with '-----BEGIN AGE ENCRYPTED FILE-----'): was it committed "
                                        "unencrypted? Encrypt it with `age -a -r RECIPIENT`")
    for identity in identities:
        _check_identity(identity, what)
    argv = [_program("age"), "--decrypt"]
    for identity in identities:
        argv += ["-i", _path_arg(identity)]
    log.debug("decrypting %s with %d identities", what, len(identities))
    try:
        done = subprocess.run(argv, input=data, capture_output=True, timeout=timeout_s, env=_environment(),
                              start_new_session=True, check=False)
    except subprocess.TimeoutExpired:
        raise AgeTimeout(f"{what}: age did not finish decrypting within {timeout_s:g} s") from None
    if done.returncode != 0:
        message = _age_message(done.stderr, identities, done.stdout)
        del done   # the partial plaintext goes with it
        raise SecretUndecryptable(what, f"{_explain(message)} (age: {message})")
    return done.stdout


def public_recipient(identity: Path) -> str:
    """The recipient (`age1...`) of an identity file, from `age-keygen -y`: what a host's secrets are
    encrypted to. One line per identity when the file holds several."""
    argv = [_program("age-keygen"), "-y", _path_arg(identity)]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=30, env=_environment(),
                              start_new_session=True, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise AgeTimeout(f"age-keygen -y {identity} did not finish within 30 s") from None
    if done.returncode != 0:
        message = _age_message(done.stderr.replace(b"age-keygen: error: ", b"age: error: "), [identity], b"")
        raise ConfigError(f"{identity}: not a usable age identity file ({message})")
    return done.stdout.decode("ascii").strip()
