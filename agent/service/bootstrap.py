"""`gitops-agent bootstrap ssh://USER@HOST[:PORT]`: install the agent on a host over SSH and start it.

Steps, each a check then (only if needed) a change, pyinfra-style: a step that finds the host as wished
says so and changes nothing, so a second run reports "no change".

  connect -> probe -> check target -> directories -> agent venv -> settings -> service -> health -> record

Every change registers how to undo it (remove what was created, put back the previous bytes of a
replaced file, stop a service that was started, restart one whose config was put back). When a step
fails, the undo runs newest first and the error names the step: the host is left as it was. A previous
agent that was running keeps running (its files are restored before it is restarted).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from agent.core import bootstrap as core
from agent.core._record import record
from agent.core.errors import AgentError, Permanent
from agent.drivers.ssh import RemoteError, SshAddress, SshError, SshTarget

__all__ = ["BootstrapOptions", "BootstrapFailed", "BootstrapResult", "bootstrap"]

BACKUP = ".bootstrap-prev"

# Run with the agent venv's python on the target: digest and mode of files (None when absent).
_DIGESTS = r"""
import hashlib, json, os, sys
out = {}
for p in sys.argv[1:]:
    try:
        with open(p, "rb") as fh:
            out[p] = [hashlib.sha256(fh.read()).hexdigest(), os.stat(p).st_mode & 0o7777]
    except FileNotFoundError:
        out[p] = None
print(json.dumps(out))
"""

# The state of the agent's program in the bootstrap supervisord, over its XML-RPC socket (supervisor's own
# client transport, as supervisorctl uses): {"supervisord": bool, "state": "RUNNING" | ... | null}.
_SUPERVISOR_STATE = r"""
import json, sys, xmlrpc.client
from supervisor.xmlrpc import SupervisorTransport
proxy = xmlrpc.client.ServerProxy("http://localhost", transport=SupervisorTransport(None, None, "unix://" + sys.argv[1]))
try:
    info = proxy.supervisor.getProcessInfo(sys.argv[2])
    print(json.dumps({"supervisord": True, "state": info["statename"]}))
except xmlrpc.client.Fault:
    print(json.dumps({"supervisord": True, "state": None}))
except OSError:
    print(json.dumps({"supervisord": False, "state": None}))
"""

# Wait until /healthz answers 200 and /metrics reports the expected gitops_agent_build_info version (or
# the version the agent upgraded itself to from fleet.yaml's agent: lock, per <root>/state/agent-upgrade.json).
_HEALTH = r"""
import json, os, sys, time, urllib.request
base, version, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
wants = ['gitops_agent_build_info{version="%s"} 1.0' % version]
last = "no answer"
while True:
    try:
        with open(os.path.join(sys.argv[4], "state", "agent-upgrade.json")) as fh:
            up = json.load(fh)
        if up.get("phase") == "done" and up.get("to"):
            wants.append('gitops_agent_build_info{version="%s"} 1.0' % up["to"])
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            code = r.status
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        if code == 200 and any(want in text for want in wants):
            print("healthy"); sys.exit(0)
        found = [l for l in text.splitlines() if l.startswith("gitops_agent_build_info{")]
        last = "an agent answers, but not version %s: %s" % (version, ", ".join(found) or "no build_info")
    except Exception as exc:
        last = "%s: %s" % (type(exc).__name__, exc)
    if time.monotonic() > deadline:
        print(last, file=sys.stderr); sys.exit(1)
    time.sleep(0.5)
