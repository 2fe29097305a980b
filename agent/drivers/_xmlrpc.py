"""A small XML-RPC client over a unix socket: what the supervisord driver speaks.

Why not `xmlrpc.client`: it imports `http.client`, and with it `email` and `ssl`, about 12 ms of a
`once` whose whole budget is 150 ms. supervisord's API is a closed set of types (strings, ints,
booleans, doubles, arrays and structs, and faults), so the codec stays small. It is exercised against
a real supervisord by the driver's tests.
"""

from __future__ import annotations

import re
import socket
from typing import Any


__all__ = ["Fault", "ProtocolError", "Pending", "call", "send", "dumps_call", "loads_response"]

_MAX_RESPONSE = 64 * 1024 * 1024


class Fault(Exception):
    """The server answered with an XML-RPC fault (supervisord's error codes)."""

    def __init__(self, code: int, string: str):
        super().__init__(f"<Fault {code}: {string!r}>")
        self.faultCode = code
        self.faultString = string


class ProtocolError(Exception):
    """Not an XML-RPC answer: an HTTP error status, a truncated or malformed response."""


def call(path: str, method: str, params: tuple, timeout: float) -> Any:
    """POST one call to the server listening on unix socket `path`; return the decoded result."""
    return send(path, method, params, timeout).result()


class Pending:
    """A call sent whose answer is not read yet: the caller can do other work while the server makes it.
    `result()` reads and decodes it (once), `close()` drops it; either closes the connection."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def result(self) -> Any:
        try:
            raw = _read_response(self._sock)
        finally:
            self._sock.close()
        return loads_response(_http_body(raw))

    def close(self) -> None:
        self._sock.close()


def send(path: str, method: str, params: tuple, timeout: float) -> Pending:
    """POST one call to the server listening on unix socket `path`; its answer is read by `.result()`."""
    body = dumps_call(method, params)
    head = (f"POST /RPC2 HTTP/1.0\r\nHost: localhost\r\nContent-Type: text/xml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("ascii")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(head + body)
    except BaseException:
        sock.close()
        raise
    return Pending(sock)


def _read_response(sock: socket.socket) -> bytes:
    """Read until the server closes (HTTP/1.0) or Content-Length bytes of body have come."""
    chunks: list[bytes] = []
    size, expected = 0, None
    while True:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        size += len(data)
        if size > _MAX_RESPONSE:
            raise ProtocolError(f"response larger than {_MAX_RESPONSE} bytes")
        if expected is None:
            joined = b"".join(chunks)
            end = joined.find(b"\r\n\r\n")
            if end >= 0:
                length = _header(joined[:end], b"content-length")
                expected = end + 4 + int(length) if length is not None and length.isdigit() else -1
        if expected is not None and expected >= 0 and size >= expected:
            break
    return b"".join(chunks)


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


def _http_body(raw: bytes) -> bytes:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ProtocolError("the connection closed before a complete HTTP response")
    status = head.split(b"\r\n", 1)[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
        raise ProtocolError(f"not an HTTP response: {head[:80]!r}")
    if status[1] != b"200":
        reason = status[2].decode("latin-1", "replace") if len(status) > 2 else ""
        raise ProtocolError(f"HTTP {status[1].decode()} {reason}".rstrip())
    length = _header(head, b"content-length")
    if length is not None and length.isdigit() and len(body) < int(length):
        raise ProtocolError(f"truncated response: {len(body)} of {int(length)} bytes")
    return body


# --- encoding -------------------------------------------------------------------------------------


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return f"<boolean>{int(value)}</boolean>"
    if isinstance(value, int):
        if not -2**31 <= value < 2**31:
            raise OverflowError(f"int {value} does not fit XML-RPC's i4")
        return f"<int>{value}</int>"
    if isinstance(value, float):
        return f"<double>{value!r}</double>"
    if isinstance(value, str):
        return f"<string>{_escape(value)}</string>"
    if isinstance(value, (list, tuple)):
        return "<array><data>" + "".join(f"<value>{_value(v)}</value>" for v in value) + "</data></array>"
    if isinstance(value, dict):
        members = "".join(f"<member><name>{_escape(str(k))}</name><value>{_value(v)}</value></member>"
                          for k, v in value.items())
        return f"<struct>{members}</struct>"
    raise TypeError(f"cannot send {type(value).__name__} over XML-RPC")


def dumps_call(method: str, params: tuple) -> bytes:
    args = "".join(f"<param><value>{_value(p)}</value></param>" for p in params)
    return (f"<?xml version='1.0'?>\n<methodCall><methodName>{_escape(method)}</methodName>"
            f"<params>{args}</params></methodCall>\n").encode("utf-8")


# --- decoding -------------------------------------------------------------------------------------

_SCALARS = {
    "string": str,
    "int": int, "i4": int, "i8": int,
    "boolean": lambda text: text.strip() == "1",
    "double": float,
    "dateTime.iso8601": str,
    "nil": lambda text: None,
}


class _Decoder:
    """expat callbacks building the response's values; containers nest on a stack."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.stack: list[list] = []     # [kind, container, pending struct member name]
        self.values: list[Any] = []     # the params (or the fault's struct) at top level
        self.value_frames: list[list] = []   # per open <value>: [typed, result]
        self.fault = False

    def start(self, tag: str, _attrs: dict) -> None:
        self.text = []
        if tag == "value":
            self.value_frames.append([False, None])
        elif tag == "array":
            self.stack.append(["array", [], None])
        elif tag == "struct":
            self.stack.append(["struct", {}, None])
        elif tag == "fault":
            self.fault = True

    def chars(self, data: str) -> None:
        self.text.append(data)

    def end(self, tag: str) -> None:
        if tag in _SCALARS:
            self._set(_SCALARS[tag]("".join(self.text)))
        elif tag == "name" and self.stack and self.stack[-1][0] == "struct":
            self.stack[-1][2] = "".join(self.text)
        elif tag in ("array", "struct"):
            self._set(self.stack.pop()[1])
        elif tag == "value":
            typed, result = self.value_frames.pop()
            self._add(result if typed else "".join(self.text))
        elif tag == "base64":
            raise ProtocolError("base64 values are not expected from supervisord")
        self.text = []

    def _set(self, value: Any) -> None:
        if not self.value_frames:
            raise ProtocolError("a value outside <value>")
        self.value_frames[-1][:] = [True, value]

    def _add(self, value: Any) -> None:
        if self.stack:
            kind, container, name = self.stack[-1]
            if kind == "array":
                container.append(value)
            else:
                container[name] = value
        else:
            self.values.append(value)


