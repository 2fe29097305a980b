"""`gitops-agent`: argparse front end. Builds settings, wires drivers, prints; no reconcile logic here.

Imports are lazy: `validate`, `status` and `--help` should not pay for jsonschema or supervisor.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_DRIFT = 0, 1, 2


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("agent options (also GITOPS_AGENT_<NAME> env vars or --config FILE)")
    g.add_argument("--config", help="YAML file of settings (keys as the long options, with _)")
    g.add_argument("--repo", help="state repo URL: file://, ssh, https, or a local path")
    g.add_argument("--ref", help="branch, tag or commit to track (default: main)")
    g.add_argument("--refs-url", help="poll the repo's static info/refs at this http(s) URL with If-None-Match "
                   "(git update-server-info; nginx answers 304) instead of git ls-remote")
    g.add_argument("--path", help="subdirectory of the repo that holds the state (e.g. a tier)")
    g.add_argument("--host", help="this host's name in fleet.yaml (default: hostname)")
    g.add_argument("--root", help="where venvs, program configs and status live (default: /var/lib/gitops-agent)")
    g.add_argument("--supervisor", help="'embedded' (default) or unix:///path/to/supervisor.sock")
    g.add_argument("--retention", type=int, help="venvs kept per environment for instant rollback (default 3)")
    g.add_argument("--installer", choices=["pip", "uv"], help="default venv installer (default: uv when it runs here, else pip)")
    g.add_argument("--lb", choices=["haproxy", "nginx"], help="load balancer for traffic: (default haproxy)")
    g.add_argument("--lb-config", help="drive a system load balancer: the config file it reads (the agent owns it)")
    g.add_argument("--lb-reload", help="with --lb-config: the command that reloads or starts it")
    g.add_argument("--lb-metrics", help="HOST:PORT where HAProxy serves its Prometheus exporter on /metrics "
                                        "(default 127.0.0.1:8405; off: none)")
    g.add_argument("--supervisor-web", help="serve the embedded supervisord's web UI on HOST:PORT (or PORT, on "
                                            "127.0.0.1); user gitops-agent, password in <root>/supervisor/web-password")
    g.add_argument("--allow-root-services", action="store_const", const=True, default=None,
                   help="allow services with user: root")
    g.add_argument("--health-wait", dest="health_wait_s", type=float, help="seconds a restarted service may take to turn healthy")
    g.add_argument("--verify-signatures", action="store_const", const=True, default=None,
                   help="apply only commits signed by a trusted key")
    g.add_argument("--trusted-keys", help="OpenPGP public keyring file of trusted signers")
    g.add_argument("--allowed-signers", help="SSH allowed-signers file of trusted signers")
    g.add_argument("--require-fast-forward", action="store_const", const=True, default=None,
                   help="refuse a tracked ref whose history was rewritten (force-push)")
    g.add_argument("--allow-chaos", action="store_const", const=True, default=None,
                   help="act on apps' chaos: blocks (off by default: they are ignored with a note)")
    g.add_argument("--mode", choices=["enforce", "warn"], help="enforce (default): heal drift; warn: only report it")
    g.add_argument("--apply-commits", action="store_const", const=True, default=None,
                   help="in warn mode, still apply new commits")
    g.add_argument("--age-identity", help="age identity file that decrypts the apps' secrets (several: separated by ':'); "
                                          "keep it mode 0600")
    g.add_argument("--log-format", choices=["text", "json"])
    g.add_argument("--log-level")


def _once(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--ignore-windows", action="store_const", const=True, default=None,
                   help="apply outside the apps' release windows (an emergency fix)")
    p.add_argument("--notify", action="append", help="Apprise URL that gets this reconcile's events (repeatable)")


def _with_json(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--json", action="store_true")


def _validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("state_path", metavar="PATH")
    p.add_argument("--json", action="store_true")
    p.add_argument("--allow-root-services", action="store_true")
    p.add_argument("--allow-chaos", action="store_true", help="check chaos: blocks as an agent that allows them")
    p.add_argument("--repo-root", help="paths may reach up to here (default: the git work tree holding PATH), "
                                       "e.g. a tier directory sharing the repo's wheelhouse")


def _run(p: argparse.ArgumentParser) -> None:
    _common(p)
    _daemon_options(p)
    p.add_argument("--ignore-windows", action="store_const", const=True, default=None,
                   help="apply outside the apps' release windows (an emergency fix)")
    p.add_argument("--notify", action="append", help="Apprise URL (json://, slack://, mailto://, ...) that gets "
                   "the agent's events: applied, failed, rolled back, invalid, drift, suspended ... (repeatable)")


def _bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="ssh://USER@HOST[:PORT]")
    p.add_argument("--identity", help="SSH private key (otherwise ssh's defaults: agent, ~/.ssh/config)")
    p.add_argument("--ssh-config", help="ssh_config file to use instead of ~/.ssh/config (ssh -F)")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="trust the host's key if known_hosts has none yet (a changed key is always refused)")
    p.add_argument("--wheel", help="install the agent from this wheel, copied over (default: gitops-agent==THIS "
                                   "VERSION from the target's index)")
    p.add_argument("--index-url", help="with no --wheel: the index the target installs from (and its dependencies)")
    p.add_argument("--init", choices=["auto", "systemd", "supervisord"],
                   help="the service that keeps `run` going (auto: systemd where it runs and we are root)")
    p.add_argument("--prefix", help="the agent's venvs, settings and service files on the target "
                                    "(default /opt/gitops-agent)")
    p.add_argument("--wait", dest="wait_s", type=float, help="seconds to wait for /healthz (default 180)")
    _common(p)
    p.add_argument("--config", help="a local YAML file of agent settings written to the target (flags win)")
    _daemon_options(p)      # written into the target's settings; secret files copied with mode 0600
    p.add_argument("--age-identity", help="age identity file, copied to the target with mode 0600")


def _suspend(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--app", help="suspend only this app (default: the whole host)")
    p.add_argument("--reason", required=True, help="why: shown by status, plan and the metrics' readers")


def _resume(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--app", help="resume only this app (default: the host-wide suspension)")


def _retry(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--app", help="lift only this app's quarantine")


def _parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line. When `argv` starts with a command, only that command's options are built: the
    whole tree (~300 options) costs a short run like `once` ~20 ms. Anything else (--help, --version, a
    typo) builds every command, so usage and "invalid choice" list them all."""
    from agent import __version__

    parser = argparse.ArgumentParser(prog="gitops-agent", description="Converge this host to a Git repository of declarative state.")
    parser.add_argument("--version", action="version", version=f"gitops-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    args = sys.argv[1:] if argv is None else argv
    names = [args[0]] if args and args[0] in _SUBCOMMANDS else list(_SUBCOMMANDS)
    for name in names:
        help_line, add_options, _handler, extra = _SUBCOMMANDS[name]
        add_options(sub.add_parser(name, help=help_line, **extra))
    return parser


def _daemon_options(parser: argparse.ArgumentParser) -> None:
    """The daemon's own options: `run` takes them, `bootstrap` writes them into the target's settings."""
    parser.add_argument("--listen", help="HOST:PORT of the metrics/health HTTP server (default 127.0.0.1:9400)")
    parser.add_argument("--poll-interval", dest="poll_interval_s", type=float,
                        help="seconds between polls of the repo, jittered ±10%% (default 15)")
    parser.add_argument("--webhook-secret-file", help="serve POST /hooks/git on --listen: a push webhook signed with "
                        "the secret in FILE (GitHub/Gitea/Forgejo HMAC-SHA256, GitLab token) triggers a fetch at once")
    parser.add_argument("--splay", type=float, help="random delay (0..SECONDS) before the first poll, so a fleet "
                                                    "does not fetch at the same second")


def _settings(args: argparse.Namespace):
    from agent.settings import build_settings

    values = vars(args)
    if isinstance(values.get("notify"), list):       # repeatable flag -> one whitespace-separated setting
        values = {**values, "notify": " ".join(values["notify"])}
    return build_settings(values)


def _setup_logs(settings) -> None:
    from agent.logs import setup_logging

    setup_logging(settings.log_format, settings.log_level)


def _print_result(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_result_json(result), indent=2))
        return
    if result.revision is not None:
        print(f"revision {result.revision.sha} ({result.revision.summary})")
    if result.plan is not None and result.desired_from and result.revision and result.desired_from != result.revision.sha:
        print(f"desired state from the last good revision {result.desired_from}")
    if result.outcomes:
        for o in result.outcomes:
            mark = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}.get(o.result, o.result)
            print(f"  [{mark}] {o.action.describe()}: {o.message}  # {o.action.reason}")
    elif result.plan is not None and not result.drift:
        print(result.plan.render())
    for action in result.drift:
        print(f"  [drift, not applied: warn mode] {action.describe()}  # {action.reason}")
    print(f"result: {result.result} in {result.seconds:.2f}s")
    for app, listen in result.frontends:
        print(f"{app}: open http://{listen}/")
    _print_held(result)
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)


