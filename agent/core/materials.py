"""What a host writes for its apps besides venvs and program files (DESIGN §3a): rendered files, the secret
env files of services, the resolved env of services and jobs, and keyed digests that say what changed.

Pure: decrypted secret values and the host's digest key come in as arguments. The result holds plaintext,
so it lives in memory only: never cached, pickled, logged or printed (its reprs hide the values). What
plan, facts and status show are digests keyed with the host's own key (HMAC-SHA256): they tell that a
secret changed without letting anyone test guesses of its value.

Sealed materials: a no-op must not pay for `age` and Jinja2 in every process. A secret decrypted before
comes in as `Sealed` (its keys and the keyed digest of each value, remembered from that decryption), and
every rendering that used values comes from a `memo` of keyed digests (template and context, values by
their digests -> the output's digest), so the result has every digest and path the plan compares, and no
value or file content. Such materials plan; they cannot apply: the reconciler decrypts and renders for
real as soon as a plan has an action. Anything not in the memo raises `SealedMiss` (then the same).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from agent.core._record import record
from agent.core.errors import InvalidState, Problem
from agent.core.layout import Layout
from agent.core.model import App, DataDir, DesiredState, EnvValue, FileRef, Job, SecretRef, Service

__all__ = ["Rendered", "ResolvedEnv", "Materials", "Sealed", "SealedMiss", "materialize", "template_context",
           "template_problems", "digest", "inputs_line", "seal", "secret_memo_key", "INPUTS_PREFIX", "NO_MATERIALS",
           "MEMO_FORMAT"]

INPUTS_PREFIX = "; inputs: "
_DIGEST_CHARS = 20          # 80 bits of a keyed digest: names a content, reveals nothing of it
# Secret values shorter than this are not replaced by *** in messages (agent.logs.MIN_SECRET_LENGTH says why).
MIN_REDACTED = 6


# Part of every memo key: bump it when rendering or env encoding changes what a digest stands for.
MEMO_FORMAT = "materials-memo/1"


def digest(key: bytes, data: bytes) -> str:
    """The keyed digest of some content (HMAC-SHA256, shortened): safe to show, to name files by, and to compare."""
    return hmac.new(key, data, hashlib.sha256).hexdigest()[:_DIGEST_CHARS]


@record
class Sealed:
    """A secret file known by what an earlier decryption on this host found: each key and the keyed digest
    of its value (what plan already shows), never the value."""

    digests: Mapping[str, str]


class SealedMiss(Exception):
    """Sealed materials need a digest the memo does not hold: decrypt and render instead."""


def seal(values: Mapping[str, str], key: bytes) -> Sealed:
    """What a decrypted secret file leaves behind for later runs: its keys and their values' digests."""
    return Sealed({k: digest(key, v.encode("utf-8")) for k, v in values.items()})


def secret_memo_key(key: bytes, ciphertext: bytes, identities: str) -> str:
    """Names one decryption: this ciphertext with these identity files (`identities`: a digest of them)."""
    return digest(key, f"{MEMO_FORMAT}\0secret\0{hashlib.sha256(ciphertext).hexdigest()}\0{identities}".encode())


def _memo_key(key: bytes, *parts: object) -> str:
    return digest(key, json.dumps([MEMO_FORMAT, *parts], sort_keys=True, ensure_ascii=False).encode("utf-8"))


@record
class Rendered:
    """One file of an app as this host must have it."""

    app: str
    name: str
    data: bytes = field(repr=False)
    digest: str = ""
    mode: int = 0o600
    path: Path = Path()         # the content-addressed version: what programs and jobs are given
    link: Path = Path()         # files/<name>: the current one, for people


@record
class ResolvedEnv:
    """A service's or job's env with its references resolved on this host.

    `plain`: literals and paths (they go into supervisord's `environment=`); `secret`: secret values, which
    reach a service only through a 0600 env file read by the launcher (never supervisord's config);
    `inputs`: what the process uses besides its venv and config, as "kind name=digest" (plan reasons)."""

    plain: tuple[tuple[str, str], ...] = ()
    secret: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    inputs: tuple[str, ...] = ()
    secret_file: Path | None = None     # the content-addressed env file of `secret` (services only)
    secret_digest: str = ""
    needs: tuple[str, ...] = ()         # plan keys of the files / data dir this env refers to

    def environ(self) -> dict[str, str]:
        """The whole env, for a process the agent starts itself (a job, a health command)."""
        return {**dict(self.plain), **dict(self.secret)}


@record
class Materials:
    files: dict[tuple[str, str], Rendered] = field(default_factory=dict)
    services: dict[str, ResolvedEnv] = field(default_factory=dict)
    jobs: dict[tuple[str, str], ResolvedEnv] = field(default_factory=dict)
    job_inputs: dict[tuple[str, str], str] = field(default_factory=dict)    # (app, job) -> digest of all its inputs
    index_passwords: dict[str, str] = field(default_factory=dict, repr=False)   # environment -> password
    secret_values: tuple[str, ...] = field(default=(), repr=False)
    key: bytes = field(default=b"", repr=False)
    sealed: bool = False        # digests and paths only (see the module doc): plans, cannot apply
    memo: dict[str, str] = field(default_factory=dict)   # memo key -> output digest, for later sealed runs

    def redact(self, text: str) -> str:
        """`text` with every known secret value, in each of its spellings (raw, repr, JSON), replaced by `***`."""
        from agent.core.redact import redact

        return redact(text, self.secret_values) if self.secret_values else text

    def digest(self, data: bytes) -> str:
        return digest(self.key, data)