def loads_response(data: bytes) -> Any:
    """The single result of a methodResponse; raises Fault for a fault response."""
    try:
        fault, result = _plain(data)
    except _Unusual:
        fault, result = _parsed(data)
    if fault:
        if not isinstance(result, dict):
            raise ProtocolError("a fault must be a struct")
        raise Fault(int(result.get("faultCode", 0)), str(result.get("faultString", "")))
    return result


# The plain form xmlrpclib writes (supervisord's answers): one regex match per scalar member or value and per
# container's open and close, instead of expat's callbacks per element and text node (getAllProcessInfo of 10
# programs: ~0.2 ms instead of ~0.9 ms). Anything else (an entity, a comment, CDATA, an attribute, \r, odd
# whitespace) is _Unusual and goes to expat, which decides what it means or that it is malformed.
# XML's text as it is (no entity, no \r that XML normalises, no character XML forbids); XML's whitespace
_TEXT = "[^<>&\r\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]*"
_WS = "[ \t\n]*"
_SCALAR = ("(?:<(?P<{p}kind>string|int|i4|i8|boolean|double|dateTime\\.iso8601)>(?P<{p}text>" + _TEXT
           + ")</(?P={p}kind)>|(?P<{p}nil><nil/>)|(?P<{p}bare>" + _TEXT + "))")