def _print_held(result) -> None:
    """Actions a suspension or quarantine held back: what the agent would do, and why it does not."""
    control = getattr(result, "control", None)
    if control is not None:
        for app, s in sorted(control.suspended.items()):
            print(f"suspended: {'the whole host' if app == '*' else 'app ' + app}: {s.reason} (since {_ts(s.at)})")
    for why in dict.fromkeys(h.why for h in getattr(result, "held", ())):
        print(f"held: {why}")
    for h in getattr(result, "held", ()):
        print(f"  [held: {h.cause}] {h.action.describe()}  # {h.action.reason}")


def _result_json(result) -> dict:
    rev = result.revision
    return {
        "result": result.result,
        "revision": rev.sha if rev else None,
        "desired_from": result.desired_from,
        "plan": result.plan.to_json() if result.plan is not None else None,
        "outcomes": [o.to_json() for o in result.outcomes],
        "drift": [a.to_json() for a in result.drift],
        "error": result.error,
        "seconds": round(result.seconds, 4),
        "held": [{"app": h.app, "cause": h.cause, "why": h.why, "key": h.action.key} for h in result.held],
        **(result.control.to_json() if result.control is not None else {}),
    }


def cmd_once(args) -> int:
    settings = _settings(args)
    _setup_logs(settings)
    from agent.compose import git_source
    from agent.service.rootlock import root_lock

    # notifications under the lock: a run sends what a killed one left pending, and no other run reads them
    # as pending while this one still delivers them
    undelivered = False
    with root_lock(settings.root):
        source = git_source(settings)
        source.resolve_ahead()      # git works while the reconciler is imported
        try:
            from agent.compose import reconciler

            notifications = None
            if settings.notify:
                from agent.service.notify import build_notifications

                notifications = build_notifications(settings)
            rec = reconciler(settings, source=source)
            _loaded()
            result = rec.reconcile()
            if notifications is not None:
                notifications.observe(result)
                undelivered = not notifications.notifier.flush(30.0)
        finally:
            source.close()
    _print_result(result, args.json)
    if undelivered:
        print("warning: some notifications were not delivered within 30 s (the next run sends them)", file=sys.stderr)
    return result.exit_code