"""


class BootstrapFailed(AgentError):
    """A step failed; what it had changed was undone (or the message says what could not be)."""

    def __init__(self, step: str, cause: BaseException, undo_errors: list[str], changed: bool):
        self.step = step
        self.cause = cause
        where = "nothing was changed on the host" if not changed else (
            "the host was put back as it was" if not undo_errors else
            "undoing it left: " + "; ".join(undo_errors))
        super().__init__(f"bootstrap failed at step '{step}': {cause}\n({where})")


@record
class BootstrapOptions:
    address: SshAddress
    settings: dict                              # agent settings for the target (files not yet included)
    files: dict = field(default_factory=dict)   # setting name -> local Path, copied 0600 into <prefix>/etc
    prefix: str = "/opt/gitops-agent"
    init: str = "auto"                          # auto | systemd | supervisord
    wheel: Path | None = None                   # None: from the index, gitops-agent==<version>
    version: str = ""                           # the version to install (the wheel's, or ours)
    index_url: str | None = None
    wait_s: float = 180.0
    identity: Path | None = None
    ssh_config: Path | None = None
    accept_new_host_key: bool = False


@dataclass
class BootstrapResult:
    changes: list[str]
    version: str
    init: str
    venv: str

    @property
    def changed(self) -> bool:
        return bool(self.changes)


class _Run:
    """One bootstrap: the target, the undo journal, what changed."""

    def __init__(self, opts: BootstrapOptions, target: SshTarget, say: Callable[[str], None]):
        self.o = opts
        self.t = target
        self.say = say
        self.paths = core.Paths(opts.prefix, str(opts.settings["root"]))
        self.undo: list[tuple[str, Callable[[], None]]] = []
        self.backups: list[str] = []
        self.changes: list[str] = []
        self.step = "connect"

    # -- helpers -----------------------------------------------------------------------------------

    def ok(self, text: str) -> None:
        self.say(f"  [ok]      {self.step}: {text}")

    def changed(self, text: str) -> None:
        self.changes.append(f"{self.step}: {text}")
        self.say(f"  [changed] {self.step}: {text}")

    def on_failure(self, what: str, fn: Callable[[], None]) -> None:
        self.undo.append((what, fn))

    def sh(self, script: str, *args: str, what: str, timeout: float = 600) -> str:
        return self.t.sh(script, *args, what=what, timeout=timeout)

    def py(self, code: str, *args: str, what: str, timeout: float = 600) -> str:
        return self.t.run([self.python, "-c", code, *args], what=what, timeout=timeout).stdout.decode()

    def digests(self, *paths: str) -> dict:
        return json.loads(self.py(_DIGESTS, *paths, what="read file digests"))

    def write_file(self, path: str, data: bytes, mode: int, label: str) -> bool:
        """Write `path` unless it already holds `data` with `mode`; the old bytes are kept aside until the
        run succeeds, so a failure puts them back."""
        current = self.digests(path)[path]
        if current == [hashlib.sha256(data).hexdigest(), mode]:
            self.ok(f"{label} {path} unchanged")
            return False
        if current is None:
            self.on_failure(f"remove {path}", lambda: self.sh('rm -f "$1"', path, what=f"remove {path}"))
        else:
            backup = path + BACKUP
            self.sh('cp -p "$1" "$2"', path, backup, what=f"keep {path} aside")
            self.backups.append(backup)
            self.on_failure(f"restore {path}", lambda: self.sh('mv -f "$2" "$1"', path, backup, what=f"restore {path}"))
        self.t.put(path, data, mode, what=f"write {path}")
        self.changed(f"{label} {path} {'written' if current is None else 'updated'} (mode {mode:o})")
        return True

    # -- steps -------------------------------------------------------------------------------------

    def run(self) -> BootstrapResult:
        o, p = self.o, self.paths
        self.t.run(["true"], what="connect")
        self.ok(f"logged in to {o.address}")

        self.step = "probe"
        facts = core.parse_probe(self.sh(core.PROBE_SCRIPT, p.prefix, p.root, what="probe the target"))
        self.ok(f"user {facts.user} (uid {facts.uid}), "
                + ", ".join(f"{py.path} {py.version[0]}.{py.version[1]}" for py in facts.pythons)
                + (f", uv {facts.uv}" if facts.uv else "") + (", systemd" if facts.systemd else ""))

        self.step = "check target"
        kind, installer = core.choose_installer(facts)
        init = core.choose_init(o.init, facts)
        for what, exists, writable in (("--prefix", facts.prefix_exists, facts.prefix_writable),
                                       ("--root", facts.root_exists, facts.root_writable)):
            if not writable:
                raise core.TargetUnfit(f"{what} {p.prefix if what == '--prefix' else p.root}: "
                                       f"{'not writable' if exists else 'cannot be created'} by {facts.user}")
        if init == "supervisord" and len(p.socket.encode()) > core.MAX_SOCKET_PATH:
            raise core.TargetUnfit(f"--prefix {p.prefix} is too long: its supervisord socket {p.socket} would pass "
                                   f"the {core.MAX_SOCKET_PATH}-byte limit of a unix socket path")
        self.ok(f"venv from {installer} ({kind}); service: {init}")

        self.step = "directories"
        for new in (facts.root_new, facts.prefix_new):      # the topmost directory that did not exist
            if new:
                self.on_failure(f"remove {new}", lambda new=new: self.sh('rm -rf "$1"', new, what=f"remove {new}"))
        made = self.sh('umask 022; for d in "$@"; do [ -d "$d" ] || { mkdir -p "$d" && echo "$d"; }; done; '
                       'chmod 0700 "$2" "$5"', p.prefix, p.etc, p.venvs, p.dist, p.logs, p.supervisor, p.root,
                       what="create directories").split("\n")
        made = [m for m in made if m]
        if made:
            self.changed("created " + ", ".join(made))
        else:
            self.ok("all there")

        self.step = "agent venv"
        venv = self.venv(kind, installer)
        self.python = posixpath.join(venv, "bin", "python")

        self.step = "settings"
        service_was = self.service_state(init, venv)
        if service_was["active"]:
            # Registered before any file is replaced, so it runs after they are all put back (newest first).
            self.on_failure("restart the previous agent with its restored files", lambda: self.restart(init, venv))
        settings = dict(o.settings)
        changed_settings = False
        for name, local in sorted(o.files.items()):
            settings[name] = p.secret(name)
            changed_settings |= self.write_file(p.secret(name), Path(local).read_bytes(), 0o600, name.replace("_", "-"))
        changed_settings |= self.write_file(p.settings, core.render_settings(settings), 0o600, "settings")

        self.step = "service"
        try:
            if init == "supervisord":
                self.supervisord(venv, service_was, changed_settings)
            else:
                self.systemd(venv, facts, service_was, changed_settings)
        except RemoteError as exc:
            raise RemoteError(f"{exc}\nthe agent's log ends:\n{self.log_tail(init)}", exc.code, "") from None

        self.step = "health"
        url = core.check_url(str(settings["listen"]))
        try:
            self.py(_HEALTH, url, o.version, str(o.wait_s), p.root, what=f"wait for {url}/healthz",
                    timeout=o.wait_s + 60)
        except RemoteError as exc:
            raise RemoteError(f"the agent did not answer healthy at {url} within {o.wait_s:g}s ({exc.stderr.strip()}); "
                              f"its log ends:\n{self.log_tail(init)}", exc.code, "") from None
        if init == "supervisord":
            self.await_running(venv, o.wait_s)
        self.ok(f"{url}/healthz answers, gitops_agent_build_info version {o.version}")

        self.step = "record"
        state = {"init": init, "version": o.version, "venv": venv, "root": p.root, "listen": settings["listen"]}
        self.write_file(p.state, (json.dumps(state, sort_keys=True) + "\n").encode(), 0o644, "record")
        if self.backups:
            self.sh('rm -f "$@"', *self.backups, what="remove the kept-aside files")
        return BootstrapResult(self.changes, o.version, init, venv)

    def venv(self, kind: str, installer: str) -> str:
        o, p = self.o, self.paths
        if o.wheel is not None:
            data = Path(o.wheel).read_bytes()
            identity = hashlib.sha256(data).hexdigest()
            source = posixpath.join(p.dist, Path(o.wheel).name)
        else:
            identity = hashlib.sha256(f"gitops-agent=={o.version} {o.index_url or ''}".encode()).hexdigest()
            source = f"gitops-agent=={o.version}"
        venv = p.venv(core.venv_name(o.version, identity))
        complete = self.sh('[ -f "$1/$2" ] && [ -x "$1/bin/gitops-agent" ] && echo yes || echo no', venv, core.MARKER,
                           what="look for the venv").strip() == "yes"
        if complete:
            self.ok(f"{venv} already built")
            return venv
        if o.wheel is not None:
            self.on_failure(f"remove {source}", lambda: self.sh('rm -f "$1"', source, what=f"remove {source}"))
            self.t.put(source, data, 0o644, what=f"copy {Path(o.wheel).name}")
        self.on_failure(f"remove {venv}", lambda: self.sh('rm -rf "$1"', venv, what=f"remove {venv}"))
        index = ["--index-url", o.index_url] if o.index_url else []
        # Built at its final path (venvs are not relocatable); complete only once the marker is written, so
        # an interrupted build is found without it and built again.
        script = ('set -e; v="$1"; kind="$2"; exe="$3"; shift 3; rm -rf "$v"; '
                  'if [ "$kind" = uv ]; then "$exe" venv -q --python ">=3.10" "$v"; '
                  '"$exe" pip install -q --python "$v/bin/python" "$@"; '
                  'else "$exe" -m venv "$v"; "$v/bin/python" -m pip install -q --disable-pip-version-check "$@"; fi')
        self.sh(script, venv, kind, installer, *index, source, what=f"build {venv}", timeout=1800)
        out = self.t.run([posixpath.join(venv, "bin", "gitops-agent"), "--version"], what="gitops-agent --version").stdout
        if out.decode().strip() != f"gitops-agent {o.version}":
            raise RemoteError(f"{venv}: gitops-agent --version says {out.decode().strip()!r}, "
                              f"not gitops-agent {o.version}", 1, "")
        self.sh(': > "$1/$2"', venv, core.MARKER, what="mark the venv complete")
        self.changed(f"built {venv} ({'from ' + Path(o.wheel).name if o.wheel else source}), --version {o.version}")
        return venv

    def service_state(self, init: str, venv: str) -> dict:
        if init == "supervisord":
            state = json.loads(self.py(_SUPERVISOR_STATE, self.paths.socket, core.PROGRAM, what="ask supervisord"))
            return {"active": state["state"] in ("RUNNING", "STARTING"), **state}
        active = self.t.run(["systemctl", "is-active", "--quiet", core.PROGRAM], what="systemctl is-active",
                            check=False).returncode == 0
        return {"active": active}

    def await_running(self, venv: str, wait_s: float) -> None:
        """supervisord calls the agent RUNNING once it stayed up `startsecs`: a crash just after its first
        answer is a failure too."""
        deadline = time.monotonic() + wait_s
        while (state := self.service_state("supervisord", venv)["state"]) != "RUNNING":
            if state not in ("STARTING", "RUNNING") or time.monotonic() > deadline:
                raise RemoteError(f"{core.PROGRAM} is {state} in supervisord, not RUNNING; its log ends:\n"
                                  f"{self.log_tail('supervisord')}", 1, "")
            time.sleep(0.5)

    def restart(self, init: str, venv: str) -> None:
        if init == "supervisord":
            ctl = [posixpath.join(venv, "bin", "supervisorctl"), "-c", self.paths.supervisord_conf]
            self.t.run([*ctl, "update"], what="supervisorctl update")
            self.t.run([*ctl, "stop", core.PROGRAM], what="supervisorctl stop", check=False)   # may be stopped
            self.t.run([*ctl, "start", core.PROGRAM], what="supervisorctl start")
        else:
            self.t.run(["systemctl", "daemon-reload"], what="systemctl daemon-reload")
            self.t.run(["systemctl", "restart", core.PROGRAM], what="systemctl restart")

    def stop_agent(self, venv: str) -> None:
        """The agent's embedded supervisord and its services (the agent itself is already stopped)."""
        self.t.run([posixpath.join(venv, "bin", "gitops-agent"), "down", "--config", self.paths.settings],
                   what="gitops-agent down", check=False)

    def supervisord(self, venv: str, was: dict, changed_settings: bool) -> None:
        p = self.paths
        ctl = [posixpath.join(venv, "bin", "supervisorctl"), "-c", p.supervisord_conf]
        changed_conf = self.write_file(p.supervisord_conf, core.render_supervisord(p, venv).encode(), 0o600,
                                       "supervisord config")
        if not was["supervisord"]:
            self.on_failure("stop the bootstrap supervisord and the agent", lambda: self.shutdown_supervisord(venv))
            self.t.run([posixpath.join(venv, "bin", "supervisord"), "-c", p.supervisord_conf], what="start supervisord")
            self.changed(f"started supervisord ({p.supervisord_conf}) running {core.PROGRAM}")
        elif changed_conf:
            self.t.run([*ctl, "update"], what="supervisorctl update")
            self.changed(f"supervisord reloaded its config: {core.PROGRAM} restarted from {venv}")
        elif changed_settings or not was["active"]:
            self.t.run([*ctl, "restart", core.PROGRAM], what="supervisorctl restart")
            self.changed(f"{core.PROGRAM} restarted" + (" with the new settings" if changed_settings else ""))
        else:
            self.ok(f"supervisord runs {core.PROGRAM} ({was['state']})")

    def shutdown_supervisord(self, venv: str) -> None:
        p = self.paths
        # SIGTERM to supervisord stops the agent (it finishes its reconcile) and then exits; wait for it.
        self.sh('pid=$(cat "$1" 2>/dev/null) || exit 0; kill "$pid" 2>/dev/null || exit 0; i=0; '
                'while kill -0 "$pid" 2>/dev/null; do i=$((i+1)); [ $i -lt 1200 ] || exit 1; sleep 0.1; done',
                p.pidfile, what="stop the bootstrap supervisord", timeout=200)
        self.stop_agent(venv)

    def systemd(self, venv: str, facts, was: dict, changed_settings: bool) -> None:
        from agent.assets import asset_text

        unit = core.render_systemd_unit(asset_text("agent.deploy", "systemd/gitops-agent.service"), self.paths, venv,
                                        facts.user)
        changed_unit = self.write_file(core.UNIT_PATH, unit.encode(), 0o644, "unit")
        if changed_unit:
            self.t.run(["systemctl", "daemon-reload"], what="systemctl daemon-reload")
        enabled = self.t.run(["systemctl", "is-enabled", "--quiet", core.PROGRAM], what="systemctl is-enabled",
                             check=False).returncode == 0
        if not was["active"]:
            self.on_failure("stop and disable the unit", lambda: self.systemd_off(venv))
            self.t.run(["systemctl", "enable", "--now", core.PROGRAM], what="systemctl enable --now")
            self.changed(f"{core.PROGRAM}.service enabled and started")
        elif changed_unit or changed_settings:
            self.t.run(["systemctl", "restart", core.PROGRAM], what="systemctl restart")
            self.changed(f"{core.PROGRAM}.service restarted")
        else:
            self.ok(f"{core.PROGRAM}.service active")
        if was["active"] and not enabled:
            self.t.run(["systemctl", "enable", core.PROGRAM], what="systemctl enable")
            self.changed(f"{core.PROGRAM}.service enabled")

    def systemd_off(self, venv: str) -> None:
        self.t.run(["systemctl", "disable", "--now", core.PROGRAM], what="systemctl disable --now", check=False)
        self.stop_agent(venv)

    def log_tail(self, init: str) -> str:
        if init == "supervisord":
            argv = ["tail", "-n", "25", posixpath.join(self.paths.logs, "agent.log")]
        else:
            argv = ["journalctl", "-u", core.PROGRAM, "-n", "25", "--no-pager"]
        try:
            proc = self.t.run(argv, what="read the agent's log", check=False)
        except SshError:
            return "  (unreadable)"
        return "\n".join("  " + line for line in proc.stdout.decode(errors="replace").splitlines()) or "  (empty)"

    def rollback(self) -> list[str]:
        errors = []
        for what, fn in reversed(self.undo):
            try:
                fn()
                self.say(f"  [undone]  {what}")
            except Exception as exc:  # noqa: BLE001 - every undo is tried; each failure is reported
                errors.append(f"{what}: {exc}")
                self.say(f"  [FAILED]  undo {what}: {exc}")
        return errors


