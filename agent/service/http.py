"""The agent's HTTP endpoints: one selector thread owns every socket, a small pool computes the answers.

Why not `http.server.ThreadingHTTPServer` (what served /metrics before): its listen backlog is 5, so in
a burst every sixth connect lost its SYN and waited for the 1 s retry (p99 1.85 s at 50 concurrent); it
starts one thread per connection, and a connection has no deadline, so a client that connects and says
nothing (or dribbles a header byte by byte, "slowloris") holds a thread for ever.

Here the listening socket has a real backlog (`backlog`). One thread accepts, reads requests without
blocking and writes answers; a request must be complete within `request_timeout_s` of the connect,
whatever pace it arrives at, or the connection is closed, and an answer must be taken by the client
within `write_timeout_s`. Only complete requests reach the `workers` threads, which run the handler and
never touch a socket: a slow or silent client costs a file descriptor, never a thread. Open connections
are capped at `max_connections` (the kernel backlog holds the rest).

Every answer closes its connection (`Connection: close`): a scraper that comes back every 15 s gains
nothing from keeping an idle connection, and the server then has no idle state to manage.
"""

from __future__ import annotations

import http.client
import io
import logging
import re
import selectors
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Callable, Mapping
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from agent.core._record import record

__all__ = ["parse_listen", "Request", "Response", "HttpServer", "MetricsServer", "metrics_routes"]

log = logging.getLogger("gitops_agent.http")