def cmd_plan(args) -> int:
    settings = _settings(args)
    _setup_logs(settings)
    from agent.compose import reconciler

    rec = reconciler(settings, read_only=True)
    try:
        result = rec.reconcile(apply=False)
    finally:
        rec.close()
    if args.json:
        print(json.dumps(_result_json(result), indent=2))
    else:
        if result.revision is not None:
            print(f"revision {result.revision.sha} ({result.revision.summary})")
        if result.plan is not None:
            print(result.plan.render())
        _print_held(result)
        if result.error:
            print(f"error: {result.error}", file=sys.stderr)
    return result.exit_code


def cmd_validate(args) -> int:
    from agent.core.load import LoadOptions, validate_tree

    root = Path(args.state_path)
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        return EXIT_ERROR
    boundary = Path(args.repo_root) if args.repo_root else _work_tree(root)
    problems = validate_tree(root, LoadOptions(allow_root=args.allow_root_services, allow_chaos=args.allow_chaos,
                                               boundary=boundary.resolve() if boundary else None))
    if args.json:
        print(json.dumps({"valid": not problems, "problems": [p.__dict__ for p in problems]}, indent=2))
    else:
        for p in problems:
            print(p)
        print(f"{root}: {'valid' if not problems else f'{len(problems)} problem(s)'}")
    return EXIT_ERROR if problems else EXIT_OK


