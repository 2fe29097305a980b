"""Render an app's file templates (DESIGN §3a "Files"): Jinja2, sandboxed, strict, byte-exact.

Why this shape:

- The agent renders these with the age identity and every secret in memory, often as root, so a
  template must not reach Python: `ImmutableSandboxedEnvironment` (no `__class__`/`__globals__` walk,
  no mutating `list.append`/`dict.update`, no `str.format` attribute tricks).
- A typo must fail the revision, not write an empty string into a config file: `StrictUndefined`, and
  the error names the path (`secrets.django.NOPE`), with a "did you mean" where one is close.
- A template is one file: there is no loader, and `include`/`import`/`extends` are refused when the
  template is parsed, with their line, instead of failing at render time with "no loader".
- Errors never carry a value of the context. Messages are built from names and type names only; a
  message that came from Python (a `TypeError` inside a filter) has every secret value, and every
  string of the context, replaced by `***`; the exception is raised outside the `except` block so no
  chained traceback keeps the original.
- One short expression must not eat the host: `*`, `**`, `+` and `%` are intercepted and refuse a
  result above 1 MiB (strings, lists) or 65536 bits (integers) before computing it; so are the
  padding and widening calls (`center`, `ljust`, `rjust`, `zfill`, `expandtabs`, `replace`, `join`,
  `translate`, `str.format` widths, the `center`/`indent`/`format`/`batch`/`slice`/`replace`/`join`
  filters); `range` is capped by Jinja's sandbox (100000); `lipsum` is removed. The output is
  counted while it is produced and refused above 1 MiB. Not bounded: CPU time of nested loops and
  memory built up over many statements (`{% set b = a ~ a %}` repeated); the revision's author can
  already run any command as a service, so this guards against mistakes, not a determined author.
- Output is byte-exact: the trailing newline is kept, and a template written with CRLF line ends
  renders CRLF (Jinja normalises line ends to one sequence; it is chosen from the source).
- Autoescape only for HTML/XML output: names ending `.html`, `.htm`, `.xml` (also with `.j2`,
  `.jinja`, `.jinja2` after them), so a TOML or INI file is never HTML-escaped.

`placeholder_secrets` lets `validate` (CI, no age key) render every template: each secret key renders
as `<secret NAME/KEY>`; `secrets_context` is what a host renders with after decrypting.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import string
from collections.abc import Iterable, Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import missing, select_autoescape

from agent.core.errors import Permanent

__all__ = [
    "MAX_INT_BITS",
    "MAX_OUTPUT_BYTES",
    "TemplateProblem",
    "placeholder_secrets",
    "render_template",
    "secrets_context",
]

MAX_OUTPUT_BYTES = 1 << 20      # a rendered file, and any one string or list a template builds
MAX_INT_BITS = 1 << 16          # far above any port or size; `10 ** (10 ** 10)` is refused at once
_MAX_MESSAGE = 300
_FILENAME = "<template {}>"     # the code filename Jinja gives template frames: found again in tracebacks
_TEMPLATE_SUFFIXES = (".j2", ".jinja", ".jinja2")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?[diouxXeEfFgGcrsa%]")
_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?[a-zA-Z%]?\Z", re.DOTALL)


class TemplateProblem(Permanent, ValueError):
    """A template cannot be rendered. `line` is the template's line (None when unknown); the file is
    the caller's to name. The message never holds a value of the render context."""

    def __init__(self, message: str, line: int | None = None):
        self.message = message
        self.line = line
        super().__init__(message if line is None else f"line {line}: {message}")


class _Refused(Exception):
    """Raised inside rendering for a guarded operation; its message is ours, never a value."""


class _SecretMisuse(TypeError):
    """A whole secret (or `secrets`) used as a value: only `secrets.NAME.KEY` is a string."""


# ---------------------------------------------------------------------------------------------------
# secrets as templates see them