TEXT = "text/plain; charset=utf-8"
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def parse_listen(listen: str) -> tuple[str, int]:
    """"127.0.0.1:9400" / "[::1]:9400" / ":9400" (all interfaces) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        from agent.core.errors import ConfigError

        raise ConfigError(f"listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@record
class Request:
    method: str
    path: str                       # without the query string
    query: str
    headers: Mapping[str, str]      # an http.client.HTTPMessage: case-insensitive lookups
    body: bytes
    client: str


@record
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Response]


class _BadRequest(ValueError):
    """A request the server answers itself, without a handler (malformed, too large, unsupported)."""

    def __init__(self, status: int, message: str, method: str = "", path: str = ""):
        super().__init__(message)
        self.status, self.method, self.path = status, method, path     # known once the request line was read


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    client: str
    deadline: float                 # monotonic; inf while a worker has the request
    inbuf: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None
    head: bool = False              # a HEAD request: headers only


class HttpServer:
    """Serve `routes` ({(method, path): handler}) on `listen` from a background thread; `stop()` closes it.

    HEAD is answered from the GET route without the body; a known path with another method gets 405,
    anything else 404 with `not_found` as its body."""

    def __init__(self, routes: Mapping[tuple[str, str], Handler], listen: str, *, not_found: bytes | None = None,
                 workers: int = 4, backlog: int = 128, request_timeout_s: float = 5.0,
                 write_timeout_s: float = 10.0, max_connections: int = 256, max_header_bytes: int = 16384,
                 max_body_bytes: int = 1 << 20, name: str = "http",
                 on_refused: Callable[[int, str, str], None] | None = None):
        self.routes = dict(routes)
        self.on_refused = on_refused        # (status, method, path) of a request the server refused itself
        paths = sorted({p for _, p in self.routes})
        self.not_found = not_found if not_found is not None else f"not found: try {', '.join(paths)}\n".encode()
        self.request_timeout_s, self.write_timeout_s = request_timeout_s, write_timeout_s
        self.max_connections, self.max_header_bytes, self.max_body_bytes = max_connections, max_header_bytes, max_body_bytes
        host, port = parse_listen(listen)
        self._listener = _bind(host, port, backlog)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._conns: dict[int, _Conn] = {}
        self._done: deque[tuple[_Conn, bytes]] = deque()    # answers from the workers, for the loop to send
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-worker")
        self._stopping = False
        self._drain_until = 0.0
        self._accept_paused_until: float | None = None     # after an accept error such as EMFILE
        self._full = False                                  # at max_connections (logged once per episode)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self._listener.getsockname()[:2]

    def start(self) -> "HttpServer":
        self._thread.start()
        return self

    def listener_dup(self) -> int:
        """A new fd of the listening socket, for a self-upgrade to hand over (it outlives `stop`)."""
        import os

        return os.dup(self._listener.fileno())

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop serving. `drain_s` > 0 (a self-upgrade's handover): stop accepting at once, so new connections
        wait in the backlog for whoever holds a dup of the listener, but first answer the connections already
        accepted, for up to `drain_s` (closing them unanswered would fail those requests)."""
        self._drain_until = time.monotonic() + drain_s
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5 + drain_s)
        elif self._listener.fileno() != -1:
            self._close_all()

    # -- the loop (the only code that touches sockets) ------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping or (self._conns and time.monotonic() < self._drain_until):
                if self._stopping and self._accept_paused_until != float("inf"):
                    self._stop_accepting()
                for key, mask in self._sel.select(self._timeout()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        self._drain_wake()
                    elif mask & selectors.EVENT_READ:
                        self._read(key.data)
                    else:
                        self._write(key.data)
                self._take_answers()
                self._expire()
                if self._accept_paused_until is not None and time.monotonic() >= self._accept_paused_until:
                    self._accept_paused_until = None
                    self._sel.register(self._listener, selectors.EVENT_READ)
        except Exception:  # noqa: BLE001 (logged: the agent keeps reconciling without its endpoints)
            log.exception("the HTTP server loop failed; /metrics, /healthz and /readyz stop answering")
        finally:
            self._close_all()

    def _stop_accepting(self) -> None:
        """Draining: the listener leaves the selector for good (new connections stay in the backlog)."""
        if self._accept_paused_until is None:
            self._sel.unregister(self._listener)
        self._accept_paused_until = float("inf")

    def _timeout(self) -> float | None:
        deadline = min((c.deadline for c in self._conns.values()), default=float("inf"))
        if self._stopping:
            deadline = min(deadline, self._drain_until)
        if self._accept_paused_until is not None:
            deadline = min(deadline, self._accept_paused_until)
        return None if deadline == float("inf") else max(0.0, deadline - time.monotonic())

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:   # e.g. EMFILE: the listener stays readable; pause rather than spin
                log.warning("accept failed (%s): new connections wait in the backlog for 0.5 s", exc)
                self._sel.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + 0.5
                return
            if len(self._conns) >= self.max_connections:
                if not self._full:
                    log.warning("%d connections open: closing new ones until some end", len(self._conns))
                self._full = True
                sock.close()
                continue
            self._full = False
            sock.setblocking(False)
            conn = _Conn(sock, str(addr[0]), time.monotonic() + self.request_timeout_s)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                 # the client went away (or reset) before its request was complete
            self._close(conn)
            return
        conn.inbuf += data
        try:
            request = self._parse(conn)
        except _BadRequest as exc:
            log.debug("%s: %d %s", conn.client, exc.status, exc)
            if self.on_refused is not None:
                try:
                    self.on_refused(exc.status, exc.method, exc.path)
                except Exception:  # noqa: BLE001 - counting a refusal must never break the server loop
                    log.exception("on_refused failed")
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
            self._answer(conn, _serialize(Response(exc.status, f"{exc}\n".encode())))
            return
        if request is None:
            return
        self._sel.unregister(conn.sock)
        conn.deadline = float("inf")
        conn.head = request.method == "HEAD"
        self._pool.submit(self._work, conn, request)

    def _parse(self, conn: _Conn) -> Request | None:
        """The complete request in `conn.inbuf`, or None while more is to come."""
        end = _HEADER_END.search(conn.inbuf, 0, self.max_header_bytes + 4)
        if end is None:
            if len(conn.inbuf) > self.max_header_bytes:
                raise _BadRequest(431, "request header too large")
            return None
        head = bytes(conn.inbuf[:end.start()]).decode("latin-1")
        line, _, rest = head.partition("\n")
        parts = line.strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "bad request line")
        method, target, _version = parts
        try:
            headers = http.client.parse_headers(io.BytesIO(rest.encode("latin-1") + b"\r\n"))
        except http.client.HTTPException as exc:
            raise _BadRequest(400, f"bad headers: {type(exc).__name__}") from None
        if headers.get("Transfer-Encoding"):
            raise _BadRequest(501, "chunked request bodies are not supported: send Content-Length")
        length_text = headers.get("Content-Length", "0").strip()
        if not length_text.isdigit():
            raise _BadRequest(400, "bad Content-Length")
        length = int(length_text)
        if length > self.max_body_bytes:
            raise _BadRequest(413, f"request body over {self.max_body_bytes} bytes", method, urlsplit(target).path)
        body_start = end.end()
        if len(conn.inbuf) < body_start + length:
            return None
        url = urlsplit(target)
        return Request(method, url.path or "/", url.query, headers, bytes(conn.inbuf[body_start:body_start + length]),
                       conn.client)

    def _take_answers(self) -> None:
        while self._done:
            conn, data = self._done.popleft()
            if conn.sock.fileno() == -1:
                continue
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
            self._answer(conn, data)

    def _answer(self, conn: _Conn, data: bytes) -> None:
        """Send `data`, then close; the socket must be registered for writing."""
        conn.out = memoryview(data)
        conn.deadline = time.monotonic() + self.write_timeout_s
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass                 # the client closed first: nothing left to tell it
            self._close(conn)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            log.debug("%s: closed after %s", conn.client,
                      "waiting too long for its request" if conn.out is None else "not taking the answer")
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd == -1:
            return
        self._conns.pop(fd, None)
        try:
            self._sel.unregister(conn.sock)
        except KeyError:
            pass                     # a worker has it: not registered
        conn.sock.close()

    def _close_all(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sel.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass                     # a wake-up is already pending, or the server is closed

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # -- the workers (no socket access) ---------------------------------------------------------

    def _work(self, conn: _Conn, request: Request) -> None:
        try:
            response = self._dispatch(request)
        except Exception:  # noqa: BLE001 (one failing handler must not take the endpoint down)
            log.exception("%s %s failed", request.method, request.path)
            response = Response(500, b"internal error: see the agent's log\n")
        log.debug("%s %s %s %d", request.client, request.method, request.path, response.status)
        self._done.append((conn, _serialize(response, head=request.method == "HEAD")))
        self._wake()

    def _dispatch(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((method, request.path))
        if handler is not None:
            return handler(request)
        allowed = sorted({m for m, p in self.routes if p == request.path})
        if allowed:
            if "GET" in allowed:
                allowed.append("HEAD")
            return Response(405, f"method {request.method} not allowed\n".encode(), headers=(("Allow", ", ".join(allowed)),))
        return Response(404, self.not_found)


def _inherited_listener(port: int) -> socket.socket | None:
    """The listening socket a previous agent handed over by exec (self-upgrade), if it listens on `port`:
    connections that arrived during the exec are waiting in its backlog."""
    import os

    value = os.environ.pop("GITOPS_AGENT_LISTEN_FD", None)
    if not value or not value.isdigit():
        return None
    try:
        sock = socket.socket(fileno=int(value))
    except OSError:
        return None
    if sock.type != socket.SOCK_STREAM or sock.getsockname()[1] != port:
        sock.close()
        return None
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    inherited = _inherited_listener(port)
    if inherited is not None:
        return inherited
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _serialize(response: Response, head: bool = False) -> bytes:
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {response.status} {phrase}", "Server: gitops-agent", f"Date: {formatdate(usegmt=True)}",
             f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}", "Connection: close",
             *(f"{k}: {v}" for k, v in response.headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else response.body)


# -- the agent's endpoints ----------------------------------------------------------------------

def metrics_routes(recorder, poll_interval_s: float) -> dict[tuple[str, str], Handler]:
    """/metrics (Prometheus text), /healthz (the process answers), /readyz (the last reconcile is recent and ok)."""

    def ready(_request: Request) -> Response:
        r = recorder.readiness(poll_interval_s)
        return Response(200 if r.ready else 503, (r.reason + "\n").encode())

    return {("GET", "/metrics"): lambda _r: Response(200, recorder.exposition(), CONTENT_TYPE_LATEST),
            ("GET", "/healthz"): lambda _r: Response(200, b"ok\n"),
            ("GET", "/readyz"): ready}


class MetricsServer(HttpServer):
    """The agent's endpoints for `recorder` (agent.service.metrics.Recorder) on `listen`, plus `extra`
    routes (the daemon's status page: agent.service.status_page)."""

    def __init__(self, recorder, listen: str, poll_interval_s: float,
                 extra: Mapping[tuple[str, str], Handler] | None = None, **options):
        hint = b"not found: try /, /api/status, " if extra else b"not found: try "
        super().__init__({**metrics_routes(recorder, poll_interval_s), **(extra or {})}, listen,
                         not_found=hint + b"/metrics, /healthz or /readyz\n", name="metrics-http", **options)