def _work_tree(path: Path) -> Path | None:
    """The git work tree holding `path` (tiers may share files above their own directory), if any."""
    import subprocess

    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    return Path(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def cmd_status(args) -> int:
    """The documented status (docs/status-page.md): the same report the status page and /api/status show."""
    settings = _settings(args)
    from agent.core.layout import Layout
    from agent.core.status_view import human_age
    from agent.service.status_page import read_report

    from agent.service.control import control_file, load_control
    from agent.service.selfupgrade import read_upgrade_state

    r = read_report(Layout(settings.root))
    control = load_control(control_file(settings.root))
    upgrade = read_upgrade_state(Layout(settings.root).state)
    if args.json:
        print(json.dumps({**r, **control.to_json(), "agent_upgrade": upgrade or None}, indent=2))
        return EXIT_OK
    if upgrade.get("phase") == "failed":
        print(f"agent upgrade to {upgrade.get('to')} FAILED (running {upgrade.get('from')}): {upgrade.get('reason')}")
    elif upgrade.get("phase") == "waiting":
        print(f"agent upgrade to {upgrade.get('to')} waiting for this host's wave (running {upgrade.get('from')}): "
              f"{upgrade.get('reason')}")
    for app, s in sorted(control.suspended.items()):
        print(f"suspended: {'the whole host' if app == '*' else 'app ' + app}: {s.reason} (since {_ts(s.at)})")
    for app, q in sorted(control.quarantined.items()):
        print(f"quarantined: app {app}: revision {q.sha} since {_ts(q.at)}: {q.reason} "
              f"(a commit that changes the app, or `gitops-agent retry --app {app}`, lifts it)")
    if r["applied"] is None and r["attempted"] is None:
        print(f"no reconcile recorded under {settings.root}")
        return EXIT_OK
    ap, at = r["applied"], r["attempted"]
    print(f"host:      {r['host']}")
    print(f"applied:   {ap['sha']} ({ap['subject']}) at {_ts(ap['applied_at'])}" if ap else "applied:   none")
    if at and (ap is None or at["sha"] != ap["sha"]):
        print(f"attempted: {at['sha']} ({at['subject']}) at {_ts(at['applied_at'])}")
    print(f"result:    {r['result']} at {_ts(r['last_reconcile_at'])}")
    if r["resources"]:
        print("resources:")
        for key, res in r["resources"].items():
            since = f" (drifted for {human_age(res['drift_age_s'])})" if res["drift_since"] else ""
            print(f"  {key:<40} {res['state']:<8} {res['message']}{since}")
    for app in r["apps"]:
        window = app.get("window")
        if window and not window["open"]:
            print(f"window {app['name']}: closed" + (f", opens {_ts(window['opens_at'])}" if window["opens_at"] else ""))
        fe = app["frontend"]
        if fe:
            split = ", ".join(f"{b['backend']} {b['percent']:g}%" for b in fe["split"])
            print(f"frontend {app['name']}: http://{fe['listen']}/ ({fe['strategy']}): {split}")
    for app, p in sorted(r["rollouts"].items()):
        print(f"canary {app}: {p['state']} at step {p['step'] + 1} since {_ts(p['since'])}"
              + (f" ({p['errors']}/{p['probes']} probes failed)" if p.get("probes") else "") + (f": {p['reason']}" if p.get("reason") else ""))
    if r["last_error"]:
        print(f"last error ({_ts(r['last_error_at'])}):\n  " + r["last_error"].replace("\n", "\n  "))
    return EXIT_OK


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_facts(args) -> int:
    settings = _settings(args)
    _setup_logs(settings)
    from agent.drivers.supervisor import read_program_files
    from agent.drivers.venv import VenvManager
    from agent.service.facts import collect, read_verified
    from agent.core.layout import Layout
    from agent.drivers.supervisor_handle import SupervisorHandle
    from agent.drivers.lb import LoadBalancer

    layout = Layout(settings.root)
    handle = SupervisorHandle(settings.supervisor, layout)
    facts = collect(VenvManager(layout.root, settings.retention), layout.envs,
                    read_program_files(layout.programs), handle.running_client(), LoadBalancer(settings.lb, layout.root, config=settings.lb_config, reload=settings.lb_reload,
                                 metrics=settings.lb_metrics_address),
                    read_verified(layout.verified))
    if layout.inputs_key.is_file():      # digests keyed like the reconciler's (no key: nothing was written yet)
        from dataclasses import replace

        from agent.service.facts import app_file_facts

        facts = replace(facts, **app_file_facts(layout, layout.inputs_key.read_bytes()))
    data = {"host": settings.host, "root": str(settings.root), **facts.to_json()}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"supervisord: {facts.supervisor}")
        for name, v in sorted(facts.venvs.items()):
            print(f"venv {name}: current {v.current}; kept {', '.join(v.complete) or '-'}"
                  + (f"; interrupted {', '.join(v.incomplete)}" if v.incomplete else ""))
            for dist, ver in v.installed or ():
                print(f"    {dist}=={ver}")
        for name, p in sorted(facts.programs.items()):
            print(f"program {name}: {p.state or 'not loaded'}" + (f" pid {p.pid}" if p.pid else "")
                  + (f" (pending {p.pending})" if p.pending else "") + ("" if p.file_text else " (no program file)"))
        for path, digest in sorted(facts.files.items()):
            print(f"file {path}: {digest}")
        for job, inputs in sorted(facts.jobs.items()):
            print(f"job {job}: last succeeded with inputs {inputs}")
        if facts.traffic is not None:
            t = facts.traffic
            print(f"load balancer {t.get('driver')}: {'running' if t.get('running') else 'not running'}"
                  + (f"; weights {json.dumps(t.get('weights'), sort_keys=True)}" if t.get("weights") else ""))
    return EXIT_OK


