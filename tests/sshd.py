"""A real OpenSSH server for tests: Debian's `sshd` on 127.0.0.1, its own host key, config, port and
authorized_keys (one generated client key), run as the current user; and the client files that trust it
(a known_hosts with its key, an ssh_config using that known_hosts and nothing of ~/.ssh; the client key
is given with `-i` / `--identity`).

Each session runs under `ForceCommand` with an environment the test chooses (`env -i PATH=...`): that is
how a test gives the target a PATH (one without Python, say) instead of whatever the login shell's rc
files set. The command itself is the client's, unchanged ($SSH_ORIGINAL_COMMAND).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port, stop_process

SSHD = "/usr/sbin/sshd"


@dataclass
class Sshd:
    port: int
    dir: Path
    client_key: Path
    known_hosts: Path
    ssh_config: Path
    proc: subprocess.Popen
    user: str

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def set_path(self, path: str) -> None:
        """The PATH of the next sessions on the target."""
        (self.dir / "target-path").write_text(path)

    def stop(self) -> None:
        stop_process(self.proc)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)], check=True)


def start_sshd(base: Path, path: str) -> Sshd:
    base.mkdir(parents=True, exist_ok=True)
    os.makedirs("/run/sshd", exist_ok=True)          # sshd's privilege-separation dir (Debian creates it at boot)
    _keygen(base / "host_key")
    _keygen(base / "client_key")
    (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
    (base / "target-path").write_text(path)
    env_cmd = base / "target-env"
    # This machine reaches the package index through a CA of its own (pip.conf's `cert`, $PIP_CERT): the
    # target, being this machine, gets it as SSL_CERT_FILE too, for uv (pip reads pip.conf itself).
    ca = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    cert = f"SSL_CERT_FILE={shlex.quote(ca)} " if os.path.isfile(ca) else ""
    env_cmd.write_text(
        "#!/bin/sh\n# ForceCommand: the client's command under an environment the test chose\n"
        f'exec env -i PATH="$(cat {shlex.quote(str(base / "target-path"))})" HOME="$HOME" USER="$USER" '
        f'LOGNAME="$LOGNAME" LANG=C.UTF-8 {cert}/bin/sh -c "$SSH_ORIGINAL_COMMAND"\n')
    env_cmd.chmod(0o755)
    port = free_port()
    (base / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {base / 'host_key'}
PidFile {base / 'sshd.pid'}
AuthorizedKeysFile {base / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
ForceCommand {env_cmd}
MaxSessions 50
MaxStartups 50
LogLevel VERBOSE
""")
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    host_pub = (base / "host_key.pub").read_text().split()
    (base / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (base / "ssh_config").write_text(f"""\
Host *
  UserKnownHostsFile {base / 'known_hosts'}
  GlobalKnownHostsFile /dev/null
  IdentitiesOnly yes
""")
    log = open(base / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(base / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    sshd = Sshd(port, base, base / "client_key", base / "known_hosts", base / "ssh_config", proc, user)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return sshd
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                sshd.stop()
                raise RuntimeError(f"sshd did not start: {(base / 'sshd.log').read_text()[-2000:]}") from None
            time.sleep(0.05)
