"""agent.service.http: the endpoints' answers, a burst of connects, and clients that are silent or slow.

Real sockets on 127.0.0.1 throughout. Waits are bounded guards against a hang, never a speed limit.
"""

from __future__ import annotations

import select
import shutil
import socket
import subprocess
import threading
import time

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from agent.core.errors import ConfigError
from agent.service.http import HttpServer, MetricsServer, Response, parse_listen
from agent.service.metrics import Recorder

pytestmark = pytest.mark.timeout(120)

GUARD_S = 30.0          # a bound for "eventually", not a speed requirement


def raw(address: tuple[str, int], data: bytes) -> bytes:
    """Send `data` on a fresh connection and read the answer until the server closes."""
    with socket.create_connection(address, timeout=GUARD_S) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def get(address: tuple[str, int], path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    answer = raw(address, f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def closed_by_server(s: socket.socket) -> bytes | None:
    """What the server sent before closing `s` (b"" for nothing), or None if it is still open after GUARD_S."""
    s.settimeout(GUARD_S)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return got


def serve(request, **options) -> MetricsServer:
    """A started MetricsServer on a free port, stopped by a finalizer."""
    srv = MetricsServer(Recorder(), "127.0.0.1:0", 15, **options).start()
    request.addfinalizer(srv.stop)
    return srv


@pytest.fixture
def server(request):
    return serve(request)


def test_endpoints_answer_as_before(server):
    assert get(server.address, "/healthz")[::2] == (200, b"ok\n")
    code, _, body = get(server.address, "/readyz")
    assert (code, body) == (503, b"no reconcile finished yet\n")
    code, headers, body = get(server.address, "/metrics?x=1")
    assert code == 200 and headers["content-type"] == CONTENT_TYPE_LATEST
    assert b'gitops_agent_reconcile_total{result="converged"} 0.0' in body
    assert get(server.address, "/nope")[::2] == (404, b"not found: try /metrics, /healthz or /readyz\n")
    code, headers, body = get(server.address, "/healthz", method="HEAD")
    assert (code, headers["content-length"], body) == (200, "3", b"")
    code, headers, _ = get(server.address, "/metrics", method="POST")
    assert code == 405 and headers["allow"] == "GET, HEAD"
    assert server.address[0] == "127.0.0.1"


def test_fifty_concurrent_connects_are_all_answered(server):
    n = 50
    barrier = threading.Barrier(n)
    codes: list[int] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            barrier.wait(GUARD_S)
            codes.append(get(server.address, "/metrics")[0])
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD_S * 2)
    assert not errors and codes == [200] * n


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the listen backlog")
def test_the_listen_backlog_holds_a_burst(server):
    """ss shows a listening socket's backlog as its Send-Q (http.server's was 5)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{server.address[1]}"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "LISTEN" and int(out[2]) == 128, out


def test_silent_clients_hold_no_thread_do_not_block_others_and_are_closed(request):
    server = serve(request, request_timeout_s=2.0)
    get(server.address, "/healthz")          # the workers that exist after one request
    threads_before = threading.active_count()
    silent = [socket.create_connection(server.address, timeout=GUARD_S) for _ in range(20)]   # more than workers
    try:
        for _ in range(3):
            assert get(server.address, "/healthz")[::2] == (200, b"ok\n")
        assert threading.active_count() <= threads_before + 4      # at most the rest of the pool (4 workers)
        for s in silent:
            assert closed_by_server(s) == b""
    finally:
        for s in silent:
            s.close()
    assert get(server.address, "/healthz")[0] == 200


def test_a_client_dribbling_a_header_is_closed_whatever_its_pace(request):
    """Slowloris: a byte every 50 ms keeps any per-read timeout happy; the request deadline still ends it."""
    server = serve(request, request_timeout_s=1.0)
    with socket.create_connection(server.address, timeout=GUARD_S) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        deadline = time.monotonic() + GUARD_S
        while time.monotonic() < deadline:
            try:
                s.send(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([s], [], [], 0.05)
            if readable:
                break
        answer = closed_by_server(s)
    assert answer == b"", answer


def test_bad_requests_get_an_answer_not_a_hang(server):
    assert raw(server.address, b"HELLO\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert raw(server.address, huge).startswith(b"HTTP/1.1 431 ")


def test_a_failing_handler_gets_500_and_the_server_keeps_serving():
    def boom(_request):
        raise RuntimeError("handler bug")

    srv = HttpServer({("GET", "/boom"): boom, ("GET", "/ok"): lambda r: Response(200, b"fine\n")},
                     "127.0.0.1:0").start()
    try:
        assert get(srv.address, "/boom")[0] == 500
        assert get(srv.address, "/ok")[::2] == (200, b"fine\n")
        assert get(srv.address, "/else")[::2] == (404, b"not found: try /boom, /ok\n")
    finally:
        srv.stop()


def test_stop_closes_the_port_and_is_safe_twice():
    srv = MetricsServer(Recorder(), "127.0.0.1:0", 15).start()
    address = srv.address
    srv.stop()
    srv.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=GUARD_S).close()
    MetricsServer(Recorder(), "127.0.0.1:0", 15).stop()     # never started: closes its socket too


def test_parse_listen():
    assert parse_listen("127.0.0.1:9400") == ("127.0.0.1", 9400)
    assert parse_listen("[::1]:9400") == ("::1", 9400)
    assert parse_listen(":9400") == ("0.0.0.0", 9400)
    with pytest.raises(ConfigError):
        parse_listen("9400")


def test_an_ipv6_listen_address_binds_ipv6():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv = MetricsServer(Recorder(), "[::1]:0", 15).start()
    except OSError as exc:
        pytest.skip(f"::1 not available: {exc}")
    try:
        assert srv.address[0] == "::1"
        assert get(srv.address, "/healthz")[::2] == (200, b"ok\n")
    finally:
        srv.stop()


def test_connections_over_the_cap_are_closed_and_served_again_once_some_end(request):
    server = serve(request, max_connections=3, request_timeout_s=GUARD_S * 4)
    held = [socket.create_connection(server.address, timeout=GUARD_S) for _ in range(3)]
    try:
        with socket.create_connection(server.address, timeout=GUARD_S) as extra:
            assert closed_by_server(extra) == b""
        held.pop().close()
        deadline = time.monotonic() + GUARD_S
        while True:     # the server sees the close on its next loop turn: until then a connect is refused
            try:
                assert get(server.address, "/healthz")[::2] == (200, b"ok\n")
                break
            except (ConnectionResetError, IndexError, ValueError):
                assert time.monotonic() < deadline, "no answer after a held connection closed"
                time.sleep(0.05)
    finally:
        for s in held:
            s.close()


def test_a_client_that_does_not_take_its_answer_is_closed(request):
    big = b"x" * (32 << 20)         # more than the socket buffers hold
    srv = HttpServer({("GET", "/big"): lambda r: Response(200, big)}, "127.0.0.1:0", write_timeout_s=1.0).start()
    request.addfinalizer(srv.stop)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(GUARD_S)
        s.connect(srv.address)
        s.sendall(b"GET /big HTTP/1.1\r\n\r\n")
        deadline = time.monotonic() + GUARD_S      # not reading, until the server has given up on us
        while srv._conns and time.monotonic() < deadline:
            time.sleep(0.05)
        got = closed_by_server(s)
    assert got is not None and len(got) < len(big)
    assert get(srv.address, "/big")[0] == 200       # and it still serves a client that reads