def cmd_run(args) -> int:
    settings = _settings(args)
    _setup_logs(settings)
    from agent.service.rootlock import root_lock
    from agent.service.runtime import run_daemon

    _loaded()
    with root_lock(settings.root) as lock_fd:
        return run_daemon(settings, lock_fd=lock_fd)


def cmd_down(args) -> int:
    settings = _settings(args)
    _setup_logs(settings)
    from agent.drivers.supervisor import EmbeddedSupervisor

    if settings.supervisor != "embedded":
        print("error: down only stops the embedded supervisord", file=sys.stderr)
        return EXIT_ERROR
    stopped = EmbeddedSupervisor(settings.root).stop()
    print("embedded supervisord stopped" if stopped else "embedded supervisord was not running")
    return EXIT_OK


def cmd_bootstrap(args) -> int:
    from agent.service.bootstrap import bootstrap, options_from_args

    _loaded()
    result = bootstrap(options_from_args(vars(args)))
    if result.changed:
        print(f"done: gitops-agent {result.version} runs on {args.target} ({result.init}); "
              f"{len(result.changes)} change(s)")
    else:
        print(f"no change: gitops-agent {result.version} is installed and running on {args.target} ({result.init})")
    return EXIT_OK


def cmd_suspend(args) -> int:
    from dataclasses import replace

    from agent.core.control import HOST, Suspension
    from agent.service.control import control_file, update_control

    settings = _settings(args)
    key = args.app or HOST
    update_control(control_file(settings.root),
                   lambda c: replace(c, suspended={**c.suspended, key: Suspension(args.reason, time.time())}))
    print(f"suspended {'the whole host' if key == HOST else 'app ' + key}: {args.reason}")
    return EXIT_OK


def cmd_resume(args) -> int:
    from dataclasses import replace

    from agent.core.control import HOST
    from agent.service.control import control_file, update_control

    settings = _settings(args)
    key = args.app or HOST
    was: list[bool] = []

    def lift(c):
        was.append(key in c.suspended)
        return replace(c, suspended={k: v for k, v in c.suspended.items() if k != key})

    control = update_control(control_file(settings.root), lift)
    print(f"resumed {'the whole host' if key == HOST else 'app ' + key}" + ("" if was[0] else " (it was not suspended)"))
    for other in sorted(control.suspended):
        print(f"still suspended: {'the whole host' if other == HOST else 'app ' + other}")
    return EXIT_OK


