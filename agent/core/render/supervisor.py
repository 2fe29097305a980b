"""Render supervisord `[program:NAME]` sections: pure, deterministic, injection-proof.

Why this module is paranoid: supervisord reads its config with a `RawConfigParser` (`;`/`#` start an
inline comment when preceded by whitespace, values are stripped, one option per line), then
`%`-expands most values (and rewrites every literal `%(here)s` before that), then parses `command=`
with `shlex.split` and `environment=` with a non-POSIX `shlex.shlex` lexer that has no escapes and
strips quote characters from both ends of each value. A value that slips a newline through any of
this can define a whole new program (measured: `\\n[program:evil]\\ncommand=...` created and started
one). So every value is either encoded so that each of those layers gives back exactly the input, or
refused with `UnsafeValue` naming the field and the reason. `tests/test_supervisor_conf.py` proves the
round trip against supervisord's own parser with Hypothesis.

Encoding per field (the layers are undone in reverse order by supervisord):

- `command`: each argv element is quoted for POSIX `shlex`; `'`, `;`, `#` and `%` are kept outside
  the single quotes (`\\'`, `\\;`, `\\#`, bare `%`) so no whitespace ever precedes `;`/`#` and no
  literal `%(here)s` survives; then every `%` becomes `%%`. Any text without control characters is
  accepted.
- `environment`: each value goes inside `"..."` (or `'...'` when it holds `"`); `%` becomes `%%`.
  Refused: a value holding both quote characters, starting or ending with a quote character (the
  lexer strips those), containing `;`/`#` after whitespace (an inline comment), or `%(here)s`.
- paths and `user`: written as-is after validation (absolute paths; `%` doubled in `directory`).
- log file names: supervisord `%`-expands them twice (`saneget`, then again in
  `_processes_from_section`), so a literal `%` is written `%%%%`; the only `%(...)` left bare is the
  `%(process_num)d` the renderer itself inserts for a multi-process program, which both expansions
  know (the first one sees it because supervisord's per-process expansions share one dict).

`numprocs` > 1 (DESIGN §3a `processes: N`) adds `numprocs=N` and `process_name=%(program_name)s-
%(process_num)d` (processes `NAME:NAME-0`, `NAME:NAME-1`...; the group keeps the program's name) and
gives each process its own log files: `-%(process_num)d` goes into the file name right after the
program's name when the name starts it (`web.out.log` -> `web-%(process_num)d.out.log`), else before
the file name's first dot (or at its end). `priority` (DESIGN §3a `depends_on`): supervisord starts
lower priorities first at boot and stops in reverse. Neither line is written when unset, so a
numprocs=1 program without a priority renders byte for byte as before.

Every program also gets `GITOPS_AGENT_PROGRAM=<name>` in its environment (through the same quoting as
user values; a user value for that key is refused). Every process the program starts inherits it,
including ones that leave its process group or session (a daemonizing service), which is how the
driver finds and stops those (`agent.drivers.supervisor.leftover_pids`). Logs rotate at
`log_maxbytes` keeping `log_backups` files, so a chatty service cannot fill the disk.
"""

from __future__ import annotations

import re
import unicodedata

from agent.core._record import record
from agent.core.errors import Permanent

__all__ = [
    "ProgramSpec",
    "WebServer",
    "UnsafeValue",
    "render_program",
    "render_supervisord",
    "PROGRAM_NAME_RE",
    "ENV_KEY_RE",
    "AUTORESTART_VALUES",
    "MARKER_KEY",
    "MINFDS",
    "MAX_NUMPROCS",
    "PROCESS_NUM",
    "process_logfile",
]

PROGRAM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A POSIX-portable user name (optionally a trailing `$` as Samba uses) or a numeric uid.
_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10}")
AUTORESTART_VALUES = ("true", "false", "unexpected")
# The environment variable that names a process's program, inherited by everything it starts.
MARKER_KEY = "GITOPS_AGENT_PROGRAM"
# File descriptors the embedded supervisord (and so every program) may open, capped by the hard limit.
MINFDS = 65536
MAX_NUMPROCS = 64                   # DESIGN §3a: processes 1..64
_MAX_PRIORITY = 999                 # supervisord's default priority; ours are 1..999
# The per-process part of a multi-process program's log file names (expanded by supervisord).
PROCESS_NUM = "%(process_num)d"
_PROCESS_NAME = "%(program_name)s-" + PROCESS_NUM
_MB = 1024 * 1024

# argv words made only of these need no quoting for shlex (and are harmless in the ini line).
_BARE_WORD_RE = re.compile(r"[A-Za-z0-9@+=:,./_-]+")
# Characters kept outside single quotes in argv words (see module docstring).
_OUTSIDE_QUOTES_RE = re.compile(r"([';#%])")
# Unicode categories refused everywhere: controls (NUL, \n, \r, NEL...), surrogates (not encodable
# as UTF-8), line and paragraph separators (line breaks for `str.splitlines`).
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_HERE = "%(here)s"