class _SecretKeys:
    """`secrets.NAME`: its keys are looked up by `.KEY` or `['KEY']`. Placeholder mode (validate time)
    answers `<secret NAME/KEY>` for any key (or for the known keys). No public attribute, so a key
    named like a method still resolves, and the sandbox blocks every `_` attribute."""

    __slots__ = ("_keys", "_name", "_values")
    __iter__ = None             # not iterable: iteration would otherwise probe __getitem__(0)

    def __init__(self, name: str, values: Mapping[str, str] | None, keys: frozenset[str] | None):
        self._name = name
        self._values = values
        self._keys = keys

    def __getitem__(self, key: Any) -> str:
        if not isinstance(key, str):
            raise KeyError(key)
        if self._values is not None:
            return self._values[key]
        if _KEY.match(key) and (self._keys is None or key in self._keys):
            return f"<secret {self._name}/{key}>"
        raise KeyError(key)

    def _known_keys(self) -> list[str]:
        if self._values is not None:
            return sorted(self._values)
        return sorted(self._keys or ())

    def __str__(self) -> str:
        raise _SecretMisuse(f"secrets.{self._name} is a whole secret: use secrets.{self._name}.KEY")

    def __repr__(self) -> str:
        return f"<secret {self._name}>"


class _Secrets:
    """`secrets`: NAME -> `_SecretKeys`."""

    __slots__ = ("_secrets",)
    __iter__ = None

    def __init__(self, secrets: Mapping[str, _SecretKeys]):
        self._secrets = dict(secrets)

    def __getitem__(self, name: Any) -> _SecretKeys:
        if not isinstance(name, str):
            raise KeyError(name)
        return self._secrets[name]

    def _all_values(self) -> list[str]:
        return [v for keys in self._secrets.values() if keys._values is not None
                for v in keys._values.values() if isinstance(v, str)]

    def __str__(self) -> str:
        raise _SecretMisuse("secrets is not a value: use secrets.NAME.KEY")

    def __repr__(self) -> str:
        return f"<secrets {', '.join(sorted(self._secrets))}>"


def placeholder_secrets(names: Mapping[str, Iterable[str] | None]) -> object:
    """The `secrets` context value for validation without a key: NAME -> its keys, or None when the
    keys are unknown (then any key of a declared secret renders `<secret NAME/KEY>`). An undeclared
    NAME, or a key outside known keys, is an undefined-name error."""
    return _Secrets({name: _SecretKeys(name, None, None if keys is None else frozenset(keys))
                     for name, keys in names.items()})


def secrets_context(values: Mapping[str, Mapping[str, str]]) -> object:
    """The `secrets` context value after decryption: `secrets.NAME.KEY` / `secrets.NAME['KEY']`."""
    return _Secrets({name: _SecretKeys(name, dict(keys), None) for name, keys in values.items()})


# ---------------------------------------------------------------------------------------------------
# undefined names: safe, structured messages


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


def _show(name: Any) -> str:
    """A looked-up name as a message may show it. A key can be computed from a value (a secret used
    as a key), so only plain names are quoted; a secret value that is a plain name is still scrubbed
    by `_redact`."""
    if isinstance(name, str):
        return repr(name) if _PLAIN_NAME.match(name) else "(a key that is not a plain name, not shown)"
    if isinstance(name, int):
        return repr(name)
    return f"(a {type(name).__name__} key, not shown)"


