"""The secret env launcher: how a secret value reaches a service's process exactly (DESIGN §3a).

supervisord's `environment=` goes through configparser, `%` expansion and a non-POSIX lexer that
strips quotes (see `agent.core.render.supervisor`): some values cannot be written there at all, and a
secret must never depend on that chain. So secret values stay out of the program file: the program's
command becomes

    VENV/bin/python -I -S LAUNCHER ENVFILE VENV/bin/CMD ARGS...

LAUNCHER (`LAUNCHER_SOURCE`, written by the agent under its root) reads ENVFILE (mode 0600) as bytes,
adds its pairs to the environment and `execve`s CMD: the same pid, so supervisord's pid, its signals
and the agent's pid checks are the service's own. `-I` (isolated: no PYTHON* variables, no user site,
no script directory on sys.path) and `-S` (no site, so no `.pth` file of the venv runs) leave the
launcher nothing to import but the interpreter's own `os` and `sys`.

ENVFILE format (`encode_env`/`decode_env`, and the launcher's own reader): records `KEY=VALUE\\0`,
keys sorted and unique, UTF-8. Nothing is quoted or expanded: a value holds any text except NUL
(which no environment can hold). An empty file is no variables. A file that does not end in NUL is
truncated, hence corrupt: the launcher refuses it (exit 78, EX_CONFIG) rather than start the service
with part of its secrets.

The environment the program gets is the one supervisord gave the launcher, read back from
`/proc/self/environ` (not `os.environ`: Python's startup may add `LC_CTYPE=C.UTF-8` under the C
locale, PEP 538, which the service would not have had without the launcher), plus the pairs.

Pure: this module does no I/O; the driver writes the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agent.core.errors import Permanent
from agent.core.render.supervisor import ENV_KEY_RE, MARKER_KEY

__all__ = [
    "LAUNCHER_SOURCE",
    "EX_CONFIG",
    "EnvFileError",
    "encode_env",
    "decode_env",
    "launched_command",
    "RESERVED_PREFIX",
]

EX_CONFIG = 78          # sysexits.h: configuration error (the env file is unreadable or corrupt)
RESERVED_PREFIX = "SUPERVISOR_"     # supervisord's own variables: the driver finds processes by them


class EnvFileError(Permanent, ValueError):
    """Pairs that cannot be written to, or bytes that are not, a valid env file.

    The message names the key (or the record number) and the reason, never a value: values are secrets.
    """


def encode_env(pairs: Mapping[str, str]) -> bytes:
    """The env file for `pairs`: sorted `KEY=VALUE\\0` records, UTF-8. Equal pairs give equal bytes.

    Refused (EnvFileError): a key that is not a shell-style variable name, `GITOPS_AGENT_PROGRAM` or a
    `SUPERVISOR_*` name (the driver finds a program's processes by them), a value that is not a string,
    holds NUL, or cannot be UTF-8 (a lone surrogate).
    """
    records = []
    for key in sorted(pairs):
        _check_key(key)
        value = pairs[key]
        if not isinstance(value, str):
            raise EnvFileError(f"{key}: the value must be a string, not {type(value).__name__}")
        if "\0" in value:
            raise EnvFileError(f"{key}: the value holds a NUL character (no environment can hold one)")
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError:
            raise EnvFileError(f"{key}: the value is not encodable as UTF-8 (a lone surrogate)") from None
        records.append(key.encode("ascii") + b"=" + encoded + b"\0")
    return b"".join(records)


def decode_env(data: bytes) -> dict[str, str]:
    """The pairs of an env file; EnvFileError (naming the record, never its content) if it is not one
    `encode_env` could have written. The launcher applies the same rules to the same bytes."""
    if not isinstance(data, bytes):
        raise EnvFileError(f"an env file is bytes, not {type(data).__name__}")
    if not data:
        return {}
    if not data.endswith(b"\0"):
        raise EnvFileError("truncated: the last record is not ended by a NUL byte")
    out: dict[str, str] = {}
    previous = None
    for n, record in enumerate(data[:-1].split(b"\0"), 1):
        raw_key, sep, raw_value = record.partition(b"=")
        if not sep:
            raise EnvFileError(f"record {n}: no '='")
        try:
            key = raw_key.decode("ascii")
            _check_key(key)
        except (UnicodeDecodeError, EnvFileError):
            raise EnvFileError(f"record {n}: not a valid variable name") from None
        if previous is not None and key <= previous:
            raise EnvFileError(f"record {n}: names not sorted or given twice")
        try:
            out[key] = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            raise EnvFileError(f"record {n}: the value is not UTF-8") from None
        previous = key
    return out


def launched_command(python: str, launcher: str, envfile: str, command: Sequence[str]) -> tuple[str, ...]:
    """The argv supervisord runs so that `command` starts with the env file's pairs added.

    `python` is the service's venv interpreter (any Python 3.10+ works: the launcher needs only the
    standard library); every path must be absolute (supervisord and `execve` search no PATH here).
    """
    for field, path in (("python", python), ("launcher", launcher), ("envfile", envfile)):
        if not isinstance(path, str) or not path.startswith("/"):
            raise EnvFileError(f"{field}: {path!r} must be an absolute path")
    argv = tuple(command)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise EnvFileError("command: must be a non-empty sequence of strings")
    if not argv[0].startswith("/"):
        raise EnvFileError(f"command[0]: {argv[0]!r} must be an absolute path")
    return (python, "-I", "-S", launcher, envfile, *argv)


def _check_key(key: object) -> None:
    if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key):
        raise EnvFileError(f"{key!r} is not a variable name ({ENV_KEY_RE.pattern})")
    if key == MARKER_KEY or key.startswith(RESERVED_PREFIX):
        raise EnvFileError(f"{key}: reserved (gitops-agent and supervisord set it)")


# The launcher itself. Only `os` and `sys`; it must run under any Python 3.10+ the services use,
# started with -I -S. Exit codes: 64 usage, 78 env file unreadable or corrupt, 126/127 cannot execute.
LAUNCHER_SOURCE = r'''"""gitops-agent secret env launcher (written by gitops-agent; edits are overwritten).