class UnsafeValue(Permanent, ValueError):
    """A ProgramSpec value cannot be written to supervisord's config without changing its meaning.

    A `ValueError` (it is bad input) and `Permanent` (retrying cannot help until the spec changes).
    """

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


@record
class ProgramSpec:
    """One supervisord program, as the planner wants it; one program per group.

    `numprocs` > 1 runs that many copies (`NAME:NAME-0`...), each with its own log files derived from
    `stdout_logfile`/`stderr_logfile` (see `process_logfile`). `priority`: boot start order (lower
    first), None for supervisord's default (999).
    """

    name: str
    command: tuple[str, ...]
    directory: str | None = None
    environment: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    stdout_logfile: str | None = None
    stderr_logfile: str | None = None
    startsecs: int = 1
    startretries: int = 3
    stopwaitsecs: int = 10
    autorestart: str = "unexpected"
    log_maxbytes: int = 10 * _MB        # per log file; rotated beyond that
    log_backups: int = 3                # rotated files kept (<log>.1 ... <log>.N)
    umask: str = "022"                  # the programs' own (the embedded supervisord runs with 077)
    numprocs: int = 1                   # 1..64
    priority: int | None = None         # 1..999


def render_program(spec: ProgramSpec) -> str:
    """Return the `[program:NAME]` section for `spec`, or raise UnsafeValue.

    Deterministic (environment sorted by key) so equal specs give byte-equal files and the planner can
    compare file text to detect change.
    """
    name = _program_name(spec.name)
    numprocs = _int("numprocs", spec.numprocs, minimum=1, maximum=MAX_NUMPROCS)
    lines = [
        "; managed by gitops-agent: edits are overwritten",
        f"[program:{name}]",
        f"command={_command(spec.command)}",
    ]
    if numprocs > 1:
        lines += [f"process_name={_PROCESS_NAME}", f"numprocs={numprocs}"]
    if spec.directory is not None:
        lines.append(f"directory={_directory(spec.directory)}")
    if spec.user is not None:
        lines.append(f"user={_user(spec.user)}")
    lines.append(f"environment={_environment(spec.environment, marker=name)}")
    lines += [
        f"umask={_umask(spec.umask)}",
        "autostart=true",
    ]
    if spec.priority is not None:
        lines.append(f"priority={_int('priority', spec.priority, minimum=1, maximum=_MAX_PRIORITY)}")
    lines += [
        f"autorestart={_autorestart(spec.autorestart)}",
        f"startsecs={_int('startsecs', spec.startsecs, minimum=1)}",
        f"startretries={_int('startretries', spec.startretries, minimum=0)}",
        f"stopwaitsecs={_int('stopwaitsecs', spec.stopwaitsecs, minimum=0)}",
        "stopasgroup=true",
        "killasgroup=true",
        "redirect_stderr=false",
    ]
    maxbytes = _size("log_maxbytes", spec.log_maxbytes)
    backups = _int("log_backups", spec.log_backups, minimum=0)
    for stream in ("stdout", "stderr"):
        path = getattr(spec, f"{stream}_logfile")
        if path is not None:
            lines += [
                f"{stream}_logfile={_program_logfile(f'{stream}_logfile', path, name, numprocs)}",
                f"{stream}_logfile_maxbytes={maxbytes}",
                f"{stream}_logfile_backups={backups}",
            ]
    return "\n".join(lines) + "\n"


@record
class WebServer:
    """supervisord's own web UI and XML-RPC over HTTP (`[inet_http_server]`), with HTTP basic auth.

    Only the SHA-1 of the password is written (`password={SHA}<hex>`, which supervisord accepts), so the
    config never holds the password itself."""

    host: str
    port: int
    username: str
    password_sha1: str          # hex


