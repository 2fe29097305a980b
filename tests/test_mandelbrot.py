"""The mandelbrot example service (examples/mandelbrot), imported from source: no install needed.

Pillow is used when installed; without it the package's stdlib PNG encoder is exercised instead,
and the PNGs are checked here by decoding them with zlib alone.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "examples" / "mandelbrot" / "src"
sys.path.insert(0, str(SRC))

import mandelbrot  # noqa: E402
from mandelbrot import cli, fast, mp, palette, simple  # noqa: E402
from mandelbrot.params import InvalidParams, Params, SERVER_LIMITS  # noqa: E402
from mandelbrot.server import parse_render_query  # noqa: E402

VIEWS = [
    Params(64, 48, max_iter=100),
    Params(37, 23, cx=-0.7436, cy=0.1318, zoom=300.0, max_iter=400),  # odd sizes, deep-ish zoom
    Params(5, 1, max_iter=1),
]


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, raw RGB) of an 8-bit RGB, non-interlaced PNG using filter 0 or any filter
    Pillow picks (all five are undone here)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = ihdr
    assert (depth, colour_type, interlace) == (8, 2, 0)
    raw, stride, out, prev = zlib.decompress(idat), 3 * width, bytearray(), bytearray(3 * width)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - 3] if i >= 3 else 0
            b, c = prev[i], (prev[i - 3] if i >= 3 else 0)
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line
        prev = line
    return width, height, bytes(out)


# --- renderers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("params", VIEWS)
def test_simple_and_mp_give_identical_counts(params):
    expected = simple.render(params)
    assert len(expected) == params.height and all(len(r) == params.width for r in expected)
    assert mp.render(params, processes=2) == expected


def test_mp_with_a_long_lived_pool_and_more_workers_than_rows():
    params = VIEWS[0]
    with mp.make_pool(2) as pool:
        assert mp.render(params, pool=pool, processes=3) == simple.render(params)
    assert mp.render(VIEWS[2], processes=4) == simple.render(VIEWS[2])


@pytest.mark.skipif(not fast.available(), reason="numpy not installed")
@pytest.mark.parametrize("params", VIEWS)
def test_numpy_gives_identical_counts(params):
    assert fast.render(params) == simple.render(params)


def test_bands_cover_all_rows_once():
    for height in (1, 7, 48):
        for parts in (1, 3, 8, 100):
            bands = mp.bands(height, parts)
            assert [r for a, b in bands for r in range(a, b)] == list(range(height))


def test_counts_are_sane():
    counts = simple.render(Params(64, 48, max_iter=100))
    assert counts[24][24] == 100  # near -0.5+0i: inside the set
    assert counts[0][0] < 5  # corner -2.5+1.5i escapes at once


def test_palettes_differ_and_inside_is_black():
    assert set(palette.PALETTES) >= {"classic", "ember"}
    assert mandelbrot.PALETTE in palette.PALETTES
    assert palette.colour("classic", 10, 100) != palette.colour("ember", 10, 100)
    assert palette.colour("ember", 100, 100) == (0, 0, 0)
    for name in palette.PALETTES:
        assert len(palette.lookup_table(name, 300)) == 301


# --- CLI -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("main", [cli.main_simple, cli.main_mp])
def test_cli_writes_a_valid_png(tmp_path, main):
    out = tmp_path / "m.png"
    argv = ["--width", "40", "--height", "30", "--cx", "-0.5", "--cy", "0", "--zoom", "1.5",
            "--max-iter", "64", "-o", str(out)]
    assert main(argv) == 0
    width, height, rgb = decode_png(out.read_bytes())
    assert (width, height) == (40, 30)
    counts = simple.render(Params(40, 30, -0.5, 0.0, 1.5, 64))
    assert rgb == palette.to_rgb(counts, mandelbrot.PALETTE, 64)


def test_cli_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main_simple(["--width", "0", "--max-iter", "-1", "-o", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "width" in err and "max_iter" in err
    assert not (tmp_path / "x.png").exists()


# --- server --------------------------------------------------------------------------------------

def test_render_query_collects_all_errors():
    assert parse_render_query("") == (Params(), "simple")
    assert parse_render_query("width=10&height=5&impl=mp&zoom=2") == (Params(10, 5, zoom=2.0), "mp")
    with pytest.raises(InvalidParams) as exc:
        parse_render_query(f"width=abc&height={SERVER_LIMITS.max_height + 1}&max_iter=0&zoom=nan&impl=gpu&x=1")
    text = " ".join(exc.value.errors)
    for word in ("width", "height", "max_iter", "zoom", "impl", "'x'"):
        assert word in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _start_server(request) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "mandelbrot.server", "--port", str(port), "--processes", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stderr.close()

    request.addfinalizer(stop)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            if _get(base + "/healthz")[0] == 200:
                return base, proc
        except OSError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(request):
    return _start_server(request)[0]


def test_server_healthz_and_version(server):
    base = server
    assert _get(base + "/healthz")[:3:2] == (200, b"ok\n")
    status, headers, body = _get(base + "/version")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"version": mandelbrot.__version__, "palette": mandelbrot.PALETTE}
    assert headers["X-Mandelbrot-Version"] == mandelbrot.__version__
    assert _get(base + "/nope")[0] == 404


@pytest.mark.parametrize("impl", ["simple", "mp"])
def test_server_renders_png(server, impl):
    base = server
    status, headers, body = _get(f"{base}/render?width=32&height=24&cx=-0.5&cy=0&zoom=1&max_iter=50&impl={impl}")
    assert status == 200 and headers["Content-Type"] == "image/png"
    width, height, rgb = decode_png(body)
    assert (width, height) == (32, 24)
    assert rgb == palette.to_rgb(simple.render(Params(32, 24, -0.5, 0.0, 1.0, 50)), mandelbrot.PALETTE, 50)


@pytest.mark.parametrize("query", ["width=0", "width=2000", "max_iter=5000", "zoom=-1", "cx=abc", "impl=gpu"])
def test_server_400_on_bad_input(server, query):
    base = server
    status, headers, body = _get(f"{base}/render?{query}")
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["details"]


def test_server_stops_cleanly_on_sigterm(request):
    base, proc = _start_server(request)
    assert _get(f"{base}/render?width=8&height=8&impl=mp")[0] == 200  # starts the worker pool
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    log = proc.stderr.read()
    assert b"received SIGTERM" in log and b"stopped" in log


def test_server_page_shows_its_own_image_version_and_links(server):
    status, headers, body = _get(server + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    page = body.decode()
    assert f'data-version="{mandelbrot.__version__}"' in page and f'data-palette="{mandelbrot.PALETTE}"' in page
    png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1))
    assert decode_png(png)[:2] == (320, 240)
    links = re.findall(r'href="/\?([^"]+)"', page)
    assert any("zoom=2.0" in html.unescape(q) for q in links)                 # zoom in
    other = next(p for p in sorted(palette.PALETTES) if p != mandelbrot.PALETTE)
    assert any(f"palette={other}" in html.unescape(q) for q in links)
    assert any("width=640&height=480" in html.unescape(q) for q in links)


def test_server_page_and_render_take_a_palette(server):
    other = next(p for p in sorted(palette.PALETTES) if p != mandelbrot.PALETTE)
    status, _, body = _get(f"{server}/?width=40&height=30&palette={other}")
    assert status == 200 and f'data-palette="{other}"' in body.decode() and 'width="40" height="30"' in body.decode()
    status, _, body = _get(f"{server}/render?width=16&height=12&max_iter=30&palette={other}")
    assert status == 200
    assert decode_png(body)[2] == palette.to_rgb(simple.render(Params(16, 12, max_iter=30)), other, 30)
    status, _, body = _get(f"{server}/?palette=neon")
    assert status == 400 and "palette" in json.loads(body)["details"][0]