def bootstrap(opts: BootstrapOptions, say: Callable[[str], None] = print) -> BootstrapResult:
    """Install (or confirm) the agent on `opts.address`; raise BootstrapFailed naming the failed step."""
    target = SshTarget(opts.address, identity=opts.identity, ssh_config=opts.ssh_config,
                       accept_new_host_key=opts.accept_new_host_key)
    with target:
        run = _Run(opts, target, say)
        say(f"bootstrap {opts.address}: gitops-agent {opts.version}, prefix {opts.prefix}, root {run.paths.root}")
        try:
            return run.run()
        except (SshError, RemoteError, Permanent, OSError, KeyboardInterrupt) as exc:
            undo_errors = run.rollback()
            raise BootstrapFailed(run.step, exc, undo_errors, changed=bool(run.undo)) from None



_NOT_SETTINGS = {"command", "target", "identity", "ssh_config", "accept_new_host_key", "wheel", "index_url", "init",
                 "prefix", "wait_s", "config"}


def options_from_args(args: dict) -> BootstrapOptions:
    """BootstrapOptions from the parsed command line. The agent settings given (flags, or a local --config
    file: flags win) are checked here, before anything connects, as the target's agent would check them;
    files they name must exist. Only settings given are written, plus root and listen (which bootstrap
    needs to know): the rest keep the agent's defaults on the target (its hostname for --host)."""
    import yaml

    from agent import __version__
    from agent.core.errors import ConfigError
    from agent.settings import _ALIAS, Settings, build_settings

    try:
        address = SshAddress.parse(args["target"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    given: dict = {}
    if args.get("config"):
        try:
            loaded = yaml.safe_load(Path(args["config"]).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read --config {args['config']}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {args['config']} must be a mapping of setting: value")
        given.update({_ALIAS.get(str(k).replace("-", "_"), str(k).replace("-", "_")): v for k, v in loaded.items()})
    given.update({k: v for k, v in args.items() if k not in _NOT_SETTINGS and v is not None})
    given.setdefault("root", str(Settings.root))
    given.setdefault("listen", Settings.listen)
    known = {k: v for k, v in given.items() if k in Settings.__dataclass_fields__}
    build_settings(known, environ={})                   # ranges and choices, named by flag
    root = given["root"]
    if not str(root).startswith("/"):
        raise ConfigError(f"--root {root!r}: give the target's path in full (it starts with /)")
    prefix = args.get("prefix") or "/opt/gitops-agent"
    if not prefix.startswith("/"):
        raise ConfigError(f"--prefix {prefix!r}: give the target's path in full (it starts with /)")
    files = {}
    for name in core.FILE_SETTINGS:
        if given.get(name):
            local = Path(str(given.pop(name))).expanduser()
            if not local.is_file():
                raise ConfigError(f"--{name.replace('_', '-')} {local}: no such file here (it is copied to the target)")
            files[name] = local
    version = __version__
    wheel = Path(args["wheel"]).expanduser() if args.get("wheel") else None
    if wheel is not None:
        from packaging.utils import InvalidWheelFilename, parse_wheel_filename

        if not wheel.is_file():
            raise ConfigError(f"--wheel {wheel}: no such file")
        try:
            name, ver, _build, _tags = parse_wheel_filename(wheel.name)
        except InvalidWheelFilename as exc:
            raise ConfigError(f"--wheel {wheel}: {exc}") from None
        if name != "gitops-agent":
            raise ConfigError(f"--wheel {wheel}: a wheel of {name}, not gitops-agent")
        version = str(ver)
    for key in ("identity", "ssh_config"):
        if args.get(key) and not Path(args[key]).expanduser().is_file():
            raise ConfigError(f"--{key.replace('_', '-')} {args[key]}: no such file")
    return BootstrapOptions(
        address=address, settings={k: (str(v) if isinstance(v, Path) else v) for k, v in given.items()},
        files=files, prefix=prefix.rstrip("/") or "/", init=args.get("init") or "auto", wheel=wheel,
        version=version, index_url=args.get("index_url"), wait_s=args.get("wait_s") or 180.0,
        identity=Path(args["identity"]).expanduser() if args.get("identity") else None,
        ssh_config=Path(args["ssh_config"]).expanduser() if args.get("ssh_config") else None,
        accept_new_host_key=bool(args.get("accept_new_host_key")))