NO_MATERIALS = Materials()


def template_context(host: str, groups: Iterable[str], labels: Mapping[str, str], app: App, data_dir: str,
                     secrets: object) -> dict:
    """What a template sees (DESIGN §3a): host, app, services and secrets, as plain values."""
    return {
        "host": {"name": host, "groups": list(groups), "labels": dict(labels)},
        "app": {"name": app.name, "data_dir": data_dir},
        "services": {s.name: {"port": s.port, "processes": s.processes} for s in app.services},
        "secrets": secrets,
    }


def template_problems(app: App, hosts: Iterable[tuple[str, tuple[str, ...], Mapping[str, str]]],
                      data_dir: str) -> list[Problem]:
    """Render every template of `app` for each host that runs it, with placeholder secrets (the state repo's
    CI has no key): syntax errors, undefined names and sandbox escapes are found before a host sees them."""
    from agent.core.render.files import TemplateProblem, placeholder_secrets, render_template

    templates = [f for f in app.files if f.template is not None]
    if not templates:
        return []
    fake = placeholder_secrets({s.name: None for s in app.secrets})
    found: dict[tuple, Problem] = {}
    for host, groups, labels in hosts:
        context = template_context(host, groups, labels, app, data_dir, fake)
        for spec in templates:
            try:
                render_template(spec.template, spec.display, context)
            except TemplateProblem as exc:
                problem = Problem(spec.display, exc.line, f"files.{spec.name}", exc.message)
                found.setdefault((spec.display, exc.line, exc.message), problem)
    return list(found.values())


def inputs_line(inputs: Iterable[str]) -> str:
    """The program file's comment naming what a service uses besides venv and config (for plan reasons)."""
    items = sorted(inputs)
    return INPUTS_PREFIX + ", ".join(items) + "\n" if items else ""


