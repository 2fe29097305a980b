"""A remote host over the stock OpenSSH client: run a command, write a file. Nothing else.

Why the `ssh` binary and not a Python SSH library: it is what the user already trusts and configures (keys,
ssh-agent, `~/.ssh/config`, `known_hosts`, jump hosts, certificates), and its host-key checking is the
real one. One master connection is shared by every command (ControlMaster, socket in a private temp dir),
so a bootstrap of ~20 commands authenticates once.

- Host keys: `StrictHostKeyChecking=yes` (an unknown or changed key is refused), or `accept-new` when
  the user says so; never `no`.
- `BatchMode=yes`: no password or passphrase prompt can hang a run; passwords are never on an argv.
- Commands are argv lists, quoted with `shlex` into the one string ssh hands the remote login shell, and
  run under `/bin/sh -c` there. File contents travel on stdin, never in an argv: `put` creates the file
  under `umask 077`, so a secret is never readable by others, not even between create and chmod.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from agent.core._record import record
from agent.core.errors import Permanent, Temporary

__all__ = ["SshAddress", "SshTarget", "SshError", "HostKeyError", "AuthError", "ConnectError", "RemoteError"]


class SshError(Exception):
    """ssh itself failed (exit 255): the connection, not the remote command."""


class HostKeyError(SshError, Permanent):
    """The host's key is not in known_hosts (or differs from it): a person must check it."""


class AuthError(SshError, Permanent):
    """The host refused every key offered."""


class ConnectError(SshError, Temporary):
    """No SSH connection (refused, unreachable, unknown name, timed out)."""


class RemoteError(Exception):
    """The remote command ran and failed; carries its exit code and the tail of its stderr."""

    def __init__(self, what: str, code: int, stderr: str):
        self.code = code
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-12:]
        super().__init__(f"{what} failed (exit {code})" + ("".join(f"\n  {line}" for line in tail) if tail else ""))


@record
class SshAddress:
    user: str | None
    host: str
    port: int | None

    @classmethod
    def parse(cls, url: str) -> "SshAddress":
        """ssh://USER@HOST[:PORT] (also ssh://HOST, ssh://USER@[v6addr]:PORT)."""
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/") or parts.query or port == -1 \
                or parts.password is not None:
            raise ValueError(f"{url!r} is not ssh://USER@HOST[:PORT] (no password, no path)")
        return cls(parts.username or None, parts.hostname, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}{':' + str(self.port) if self.port else ''}"


class SshTarget:
    """Commands on one host through one shared OpenSSH connection. Use as a context manager (`close`
    ends the master connection and removes its socket directory)."""

    def __init__(self, address: SshAddress, *, identity: Path | None = None, ssh_config: Path | None = None,
                 accept_new_host_key: bool = False, connect_timeout: int = 20, ssh: str = "ssh"):
        self.address = address
        self.ssh = shutil.which(ssh) or ssh
        self._dir = tempfile.mkdtemp(prefix="gitops-agent-ssh-")
        opts = ["-o", "BatchMode=yes",
                "-o", f"StrictHostKeyChecking={'accept-new' if accept_new_host_key else 'yes'}",
                "-o", "ControlMaster=auto", "-o", f"ControlPath={self._dir}/%C", "-o", "ControlPersist=120",
                "-o", f"ConnectTimeout={connect_timeout}", "-o", "ServerAliveInterval=15",
                "-o", "LogLevel=ERROR"]
        if ssh_config is not None:
            opts[:0] = ["-F", str(ssh_config)]
        if identity is not None:
            opts += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
        if address.port:
            opts += ["-p", str(address.port)]
        if address.user:
            opts += ["-l", address.user]
        self._opts = opts

    def __enter__(self) -> "SshTarget":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run([self.ssh, *self._opts, "-O", "exit", "--", self.address.host],
                       capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        shutil.rmtree(self._dir, ignore_errors=True)

    def run(self, argv: list[str], *, what: str, stdin: bytes | None = None, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """Run argv on the host. ssh failures raise SshError subclasses; with `check`, a remote failure
        raises RemoteError naming `what`."""
        command = shlex.join(argv)
        try:
            proc = subprocess.run([self.ssh, *self._opts, "--", self.address.host, command],
                                  input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ConnectError(f"{what}: no answer from {self.address} within {timeout:g}s") from None
        if proc.returncode == 255:
            raise _ssh_error(self.address, proc.stderr.decode(errors="replace"))
        if check and proc.returncode != 0:
            # Tools that report errors on stdout (supervisorctl) say nothing on stderr: show what they said.
            said = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace")
            raise RemoteError(what, proc.returncode, said)
        return proc

    def sh(self, script: str, *args: str, what: str, stdin: bytes | None = None, check: bool = True,
           timeout: float = 600) -> str:
        """Run a POSIX sh script with positional args ($1...); its stdout as text."""
        return self.run(["/bin/sh", "-c", script, "sh", *args], what=what, stdin=stdin, check=check,
                        timeout=timeout).stdout.decode(errors="replace")

    def put(self, path: str, data: bytes, mode: int, *, what: str) -> None:
        """Write `data` to `path` atomically (temp file + rename) with `mode`, created under umask 077."""
        self.sh('umask 077; t="$1.tmp-$$"; cat > "$t" && chmod "$2" "$t" && mv -f "$t" "$1" || { rm -f "$t"; exit 1; }',
                path, format(mode, "o"), what=what, stdin=data)


def _ssh_error(address: SshAddress, stderr: str) -> SshError:
    text = " ".join(line.strip() for line in stderr.strip().splitlines() if line.strip())[-600:]
    low = text.lower()
    if "host key verification failed" in low or "remote host identification has changed" in low \
            or "no matching host key" in low:
        return HostKeyError(
            f"the host key of {address} is not trusted ({text}). Check its fingerprint and add it to your "
            f"known_hosts (ssh-keyscan, or connect once with ssh), or pass --accept-new-host-key to trust a "
            f"first-seen key")
    if "permission denied" in low or "too many authentication failures" in low:
        return AuthError(f"ssh could not log in to {address} ({text}): check --identity, the user and the "
                         f"host's authorized_keys")
    return ConnectError(f"ssh could not connect to {address}: {text or 'exit 255'}")