def render_supervisord(
    *, socket_path: str, pid_path: str, log_dir: str, include_glob: str = "programs/*.conf",
    minfds: int = MINFDS, web: WebServer | None = None,
) -> str:
    """Return the embedded supervisord's main config.

    Paths are validated like program values: a root path holding `%`, a newline or `" ;"` must not be
    able to change this file's meaning either. `include_glob` is relative to the config's directory
    (supervisord joins it with that directory and splits the option on whitespace).

    `minfds`: supervisord raises its soft RLIMIT_NOFILE to this (its programs inherit it; the default
    1024 is too few for a busy server). The caller caps it at the hard limit: above it, supervisord
    refuses to start unless it runs as root. `umask=077`: supervisord creates the log files (and the
    rotated ones) private, since a service's output can hold secrets; programs set their own umask.
    """
    sock = _path("unix_http_server.file", socket_path)
    pid = _path("supervisord.pidfile", pid_path)
    logs = _path("supervisord.childlogdir", log_dir)
    logfile = _logfile("supervisord.logfile", log_dir.rstrip("/") + "/supervisord.log")
    if not re.fullmatch(r"[A-Za-z0-9_./*-]+", include_glob) or include_glob.startswith("/"):
        raise UnsafeValue("include.files", "must be a relative glob of plain characters")
    inet: list[str] = []
    if web is not None:
        if not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", web.host) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", web.username):
            raise UnsafeValue("inet_http_server", "host and username must be plain names")
        if not re.fullmatch(r"[0-9a-f]{40}", web.password_sha1):
            raise UnsafeValue("inet_http_server.password", "must be a SHA-1 hex digest")
        port = _int("inet_http_server.port", web.port, minimum=1)
        inet = ["[inet_http_server]", f"port={web.host}:{port}", f"username={web.username}",
                f"password={{SHA}}{web.password_sha1}", ""]
    return "\n".join(
        [
            "; managed by gitops-agent: edits are overwritten",
            "[unix_http_server]",
            f"file={sock}",
            "chmod=0700",
            "",
            *inet,
            "[supervisord]",
            f"logfile={logfile}",
            "logfile_maxbytes=10MB",
            "logfile_backups=5",
            "loglevel=info",
            f"minfds={_int('supervisord.minfds', minfds, minimum=1)}",
            "umask=077",
            f"pidfile={pid}",
            f"childlogdir={logs}",
            "nodaemon=false",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]",
            f"serverurl=unix://{sock}",
            "",
            "[include]",
            f"files={include_glob}",
            "",
        ]
    )


# --- fields -------------------------------------------------------------------------------------


def _program_name(name: object) -> str:
    if not isinstance(name, str) or not PROGRAM_NAME_RE.fullmatch(name):
        raise UnsafeValue("name", f"{name!r} must match {PROGRAM_NAME_RE.pattern}")
    return name


def _command(argv: object) -> str:
    if not isinstance(argv, tuple) or not argv:
        raise UnsafeValue("command", "must be a non-empty tuple of strings")
    words = []
    for i, arg in enumerate(argv):
        field = f"command[{i}]"
        _check_text(field, arg)
        words.append(_quote_arg(arg))
    if not argv[0].startswith("/"):
        raise UnsafeValue("command[0]", f"{argv[0]!r} must be an absolute path")
    return _ini_safe("command", " ".join(words).replace("%", "%%"))


def _quote_arg(arg: str) -> str:
    """Quote one argv word for POSIX shlex without `'`, `;`, `#` or `%` inside the quotes."""
    if _BARE_WORD_RE.fullmatch(arg):
        return arg
    parts = []
    for run in _OUTSIDE_QUOTES_RE.split(arg):
        if not run:
            continue
        if run == "%":
            parts.append("%")
        elif run in ("'", ";", "#"):
            parts.append("\\" + run)
        else:
            parts.append(f"'{run}'")
    return "".join(parts) or "''"


def _environment(pairs: object, marker: str) -> str:
    if not isinstance(pairs, tuple):
        raise UnsafeValue("environment", "must be a tuple of (key, value) pairs")
    seen: dict[str, str] = {MARKER_KEY: _env_value(f"environment.{MARKER_KEY}", marker)}
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise UnsafeValue("environment", f"{pair!r} is not a (key, value) pair")
        key, value = pair
        if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key):
            raise UnsafeValue("environment", f"key {key!r} must match {ENV_KEY_RE.pattern}")
        if key == MARKER_KEY:
            raise UnsafeValue(f"environment.{key}", "reserved: gitops-agent sets it to the program's name")
        if key in seen:
            raise UnsafeValue(f"environment.{key}", "key given twice")
        seen[key] = _env_value(f"environment.{key}", value)
    rendered = ",".join(f"{key}={seen[key]}" for key in sorted(seen))
    return _ini_safe("environment", rendered)


def _env_value(field: str, value: object) -> str:
    """Quote one value for supervisord's non-POSIX environment lexer, or refuse it.

    That lexer ends a quoted token at the first matching quote, has no escapes, and strips every
    quote character from both ends of the token: so the value must avoid the quote we wrap it in and
    must not begin or end with either quote character.
    """
    _check_text(field, value)
    assert isinstance(value, str)
    if value[:1] in ("'", '"') or value[-1:] in ("'", '"'):
        raise UnsafeValue(field, "cannot start or end with a quote character (supervisord strips it)")
    if '"' not in value:
        quoted = f'"{value}"'
    elif "'" not in value:
        quoted = f"'{value}'"
    else:
        why = "cannot hold both ' and \" (supervisord's environment syntax has no escapes)"
        raise UnsafeValue(field, why)
    return _ini_safe(field, quoted.replace("%", "%%"))


