"""`gitops-agent bootstrap`, the pure part: what the target must have, where things go on it, and the
files written there (settings, the supervisord config, the systemd unit). No I/O: the facts come in as
the probe script's output, the unit template as text.

Layout on the target (`--prefix`, default /opt/gitops-agent):

    <prefix>/venvs/gitops-agent-<version>-<id>/   the agent's venv; complete only with .bootstrap-complete
    <prefix>/dist/<wheel>                          the copied wheel (with --wheel)
    <prefix>/etc/agent.yaml                        the agent's settings (`run --config`), mode 0600
    <prefix>/etc/<age-identity|...>                identity and secret files, mode 0600
    <prefix>/supervisor/supervisord.conf           --init supervisord: a supervisord whose one program is
                                                   the agent (socket, pid file next to it)
    <prefix>/logs/                                 that supervisord's and the agent's logs
    <prefix>/bootstrap.json                        what bootstrap installed last (venv, version, init)
    /etc/systemd/system/gitops-agent.service       --init systemd
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import field

import yaml

from agent.core._record import record
from agent.core.errors import Permanent

__all__ = ["PROBE_SCRIPT", "TargetFacts", "Python", "TargetUnfit", "Paths", "parse_probe", "choose_installer",
           "choose_init", "venv_name", "render_settings", "render_supervisord", "render_systemd_unit",
           "FILE_SETTINGS", "MIN_PYTHON", "PROGRAM", "UNIT_PATH", "MARKER", "MAX_SOCKET_PATH", "check_url"]

MIN_PYTHON = (3, 10)
PROGRAM = "gitops-agent"
UNIT_PATH = "/etc/systemd/system/gitops-agent.service"
MARKER = ".bootstrap-complete"
MAX_SOCKET_PATH = 107       # sockaddr_un.sun_path is 108 bytes on Linux, with the terminating NUL
# Settings naming a file on the host: the local file is copied into <prefix>/etc/<name> (mode 0600) and
# the setting points there.
FILE_SETTINGS = {"age_identity": "age-identity", "webhook_secret_file": "webhook-secret",
                 "trusted_keys": "trusted-keys", "allowed_signers": "allowed-signers"}

# One round trip that tells everything the checks need. POSIX sh and shell built-ins only (it must run
# on a host that has nothing yet, to say what is missing). $1 = prefix, $2 = root.
PROBE_SCRIPT = r"""
echo "uid=$(id -u)"
echo "user=$(id -un)"
[ -d /run/systemd/system ] && echo systemd=1 || echo systemd=0
for p in python3 python3.14 python3.13 python3.12 python3.11 python3.10; do
  path=$(command -v "$p") || continue
  v=$("$path" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
  "$path" -c 'import venv, ensurepip' >/dev/null 2>&1 && ok=1 || ok=0
  echo "python=$path $v $ok"
done
uv=$(command -v uv) && "$uv" --version >/dev/null 2>&1 && echo "uv=$uv"
writable() { d=$1; while [ ! -e "$d" ]; do d=${d%/*}; [ -n "$d" ] || d=/; done; [ -w "$d" ] && echo 1 || echo 0; }
[ -e "$1" ] && echo prefix_exists=1 || echo prefix_exists=0
[ -e "$2" ] && echo root_exists=1 || echo root_exists=0
topmissing() { d=$1; t=; while [ ! -e "$d" ]; do t=$d; d=${d%/*}; [ -n "$d" ] || d=/; done; echo "$t"; }
echo "prefix_new=$(topmissing "$1")"
echo "root_new=$(topmissing "$2")"
echo "prefix_writable=$(writable "$1")"
echo "root_writable=$(writable "$2")"
[ -f "$1/bootstrap.json" ] && echo "state=$(cat "$1/bootstrap.json")"
echo "path=$PATH"
"""


class TargetUnfit(Permanent):
    """The target lacks what the agent needs (Python >= 3.10 with venv, or uv; systemd; permissions)."""


@record
class Python:
    path: str
    version: tuple[int, int]
    venv: bool                  # `import venv, ensurepip` works (Debian: python3-venv installed)


@record
class TargetFacts:
    uid: int
    user: str
    systemd: bool
    pythons: tuple[Python, ...]
    uv: str | None
    prefix_exists: bool
    root_exists: bool
    prefix_writable: bool
    root_writable: bool
    prefix_new: str = ""        # the topmost directory of the prefix that does not exist yet ("" if it does)
    root_new: str = ""
    state: dict = field(default_factory=dict)       # <prefix>/bootstrap.json of a previous run
    path: str = ""


def parse_probe(text: str) -> TargetFacts:
    """The probe script's `key=value` lines as facts (unknown lines are ignored)."""
    values: dict[str, str] = {}
    pythons: list[Python] = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "python":
            rest = value.split(" ")         # PATH VERSION OK (the path may hold spaces)
            try:
                major, minor = (int(x) for x in rest[-2].split("."))
            except (ValueError, IndexError):
                continue
            pythons.append(Python(" ".join(rest[:-2]), (major, minor), rest[-1] == "1"))
        else:
            values[key] = value
    try:
        state = json.loads(values.get("state") or "{}")
    except ValueError:
        state = {}
    return TargetFacts(
        uid=int(values.get("uid", "-1") or -1), user=values.get("user", ""), systemd=values.get("systemd") == "1",
        pythons=tuple(pythons), uv=values.get("uv") or None,
        prefix_exists=values.get("prefix_exists") == "1", root_exists=values.get("root_exists") == "1",
        prefix_writable=values.get("prefix_writable") == "1", root_writable=values.get("root_writable") == "1",
        prefix_new=values.get("prefix_new", ""), root_new=values.get("root_new", ""),
        state=state if isinstance(state, dict) else {}, path=values.get("path", ""))


def choose_installer(facts: TargetFacts) -> tuple[str, str]:
    """("venv", python path) for the first Python >= 3.10 with venv; else ("uv", uv path); else TargetUnfit
    with what was found and what to install."""
    for py in facts.pythons:
        if py.version >= MIN_PYTHON and py.venv:
            return "venv", py.path
    if facts.uv:
        return "uv", facts.uv
    found = ", ".join(f"{p.path} {p.version[0]}.{p.version[1]}" + ("" if p.venv else " (no venv/ensurepip)")
                      for p in facts.pythons) or "no python3"
    hint = ("install the venv module (Debian/Ubuntu: apt install python3-venv)"
            if any(p.version >= MIN_PYTHON for p in facts.pythons) else
            "install Python >= 3.10 with venv (Debian/Ubuntu: apt install python3 python3-venv) or uv")
    raise TargetUnfit(f"the target has no Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} with venv and no uv on its "
                      f"PATH ({facts.path or 'empty'}): found {found}; {hint}")


def choose_init(wanted: str, facts: TargetFacts) -> str:
    """systemd | supervisord. `auto`: systemd where it runs and we are root, else supervisord."""
    previous = facts.state.get("init")
    init = wanted if wanted != "auto" else previous or ("systemd" if facts.systemd and facts.uid == 0 else "supervisord")
    if previous and previous != init:
        raise TargetUnfit(f"the agent is already installed there with --init {previous}: two services on one root "
                          f"would fight for its lock; rerun with --init {previous}, or remove the old service first")
    if init == "systemd" and not facts.systemd:
        raise TargetUnfit("--init systemd: systemd is not running on the target; use --init supervisord")
    if init == "systemd" and facts.uid != 0:
        raise TargetUnfit(f"--init systemd writes {UNIT_PATH}: log in as root (logged in as {facts.user})")
    return init


@record
class Paths:
    prefix: str
    root: str

    @property
    def etc(self) -> str:
        return posixpath.join(self.prefix, "etc")

    @property
    def settings(self) -> str:
        return posixpath.join(self.etc, "agent.yaml")

    @property
    def venvs(self) -> str:
        return posixpath.join(self.prefix, "venvs")

    @property
    def dist(self) -> str:
        return posixpath.join(self.prefix, "dist")

    @property
    def logs(self) -> str:
        return posixpath.join(self.prefix, "logs")

    @property
    def supervisor(self) -> str:
        return posixpath.join(self.prefix, "supervisor")

    @property
    def supervisord_conf(self) -> str:
        return posixpath.join(self.supervisor, "supervisord.conf")

    @property
    def socket(self) -> str:
        return posixpath.join(self.supervisor, "supervisor.sock")

    @property
    def pidfile(self) -> str:
        return posixpath.join(self.supervisor, "supervisord.pid")

    @property
    def state(self) -> str:
        return posixpath.join(self.prefix, "bootstrap.json")

    def venv(self, name: str) -> str:
        return posixpath.join(self.venvs, name)

    def secret(self, setting: str) -> str:
        return posixpath.join(self.etc, FILE_SETTINGS[setting])


_SAFE = re.compile(r"[^A-Za-z0-9.+-]")


def venv_name(version: str, identity: str) -> str:
    """gitops-agent-<version>-<12 hex of what it is built from>: a new wheel of the same version is a
    new venv (venvs are not relocatable, so they are never rebuilt in place)."""
    return f"{PROGRAM}-{_SAFE.sub('_', version)}-{identity[:12]}"


def render_settings(values: dict) -> bytes:
    """The target's settings file (`gitops-agent run --config`): stable bytes for the same values."""
    head = "# Written by `gitops-agent bootstrap`; rerun it to change these (edits here are replaced).\n"
    return (head + yaml.safe_dump({k: values[k] for k in sorted(values)}, default_flow_style=False)).encode()


def _ini(value: str) -> str:
    if any(c in value for c in "\n\r\0;%") or not value.strip():
        raise TargetUnfit(f"{value!r} cannot go into supervisord's config (newline, ';', '%' or empty)")
    return value


def render_supervisord(paths: Paths, venv: str) -> str:
    """A supervisord (run from the agent's venv) whose one program is `gitops-agent run`. The command names
    the venv's concrete path, so a new venv changes the config and `supervisorctl update` restarts the
    agent; the agent's own embedded supervisord (its services) daemonizes and survives that restart."""
    p = {k: _ini(v) for k, v in (("conf", paths.supervisord_conf), ("sock", paths.socket), ("pid", paths.pidfile),
                                 ("logs", paths.logs), ("prefix", paths.prefix), ("venv", venv),
                                 ("settings", paths.settings))}
    return f"""\
; Written by `gitops-agent bootstrap --init supervisord`: the agent as the one program of a supervisord
; from its own venv (hosts without systemd). Start it at boot with: {p['venv']}/bin/supervisord -c {p['conf']}
[unix_http_server]
file={p['sock']}
chmod=0700

[supervisord]
pidfile={p['pid']}
logfile={p['logs']}/supervisord.log
childlogdir={p['logs']}
directory={p['prefix']}
umask=077

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{p['sock']}

[program:{PROGRAM}]
command={p['venv']}/bin/gitops-agent run --config {p['settings']}
directory={p['prefix']}
autostart=true
autorestart=true
startsecs=5
startretries=1000
; SIGTERM: the agent finishes the current reconcile and exits 0; its services keep running.
stopsignal=TERM
stopwaitsecs=90
stopasgroup=false
killasgroup=true
redirect_stderr=true
stdout_logfile={p['logs']}/agent.log
stdout_logfile_maxbytes=20MB
stdout_logfile_backups=5
"""


def render_systemd_unit(template: str, paths: Paths, venv: str, user: str) -> str:
    """deploy/systemd/gitops-agent.service with this install's paths: ExecStart from the venv with the
    settings file, the agent's root as its state, run as `user` (the SSH user; root can run services
    with `user:`). Every other line (restart policy, KillMode=process, the sandbox) is kept."""
    root = paths.root
    under_state = root.startswith("/var/lib/") and root.count("/") == 3
    out = []
    for line in template.splitlines():
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if key == "ExecStart":
            line = f"ExecStart={venv}/bin/gitops-agent run --config {paths.settings}"
        elif key == "User":
            line = f"User={user}"
        elif key == "Group":
            continue                    # the user's own group
        elif key == "EnvironmentFile":
            line = "EnvironmentFile=-/etc/gitops-agent/env"     # optional: settings are in --config
        elif key == "Environment" and line.startswith(("Environment=GITOPS_AGENT_ROOT=", "Environment=HOME=")):
            line = line.split("=", 2)[0] + "=" + line.split("=", 2)[1] + "=" + root
        elif key in ("StateDirectory", "StateDirectoryMode"):
            if not under_state:
                continue                # a root elsewhere: bootstrap creates it
            if key == "StateDirectory":
                line = "StateDirectory=" + root.rsplit("/", 1)[1]
        elif key == "ReadWritePaths" and line.startswith("ReadWritePaths=/var/lib/gitops-agent"):
            line = f"ReadWritePaths={root}"
        elif key == "WorkingDirectory":
            line = f"WorkingDirectory={root}"
        elif key == "Documentation":
            continue
        out.append(line)
    head = "# Written by `gitops-agent bootstrap --init systemd` from deploy/systemd/gitops-agent.service.\n"
    return head + "\n".join(out) + "\n"


def check_url(listen: str) -> str:
    """http://HOST:PORT of the agent's --listen, as reached from the target itself."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"