Usage: python -I -S launcher.py ENVFILE PROGRAM [ARGS...]

Adds the KEY=VALUE pairs of ENVFILE (records ended by NUL, names sorted, UTF-8) to the environment
and executes PROGRAM in this same process. Values are never parsed, split or expanded.
"""

import os
import sys

EX_USAGE = 64
EX_CONFIG = 78
NAME_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
NAME_CHARS = NAME_START | frozenset(b"0123456789")
RESERVED = (b"GITOPS_AGENT_PROGRAM",)
RESERVED_PREFIX = b"SUPERVISOR_"


def fail(code, message):
    os.write(2, b"gitops-agent launcher: " + message + b"\n")
    os._exit(code)


def parse(data):
    """[(name, value)] of an env file, or ValueError saying what is wrong (never the content)."""
    if not data:
        return []
    if not data.endswith(b"\0"):
        raise ValueError("truncated: the last record is not ended by a NUL byte")
    pairs = []
    previous = None
    for n, record in enumerate(data[:-1].split(b"\0"), 1):
        name, sep, value = record.partition(b"=")
        if not sep:
            raise ValueError("record %d: no '='" % n)
        if (not name or name[0] not in NAME_START or not all(c in NAME_CHARS for c in name)
                or name in RESERVED or name.startswith(RESERVED_PREFIX)):
            raise ValueError("record %d: not a valid variable name" % n)
        if previous is not None and name <= previous:
            raise ValueError("record %d: names not sorted or given twice" % n)
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("record %d: the value is not UTF-8" % n) from None
        pairs.append((name, value))
        previous = name
    return pairs


def inherited():
    """The environment as supervisord passed it (Python's startup may have added LC_CTYPE since)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return dict(os.environb)
    env = {}
    for entry in raw.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name and name not in env:
            env[name] = value
    return env


def main():
    argv = [os.fsencode(a) for a in sys.argv]
    if len(argv) < 3:
        fail(EX_USAGE, b"usage: launcher ENVFILE PROGRAM [ARGS...]")
    path, program = argv[1], argv[2:]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        fail(EX_CONFIG, b"cannot read environment file " + path + b": " + os.fsencode(err.strerror or str(err)))
    try:
        pairs = parse(data)
    except ValueError as err:
        fail(EX_CONFIG, b"environment file " + path + b" is corrupt: " + str(err).encode())
    env = inherited()
    env.update(pairs)
    try:
        os.execve(program[0], program, env)
    except OSError as err:
        code = 127 if isinstance(err, FileNotFoundError) else 126
        fail(code, b"cannot execute " + program[0] + b": " + os.fsencode(err.strerror or str(err)))


main()
'''