def _suggest(name: Any, candidates: Iterable[Any]) -> str:
    if not isinstance(name, str) or not _PLAIN_NAME.match(name):
        return ""
    close = difflib.get_close_matches(name, [c for c in candidates if isinstance(c, str)], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _undefined_message(hint: str | None, obj: Any, name: Any, exc: type) -> str:
    kind = type(obj).__name__
    shown = _show(name)
    if issubclass(exc, SecurityError):
        return f"not allowed in the sandbox: attribute {shown} of a {kind} object"
    if hint:
        return hint
    if obj is missing:
        return f"{shown} is undefined"   # the suggestion needs the context: added by render_template
    if isinstance(obj, _Secrets):
        declared = ", ".join(sorted(obj._secrets)) or "none"
        path = f"secrets.{name}" if isinstance(name, str) and _KEY.match(name) else "secrets[...]"
        return (f"{path} is undefined: no secret {shown} is declared (declared: {declared})"
                + _suggest(name, obj._secrets))
    if isinstance(obj, _SecretKeys):
        path = f"secrets.{obj._name}.{name}" if isinstance(name, str) and _KEY.match(name) else f"secrets.{obj._name}[...]"
        return f"{path} is undefined: secret {obj._name!r} has no key {shown}" + _suggest(name, obj._known_keys())
    if isinstance(obj, Mapping):
        return f"{kind} has no key or attribute {shown}" + _suggest(name, list(obj.keys()))
    if not isinstance(name, str):
        return f"{kind} has no element {shown}"
    return f"{kind} object has no attribute {shown}" + _suggest(name, [a for a in dir(obj) if not a.startswith("_")])


class _Undefined(StrictUndefined):
    """StrictUndefined whose error says which name was missing, with type names only (Jinja's own
    message can include a repr, and the object can be a secret)."""

    __slots__ = ()
    __repr__ = StrictUndefined._fail_with_undefined_error   # `{{ [host.nme] }}` must not print "[Undefined]"

    def __init__(self, hint: str | None = None, obj: Any = missing, name: Any = None,
                 exc: type = UndefinedError):
        super().__init__(hint, obj, name, exc)
        top = name if obj is missing and not hint else None

        def make(_jinja_message: str) -> Exception:   # built only when used: `is defined` stays cheap
            error = exc(_undefined_message(hint, obj, name, exc))
            error.gitops_top_name = top   # for "did you mean" over the context's names
            return error

        self._undefined_exception = make


# ---------------------------------------------------------------------------------------------------
# resource guards


def _limit(size: int, what: str, cap: int = MAX_OUTPUT_BYTES, unit: str = "characters or items") -> None:
    if size > cap:
        raise _Refused(f"{what} would make {size} {unit} (the limit is {cap})")


def _sized(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


def _check_printf(fmt: Any, what: str = "'%' formatting") -> None:
    if not isinstance(fmt, str):
        return
    for width, precision in _PRINTF.findall(fmt):
        if "*" in (width, precision):
            raise _Refused(f"{what}: a '*' width or precision is not supported in templates")
        _limit(int(width or 0), f"{what} width")
        _limit(int(precision or 0), f"{what} precision")


def _check_format(fmt: str) -> None:
    for _literal, field, spec, _conversion in string.Formatter().parse(fmt):
        if field is None or not spec:
            continue
        if "{" in spec:
            raise _Refused("str.format: a nested '{...}' in a format spec is not supported in templates")
        m = _FORMAT_SPEC.match(spec)
        if m:
            _limit(int(m.group(1) or 0), "str.format width")
            _limit(int(m.group(2) or 0), "str.format precision")


def _check_binop(op: str, left: Any, right: Any) -> None:
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            size = _sized(seq)
            if size is not None and isinstance(n, int):
                _limit(size * max(n, 0), "'*'")
        if isinstance(left, int) and isinstance(right, int):
            _limit(left.bit_length() + right.bit_length(), "'*'", MAX_INT_BITS, "bits")
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            _limit(right * abs(left).bit_length(), "'**'", MAX_INT_BITS, "bits")
    elif op == "+":
        a, b = _sized(left), _sized(right)
        if a is not None and b is not None:
            _limit(a + b, "'+'")
    elif op == "%":
        _check_printf(left)


def _str_growth(method: str, s: str, args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    """Result size of a widening str method, computed before calling it (None: not guarded)."""
    if method in ("center", "ljust", "rjust", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        return width if isinstance(width, int) else None
    if method == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        return len(s) + s.count("\t") * size if isinstance(size, int) else None
    if method == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        hits = len(s) + 1 if old == "" else s.count(old)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        return len(s) + hits * max(len(new) - len(old), 0)
    if method == "join" and args and isinstance(args[0], (list, tuple)):
        items = args[0]
        return len(s) * max(len(items) - 1, 0) + sum(len(i) for i in items if isinstance(i, str))
    if method == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        return len(s) * max(longest, 1)
    return None


def _guard_filters(filters: dict[str, Any]) -> None:
    """Wrap Jinja's widening filters with a size check (functools.wraps keeps their pass_* marks)."""

    def wrap(name: str, check):
        original = filters[name]
        skip = 1 if getattr(original, "jinja_pass_arg", None) else 0   # eval context / environment first

        @functools.wraps(original)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            checked = check(*args[skip:], **kwargs)   # a check may hand on a consumed iterator as a list
            return original(*args[:skip], *(checked or args[skip:]), **kwargs)

        filters[name] = guarded

    def center(value: Any, width: Any = 80, *rest: Any, **kw: Any) -> None:
        width = kw.get("width", width)
        if isinstance(width, int):
            _limit(width, "the center filter")

    def indent(s: Any, width: Any = 4, *rest: Any, **kw: Any) -> None:
        width = kw.get("width", width)
        text = str(s)
        pad = width if isinstance(width, int) else len(str(width))
        _limit(len(text) + (text.count("\n") + 1) * max(pad, 0), "the indent filter")

    def fmt(value: Any, *rest: Any, **kw: Any) -> None:
        _check_printf(value, "the format filter")

    def chunks(name: str, keyword: str):
        def check(value: Any, count: Any = 1, *rest: Any, **kw: Any) -> None:
            count = kw.get(keyword, count)
            if isinstance(count, int):
                _limit(count, f"the {name} filter", 100_000, "parts")
        return check

    def replace(s: Any, old: Any = "", new: Any = "", count: Any = None, **kw: Any) -> None:
        old, new, count = kw.get("old", old), kw.get("new", new), kw.get("count", count)
        size = _str_growth("replace", str(s), (str(old), str(new), -1 if count is None else count), {})
        _limit(size or 0, "the replace filter")

    def join(value: Any, *rest: Any, **kw: Any) -> tuple | None:
        if isinstance(value, (str, Mapping)):
            return None
        items = list(value)
        d = kw.get("d", rest[0] if rest else "")
        _limit(len(str(d)) * max(len(items) - 1, 0)
               + sum(len(i) for i in items if isinstance(i, str)), "the join filter")
        return (items, *rest)

    wrap("center", center)
    wrap("indent", indent)
    wrap("format", fmt)
    wrap("batch", chunks("batch", "linecount"))
    wrap("slice", chunks("slice", "slices"))
    wrap("replace", replace)
    wrap("join", join)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox plus size guards on the operators and calls that can widen a value."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        if not self.is_safe_callable(obj):
            raise _Refused("not allowed in the sandbox: calling a function marked unsafe")
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str) and callable(obj):
            size = _str_growth(getattr(obj, "__name__", ""), owner, args, kwargs)
            if size is not None:
                _limit(size, f"str.{obj.__name__}")
        return super().call(context, obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:  # Jinja >= 3.1.5
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt = value.__self__

        @functools.wraps(wrapper)
        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt)
            return wrapper(*args, **kwargs)

        return checked

    def format_string(self, s: str, args: Any, kwargs: Any, format_func: Any = None) -> str:  # Jinja < 3.1.5
        _check_format(s)
        return super().format_string(s, args, kwargs, format_func)  # type: ignore[misc]


def _autoescape(name: str | None) -> bool:
    name = name or ""
    for suffix in _TEMPLATE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return select_autoescape(enabled_extensions=("html", "htm", "xml"), disabled_extensions=(),
                             default_for_string=False, default=False)(name)


@functools.cache
def _environment(newline: str) -> _Sandbox:
    env = _Sandbox(undefined=_Undefined, keep_trailing_newline=True, autoescape=_autoescape,
                   newline_sequence=newline, loader=None)
    env.globals.pop("lipsum", None)    # lipsum(n=10**9) would spin; no use in a config file
    _guard_filters(env.filters)
    return env


# ---------------------------------------------------------------------------------------------------
# rendering


_NOT_ONE_FILE = {
    nodes.Extends: "extends", nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import",
}


def _context_strings(value: Any, out: set[str], depth: int = 0) -> None:
    """Every string value in the context (bounded walk; keys are names, not values)."""
    if depth > 6 or len(out) > 10_000:
        return
    if isinstance(value, str):
        out.add(value)
    elif isinstance(value, _Secrets):
        out.update(value._all_values())
    elif isinstance(value, Mapping):
        for v in value.values():
            _context_strings(v, out, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _context_strings(v, out, depth + 1)


def _secret_values(context: Mapping[str, Any]) -> set[str]:
    found: set[str] = set()
    for value in context.values():
        if isinstance(value, _Secrets):
            found.update(value._all_values())
    return found


def _spellings(value: str) -> set[str]:
    """A value as it may appear in Python's text: raw, inside repr() quotes, JSON-escaped."""
    return {value, repr(value)[1:-1], json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]}


def _redact(message: str, secrets: Iterable[str], others: Iterable[str] = ()) -> str:
    """Replace, longest first, by `***`: every secret value in any of its spellings (anywhere when it
    has four characters or more, else as a whole word, so a secret `a` does not blank every 'a'), and
    for text Python wrote, every other string value of the context (two characters or more) standing
    as a whole word."""
    anywhere = {sp for v in secrets if len(v) >= 4 for sp in _spellings(v)}
    words = {sp for v in secrets if 0 < len(v) < 4 for sp in _spellings(v)}
    words |= {sp for v in others if len(v) >= 2 for sp in _spellings(v)}
    for value in sorted(anywhere | words, key=len, reverse=True):
        if value in anywhere:
            message = message.replace(value, "***")
        else:
            message = re.sub(rf"(?<!\w){re.escape(value)}(?!\w)", "***", message)
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return message


def _template_line(tb: Any, filename: str) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno     # the innermost template frame (a macro's line, not its caller's)
        tb = tb.tb_next
    return line


def _describe(error: Exception, context: Mapping[str, Any], env: _Sandbox, secrets: set[str]) -> str:
    if isinstance(error, (_Refused, _SecretMisuse)):
        return _redact(str(error), secrets)
    if isinstance(error, (UndefinedError, SecurityError)):
        message = str(error)
        top = getattr(error, "gitops_top_name", None)
        if top is not None:
            message += _suggest(top, [*context, *env.globals])
        return _redact(message, secrets)
    others: set[str] = set()
    _context_strings(dict(context), others)
    detail = _redact(str(error), secrets, others)
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _paused_line(stream: Any, template: Any) -> int | None:
    """The template line whose output is being produced: the innermost template generator's line."""
    gen, line = stream, None
    while gen is not None:
        frame = getattr(gen, "gi_frame", None)
        if frame is not None and frame.f_globals.get("__jinja_template__") is template:
            line = template.get_corresponding_lineno(frame.f_lineno)
        gen = getattr(gen, "gi_yieldfrom", None)
    return line


def _compile(source: str, name: str) -> tuple[_Sandbox, Any, str]:
    newline = "\r\n" if "\r\n" in source and "\n" not in source.replace("\r\n", "") else "\n"
    env = _environment(newline)
    filename = _FILENAME.format(name)
    ast = env.parse(source, name, filename)
    for node in ast.find_all(tuple(_NOT_ONE_FILE)):
        word = _NOT_ONE_FILE[type(node)]
        raise TemplateProblem(f"{{% {word} %}} is not supported: a template is one file "
                              f"(put the other template's text in this one)", node.lineno)
    code = env.compile(ast, name, filename)
    return env, env.template_class.from_code(env, code, env.make_globals(None)), filename


def render_template(source: str, name: str, context: Mapping[str, Any]) -> str:
    """Render one template. `name` (the template's file name) picks autoescape and appears in no
    message; every failure is a `TemplateProblem` with the template's line."""
    problem: TemplateProblem | None = None
    try:
        env, template, filename = _compile(source, name)
    except TemplateSyntaxError as e:
        problem = TemplateProblem(_redact(e.message or "syntax error", _secret_values(context)), e.lineno)
    if problem is not None:
        raise problem
    parts: list[str] = []
    size = 0
    stream = template.generate(dict(context))
    try:
        for chunk in stream:
            size += len(chunk.encode("utf-8", "surrogatepass"))
            if size > MAX_OUTPUT_BYTES:
                problem = TemplateProblem(f"the output is larger than {MAX_OUTPUT_BYTES} bytes",
                                          _paused_line(stream, template))
                break
            parts.append(chunk)
    except Exception as e:  # noqa: BLE001 - any failure of the template is the template's problem
        problem = TemplateProblem(_describe(e, context, env, _secret_values(context)),
                                  _template_line(e.__traceback__, filename))
        del e
    finally:
        stream.close()
    if problem is not None:
        raise problem    # outside the except block: no chained exception holds Python's own message
    return "".join(parts)