_TOKEN = re.compile(
    _WS + "(?:"
    "<member>" + _WS + "<name>(?P<mname>" + _TEXT + ")</name>" + _WS + "<value>" + _SCALAR.format(p="m")
    + "</value>" + _WS + "</member>"
    "|<value>" + _SCALAR.format(p="v") + "</value>"
    "|(?:<member>" + _WS + "<name>(?P<oname>" + _TEXT + ")</name>" + _WS + ")?<value>" + _WS
    + "(?:(?P<ostruct><struct>)|<array>" + _WS + "<data>)"
    "|(?P<close>(?:(?P<cstruct></struct>)|</data>" + _WS + "</array>)" + _WS + "</value>)(?P<cmember>" + _WS
    + "</member>)?"
    ")")
_ENVELOPE = re.compile(_WS + "(?:<\\?xml[^<>\x00-\x1f]*\\?>)?" + _WS + "<methodResponse>" + _WS + "(?:<params>" + _WS
                       + "<param>(?P<params>.*)</param>" + _WS + "</params>|<fault>(?P<fault>.*)</fault>)" + _WS
                       + "</methodResponse>" + _WS, re.S)
_CONVERT = {"string": str, "int": int, "i4": int, "i8": int, "double": float, "dateTime.iso8601": str,
            "boolean": lambda text: text.strip() == "1"}


class _Unusual(Exception):
    """Not the plain form: expat decodes it."""


def _plain(data: bytes) -> tuple[bool, Any]:
    """(is a fault, the value) of a response in the plain form; _Unusual for anything else."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Unusual from None
    env = _ENVELOPE.fullmatch(text)
    if env is None:
        raise _Unusual
    part = "params" if env.start("params") >= 0 else "fault"
    pos, end = env.span(part)
    frames: list[tuple[Any, str | None]] = []    # the open containers: (list or dict, its member name or None)
    top: list[Any] = []
    inner: Any = top                                 # the innermost open container
    convert = _CONVERT
    for m in _TOKEN.finditer(text, pos, end):
        if m.start() != pos:
            raise _Unusual
        pos = m.end()
        (mname, mkind, mtext, mnil, mbare, vkind, vtext, vnil, vbare,
         oname, ostruct, close, cstruct, cmember) = m.groups()
        if mname is not None:           # <member><name>N</name><value>scalar</value></member>
            if type(inner) is not dict:
                raise _Unusual
            inner[mname] = convert[mkind](mtext) if mkind is not None else None if mnil is not None else mbare
        elif close is not None:         # </struct></value> or </data></array></value>, then maybe </member>
            if not frames:
                raise _Unusual
            value, name = frames.pop()
            if (cstruct is not None) != (type(value) is dict) or (name is not None) != (cmember is not None):
                raise _Unusual
            inner = frames[-1][0] if frames else top
            if name is not None:
                inner[name] = value     # the opening token checked inner is a struct
            else:
                if type(inner) is not list:
                    raise _Unusual
                inner.append(value)
        elif vkind is not None or vnil is not None or vbare is not None:     # <value>scalar</value>
            if type(inner) is not list:
                raise _Unusual
            inner.append(convert[vkind](vtext) if vkind is not None else None if vnil is not None else vbare)
        else:                           # a container opens: [<member><name>N</name>]<value><struct> or <array><data>
            if (oname is not None) != (type(inner) is dict):
                raise _Unusual
            inner = {} if ostruct is not None else []
            frames.append((inner, oname))
    if text[pos:end].strip(" \t\n") or frames or len(top) != 1:
        raise _Unusual
    return part == "fault", top[0]


def _parsed(data: bytes) -> tuple[bool, Any]:
    """(is a fault, the value), by expat: any well-formed response."""
    from xml.parsers import expat     # the fallback: supervisord's plain answers never need it

    decoder = _Decoder()
    parser = expat.ParserCreate(encoding="utf-8")
    parser.StartElementHandler = decoder.start
    parser.EndElementHandler = decoder.end
    parser.CharacterDataHandler = decoder.chars
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise ProtocolError(f"malformed XML-RPC response: {exc}") from None
    if decoder.stack or decoder.value_frames or len(decoder.values) != 1:
        raise ProtocolError("an XML-RPC response must hold exactly one value")
    return decoder.fault, decoder.values[0]