def cmd_retry(args) -> int:
    from dataclasses import replace

    from agent.service.control import control_file, update_control

    settings = _settings(args)
    lifted: list[str] = []

    def lift(c):
        lifted.extend(a for a in c.quarantined if args.app in (None, a))
        return replace(c, quarantined={a: q for a, q in c.quarantined.items() if a not in lifted})

    update_control(control_file(settings.root), lift)
    print(f"quarantine lifted: {', '.join(sorted(lifted))}; the next reconcile retries" if lifted
          else "nothing was quarantined" + (f" for app {args.app}" if args.app else ""))
    return EXIT_OK


# command -> (its help line, what adds its options, its handler, add_parser's other arguments)
_SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[..., int], dict]] = {
    "once": ("one reconcile, then exit (0 converged/applied, 1 error)", _once, cmd_once, {}),
    "plan": ("print the plan; exit 0 converged, 2 drift, 1 error", _with_json, cmd_plan, {}),
    "validate": ("validate a state repo checkout (for its CI); exit 0 valid, 1 invalid", _validate, cmd_validate, {}),
    "status": ("applied revision, per-resource state, last error", _with_json, cmd_status, {}),
    "facts": ("print the facts the agent collects on this host", _with_json, cmd_facts, {}),
    "run": ("the daemon: poll + watch + reconcile loop, /metrics /healthz /readyz", _run, cmd_run, {}),
    "down": ("stop the embedded supervisord and everything it runs (state on disk kept)", _common, cmd_down, {}),
    "bootstrap": ("install the agent on a host over SSH and start it as a service (docs/bootstrap.md)", _bootstrap,
                  cmd_bootstrap, {"conflict_handler": "resolve"}),
    "suspend": ("stop applying changes, host-wide or for one app (drift is still reported)", _suspend, cmd_suspend, {}),
    "resume": ("apply changes again, host-wide or for one app", _resume, cmd_resume, {}),
    "retry": ("lift the quarantine of a failed revision, for every app or one", _retry, cmd_retry, {}),
}
COMMANDS = {name: handler for name, (_help, _options, handler, _extra) in _SUBCOMMANDS.items()}


def main(argv: list[str] | None = None) -> int:
    from agent.core.errors import AgentError

    try:
        args = _parser(argv).parse_args(argv)     # in the try: --help writes to stdout too
        code = COMMANDS[args.command](args)
        sys.stdout.flush()          # here, not at exit, so a reader that left is seen below
        return code
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `gitops-agent status | head -1`: the reader left. As the CPython docs advise (signal module, "Note
        # on SIGPIPE"), point stdout at /dev/null so the flush at exit cannot fail again, and exit quietly
        # with 141 (128 + SIGPIPE, what a shell reports for a tool the pipe ended). Only when stdout is what
        # broke: a broken pipe elsewhere (a socket) is a real error and keeps its traceback.
        import os
        import select

        try:
            fd = sys.stdout.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
        except (AttributeError, OSError, ValueError):   # no real stdout (replaced, closed): not ours to judge
            gone = False
        if not gone:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
        return 141


def _loaded() -> None:
    """A long command has imported and built what it runs: collect cycles again (see `console`), with the
    startup's objects frozen out of the collector's reach, as they live until exit."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def console() -> None:
    """The console script: `main` with the cyclic collector off while the command imports its modules
    (about 40 collections that find nothing, 7-9 ms of a `once` no-op), until the long commands (`once`,
    `run`, `bootstrap`) turn it back on with `_loaded`; the short ones exit first. Then exit without the
    interpreter's last full collections walking everything the run allocated (~50 ms of a `once` on a slow
    host: gc.freeze moves those objects out of the collector's reach), and without its teardown (`_exit`)."""
    gc.disable()
    code = main()
    gc.freeze()
    _exit(code)


def _exit(code: int) -> None:
    """`sys.exit(code)` minus the interpreter's teardown, which deallocates every module and what it holds
    for a process about to vanish (~5-8 ms of a `once` no-op here, against `os._exit`). What a user can see
    still happens: the atexit handlers run (logging's flush and close among them, and weakref finalizers),
    then the standard streams are flushed. A process with another thread alive (whose join the usual exit
    waits for), or whose streams cannot be flushed, exits the usual way."""
    import atexit
    import os
    import threading

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)     # CPython's; elsewhere, the usual exit
    if run_exitfuncs is None or threading.active_count() > 1:
        sys.exit(code)
    run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    console()