def _directory(path: object) -> str:
    return _path("directory", path)


def _path(field: str, path: object) -> str:
    _check_text(field, path)
    assert isinstance(path, str)
    if not path.startswith("/"):
        raise UnsafeValue(field, f"{path!r} must be an absolute path")
    return _ini_safe(field, path.replace("%", "%%"))


def _logfile(field: str, path: object) -> str:
    """supervisord's own log file: expanded once like other paths, but `%` is refused (as it always was:
    the name is built from the root, and keeping it plain keeps the main config byte-identical)."""
    _check_text(field, path)
    assert isinstance(path, str)
    if "%" in path:
        raise UnsafeValue(field, "'%' is not allowed in supervisord's log file name")
    return _path(field, path)


def _program_logfile(field: str, path: object, name: str, numprocs: int) -> str:
    """A program's log file: every literal `%` becomes `%%%%` (supervisord expands the value twice);
    with numprocs > 1 the bare `PROCESS_NUM` goes into the file name (`process_logfile`)."""
    _check_text(field, path)
    assert isinstance(path, str)
    if not path.startswith("/"):
        raise UnsafeValue(field, f"{path!r} must be an absolute path")
    head, tail = _split_logfile(path, name) if numprocs > 1 else (path, "")
    rendered = head.replace("%", "%%%%")
    if numprocs > 1:
        rendered += "-" + PROCESS_NUM + tail.replace("%", "%%%%")
    return _ini_safe(field, rendered)


def _split_logfile(path: str, name: str) -> tuple[str, str]:
    """Where `-N` goes in a per-process log file name: after the program's name when the file name
    starts with it (`web.out.log`, also for names with dots), else before the file name's first dot."""
    directory, _, base = path.rpartition("/")
    if base == name or base.startswith(name + "."):
        cut = len(name)
    else:
        cut = base.find(".") if "." in base else len(base)
    return f"{directory}/{base[:cut]}", base[cut:]


def process_logfile(path: str, name: str, process_num: int) -> str:
    """The log file process `process_num` of multi-process program `name` writes, for the log file
    `path` of its spec: `process_logfile("/l/web.out.log", "web", 1) == "/l/web-1.out.log"`."""
    head, tail = _split_logfile(path, name)
    return f"{head}-{process_num}{tail}"


def _user(user: object) -> str:
    if not isinstance(user, str) or not _USER_RE.fullmatch(user):
        raise UnsafeValue("user", f"{user!r} is not a user name or numeric uid")
    return user


def _autorestart(value: object) -> str:
    if value not in AUTORESTART_VALUES:
        raise UnsafeValue("autorestart", f"{value!r} must be one of {', '.join(AUTORESTART_VALUES)}")
    assert isinstance(value, str)
    return value


def _umask(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
        raise UnsafeValue("umask", f"{value!r} must be an octal umask such as 022")
    return value


def _size(field: str, value: object) -> str:
    """A byte count as supervisord reads it: `10MB` when it is whole megabytes, else plain bytes."""
    n = _int(field, value, minimum=0)
    return f"{n // _MB}MB" if n and n % _MB == 0 else str(n)


def _int(field: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        why = " (startsecs=0 means supervisord never counts retries)" if field == "startsecs" else ""
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise UnsafeValue(field, f"{value!r} must be an integer {bound}{why}")
    if maximum is not None and value > maximum:
        raise UnsafeValue(field, f"{value!r} must be an integer in {minimum}..{maximum}")
    return value


# --- checks shared by every field -----------------------------------------------------------------


def _check_text(field: str, value: object) -> None:
    """Refuse non-strings and characters that end or split a line anywhere in the parsing chain."""
    if not isinstance(value, str):
        raise UnsafeValue(field, f"must be a string, not {type(value).__name__}")
    for ch in value:
        if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES:
            raise UnsafeValue(field, f"control character U+{ord(ch):04X} not allowed")


def _ini_safe(field: str, rendered: str) -> str:
    """Check that configparser and supervisord's `%(here)s` rewrite give `rendered` back unchanged.

    configparser strips values and treats `;`/`#` after whitespace as the start of a comment; and
    supervisord replaces every literal `%(here)s` in every value before expanding `%`.
    """
    if rendered != rendered.strip():
        raise UnsafeValue(field, "leading or trailing whitespace would be stripped")
    for i, ch in enumerate(rendered):
        if ch in ";#" and i > 0 and rendered[i - 1].isspace():
            raise UnsafeValue(field, f"{ch!r} after whitespace would start an ini comment")
    if _HERE in rendered:
        raise UnsafeValue(field, "the text %(here)s would be rewritten by supervisord")
    return rendered