def materialize(desired: DesiredState, layout: Layout,
                secrets: Mapping[str, Mapping[str, Mapping[str, str] | Sealed]], key: bytes,
                memo: Mapping[str, str] | None = None) -> Materials:
    """Render files and resolve env values for every app of `desired`, with `secrets` (app -> secret name ->
    key -> value, decrypted on this host) and the host's digest `key`. InvalidState (every problem, each
    naming its file) for a template that fails or a secret key that does not exist.

    Given a `memo`, the result is sealed: secrets may be `Sealed`, every rendering's digest comes from the
    memo (SealedMiss if one is not there) and nothing is rendered. Without one, the result's `memo` holds
    what a later sealed run needs."""
    sealed = memo is not None
    if not sealed and any(isinstance(s, Sealed) for app_secrets in secrets.values() for s in app_secrets.values()):
        raise ValueError("a Sealed secret needs a memo (sealed materials)")
    problems: list[Problem] = []
    files: dict[tuple[str, str], Rendered] = {}
    services: dict[str, ResolvedEnv] = {}
    jobs: dict[tuple[str, str], ResolvedEnv] = {}
    job_inputs: dict[tuple[str, str], str] = {}
    passwords: dict[str, str] = {}
    values: set[str] = set()
    new_memo: dict[str, str] = {}

    def remembered(memo_key: str, make: Callable[[], bytes]) -> tuple[bytes, str]:
        """(content, digest): made from values, or when sealed only the digest, from the memo."""
        if sealed:
            if memo_key not in memo:
                raise SealedMiss(memo_key)
            return b"", memo[memo_key]
        data = make()
        new_memo[memo_key] = digest(key, data)
        return data, new_memo[memo_key]

    for app in desired.apps:
        app_secrets = secrets.get(app.name, {})
        plain_secrets = {} if sealed else {n: dict(v) for n, v in app_secrets.items()}
        value_digests = {n: dict(v.digests) if isinstance(v, Sealed) else seal(v, key).digests
                         for n, v in app_secrets.items()}
        values.update(v for kv in plain_secrets.values() for v in kv.values() if len(v) >= MIN_REDACTED)
        data_dir = str(layout.data(app.name))

        def context() -> dict:
            from agent.core.render.files import secrets_context     # Jinja2: only when a template is rendered

            return template_context(desired.host, desired.groups, dict(desired.labels), app, data_dir,
                                    secrets_context(plain_secrets))

        keyed = template_context(desired.host, desired.groups, dict(desired.labels), app, data_dir, value_digests)
        for spec in app.files:
            if spec.template is not None:
                def render(spec=spec) -> bytes:
                    from agent.core.render.files import TemplateProblem, render_template

                    try:
                        return render_template(spec.template, spec.display, context()).encode("utf-8")
                    except TemplateProblem as exc:
                        raise _TemplateFailed(exc.line, exc.message) from None

                try:
                    data, d = remembered(_memo_key(key, "file", spec.display, spec.template, keyed), render)
                except _TemplateFailed as exc:
                    problems.append(Problem(spec.display, exc.line, f"files.{spec.name}", exc.message))
                    continue
            else:
                data = spec.source or b""
                d = digest(key, data)
            files[(app.name, spec.name)] = Rendered(app.name, spec.name, data, d, spec.mode,
                                                    layout.file_version(app.name, d, spec.name),
                                                    layout.files(app.name) / spec.name)
        by_secret = {s.name: s for s in app.secrets}

        def resolve(pairs: tuple[tuple[str, EnvValue], ...], where: str) -> tuple[ResolvedEnv, list[tuple[str, str]]]:
            """The env, and its secret pairs as (name, value digest): what names the secret env file."""
            plain, secret, secret_digests, inputs, needs = [], [], [], [], []
            for name, value in pairs:
                if isinstance(value, str):
                    plain.append((name, value))
                elif isinstance(value, DataDir):
                    plain.append((name, data_dir))
                    needs.append(f"data:{app.name}")
                elif isinstance(value, FileRef):
                    rendered = files.get((app.name, value.name))
                    if rendered is None:        # its template failed: reported above
                        continue
                    plain.append((name, str(rendered.path)))
                    inputs.append(f"file {value.name}={rendered.digest}")
                    needs.append(f"file:{app.name}/{value.name}")
                elif isinstance(value, SecretRef):
                    found = value_digests.get(value.name, {})
                    if value.key not in found:
                        source = by_secret[value.name].display if value.name in by_secret else value.name
                        problems.append(Problem(source, None, "",
                                                f"has no key {value.key!r} (used by {where} env {name}); its keys: "
                                                + (", ".join(sorted(found)) or "none")))
                        continue
                    if not sealed:
                        secret.append((name, plain_secrets[value.name][value.key]))
                    secret_digests.append((name, found[value.key]))
                    inputs.append(f"secret {value}={found[value.key]}")
            return (ResolvedEnv(tuple(plain), tuple(secret), tuple(dict.fromkeys(inputs)),
                                needs=tuple(dict.fromkeys(needs))), secret_digests)

        for svc in app.services:
            env, secret_digests = resolve(svc.env, f"service {svc.name}")
            if secret_digests:
                from agent.core.render.launcher import encode_env

                _, d = remembered(_memo_key(key, "secret-env", secret_digests),
                                  lambda env=env: encode_env(dict(env.secret)))
                env = ResolvedEnv(env.plain, env.secret, env.inputs, layout.secret_env(app.name, d), d, env.needs)
            services[svc.name] = env
        for job in app.jobs:
            env, _ = resolve(job.env, f"job {job.name}")
            jobs[(app.name, job.name)] = env
            job_inputs[(app.name, job.name)] = _job_digest(key, job, desired, env)
        for env_spec in app.environments:
            creds = env_spec.index_credentials
            if creds is not None:
                found = value_digests.get(creds.password.name, {})
                if creds.password.key not in found:
                    source = by_secret[creds.password.name].display if creds.password.name in by_secret else ""
                    problems.append(Problem(source, None, "", f"has no key {creds.password.key!r} (the password of "
                                                              f"environment {env_spec.name}'s index)"))
                elif not sealed:
                    passwords[env_spec.name] = plain_secrets[creds.password.name][creds.password.key]
    if problems:
        raise InvalidState(problems)
    return Materials(files, services, jobs, job_inputs, passwords,
                     tuple(sorted(values, key=len, reverse=True)), key, sealed, new_memo)


class _TemplateFailed(Exception):
    """A template's TemplateProblem, carried out of the rendering closure (Jinja2 is imported only inside it)."""

    def __init__(self, line: int | None, message: str):
        super().__init__(message)
        self.line, self.message = line, message


def _job_digest(key: bytes, job: Job, desired: DesiredState, env: ResolvedEnv) -> str:
    """A job runs again exactly when this changes: its venv, command, user and every env value (files and
    secrets by their digests, so a value never has to be stored to be compared)."""
    venv = desired.environments[job.environment].identity if job.environment in desired.environments else ""
    parts = [venv, "\0".join(job.command), job.user or "", *(f"{k}={v}" for k, v in env.plain), *env.inputs]
    return digest(key, "\n".join(parts).encode("utf-8"))


def service_env(svc: Service, materials: Materials) -> ResolvedEnv:
    """A service's resolved env; a service with only literal values needs no materials."""
    found = materials.services.get(svc.name)
    if found is not None:
        return found
    if any(not isinstance(v, str) for _, v in svc.env):
        raise InvalidState([Problem(svc.app, None, f"services.{svc.name}.env",
                                    "refers to secrets, files or the data dir, which were not resolved for this host")])
    return ResolvedEnv(tuple((k, v) for k, v in svc.env if isinstance(v, str)))
