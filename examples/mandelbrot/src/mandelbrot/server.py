"""`mandelbrot-server`: a small HTTP renderer on the standard library's ThreadingHTTPServer.

GET /render?width=&height=&cx=&cy=&zoom=&max_iter=&impl=simple|mp|fast&palette= -> image/png (400 on bad input)
GET /        -> an HTML page: the image rendered by this very process (inline, so a load balancer cannot send
                the image request to another variant), its version and palette, links to zoom, palette, size
GET /healthz -> 200 "ok"
GET /version -> {"version": ..., "palette": ...}

Binds 127.0.0.1 by default; SIGTERM and SIGINT stop it cleanly (in-flight requests finish, the
worker pool is closed, exit status 0). Every response carries `X-Mandelbrot-Version`.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import signal
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from . import fast, image, palette as palettes, simple
from . import mp as mp_impl
from ._release import PALETTE, __version__
from .params import SERVER_LIMITS, InvalidParams, Params

__all__ = ["parse_render_query", "split_palette", "page_html", "make_server", "main"]

log = logging.getLogger("mandelbrot.server")

IMPLS = ("simple", "mp", "fast")
_FIELDS = {"width": int, "height": int, "cx": float, "cy": float, "zoom": float, "max_iter": int}


def parse_render_query(query: str) -> tuple[Params, str]:
    """Query string -> (validated Params, impl). Raises InvalidParams listing every problem."""
    qs = parse_qs(query, keep_blank_values=True)
    errors, values = [], {}
    for key in sorted(set(qs) - set(_FIELDS) - {"impl"}):
        errors.append(f"unknown parameter {key!r}")
    for key, kind in _FIELDS.items():
        if key in qs:
            raw = qs[key][-1]
            try:
                values[key] = kind(raw)
            except ValueError:
                errors.append(f"{key} must be {'an integer' if kind is int else 'a number'}, got {raw!r}")
    impl = qs.get("impl", ["simple"])[-1]
    if impl not in IMPLS:
        errors.append(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    elif impl == "fast" and not fast.available():
        errors.append("impl=fast needs numpy, which is not installed")
    params = Params(**values)
    try:
        params.validate(SERVER_LIMITS)
    except InvalidParams as exc:
        errors.extend(exc.errors)
    if errors:
        raise InvalidParams(errors)
    return params, impl


def split_palette(query: str) -> tuple[str, str]:
    """(the query without `palette`, the palette asked for or this release's default). Raises InvalidParams
    for an unknown palette."""
    pairs = [(k, v) for k, vs in parse_qs(query, keep_blank_values=True).items() for v in vs]
    chosen = [v for k, v in pairs if k == "palette"]
    name = chosen[-1] if chosen else PALETTE
    if name not in palettes.PALETTES:
        raise InvalidParams([f"palette must be one of {', '.join(sorted(palettes.PALETTES))}, got {name!r}"])
    return urlencode([(k, v) for k, v in pairs if k != "palette"]), name


# The page's defaults: small enough that the pure-Python renderer answers in well under a second.
PAGE_DEFAULTS = "width=320&height=240&max_iter=120"
SIZES = ((320, 240), (480, 360), (640, 480))
PAGE_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def page_html(params: Params, impl: str, palette_name: str, png: bytes) -> str:
    """The renderer's own page: the image (a data: URI), who rendered it, and links that re-render."""
    def link(text: str, **change) -> str:
        values = {"width": params.width, "height": params.height, "cx": params.cx, "cy": params.cy,
                  "zoom": params.zoom, "max_iter": params.max_iter, "palette": palette_name, **change}
        if impl != "simple":
            values["impl"] = impl
        return f'<a href="/?{html.escape(urlencode(values))}">{html.escape(text)}</a>'

    zoom = " · ".join([link("zoom in ×2", zoom=params.zoom * 2), link("zoom out ÷2", zoom=params.zoom / 2),
                       link("reset", cx=-0.5, cy=0.0, zoom=1.0)])
    pal = " · ".join(link(name, palette=name) if name != palette_name else f"<strong>{name}</strong>"
                     for name in sorted(palettes.PALETTES))
    size = " · ".join(link(f"{w}×{h}", width=w, height=h) if (w, h) != (params.width, params.height)
                      else f"<strong>{w}×{h}</strong>" for w, h in SIZES)
    data = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>mandelbrot {__version__} ({html.escape(palette_name)})</title>
<style>body{{font:15px/1.4 system-ui,sans-serif;margin:1rem auto;max-width:{max(params.width, 320)}px;padding:0 .5rem}}
img{{max-width:100%;height:auto;display:block;image-rendering:pixelated}}p{{margin:.4rem 0}}</style></head>
<body>
<h1 id="version" data-version="{__version__}" data-palette="{html.escape(palette_name)}">mandelbrot {__version__}</h1>
<p>served by <strong>{__version__}</strong> (release palette <strong>{PALETTE}</strong>); this image: palette
<strong>{html.escape(palette_name)}</strong>, centre {params.cx:g}{params.cy:+g}i, zoom {params.zoom:g}, {params.max_iter} iterations</p>
<img id="set" alt="the Mandelbrot set rendered by {__version__}" width="{params.width}" height="{params.height}"
 src="data:image/png;base64,{data}">
<p>zoom: {zoom}</p>
<p>palette: {pal}</p>
<p>size: {size}</p>
<p><a href="/version">/version</a> · <a href="/render?{html.escape(urlencode({"width": params.width, "height": params.height, "cx": params.cx, "cy": params.cy, "zoom": params.zoom, "max_iter": params.max_iter, "palette": palette_name}))}">the PNG alone</a></p>
</body></html>
"""


class _Renderer:
    """Owns the multiprocessing pool, created on the first impl=mp request."""

    def __init__(self, processes: int | None):
        self._processes = processes
        self._pool = None
        self._lock = threading.Lock()

    def render(self, params: Params, impl: str) -> list[list[int]]:
        if impl == "mp":
            with self._lock:
                if self._pool is None:
                    self._pool = mp_impl.make_pool(self._processes)
            return mp_impl.render(params, processes=self._processes, pool=self._pool)
        if impl == "fast":
            return fast.render(params)
        return simple.render(params)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.terminate()
                self._pool.join()
                self._pool = None


class Handler(BaseHTTPRequestHandler):
    server_version = f"mandelbrot/{__version__}"
    # TCP_NODELAY: headers and body go out in two writes; with Nagle the body can wait ~40 ms for
    # the peer's delayed ACK (e.g. a load balancer's proxy connection).
    disable_nagle_algorithm = True
    renderer: _Renderer  # set by make_server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
        elif url.path == "/version":
            body = json.dumps({"version": __version__, "palette": PALETTE}).encode() + b"\n"
            self._send(HTTPStatus.OK, body, "application/json")
        elif url.path == "/render":
            self._render(url.query)
        elif url.path == "/":
            self._page(url.query)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def _parse(self, query: str) -> tuple[Params, str, str] | None:
        """(params, impl, palette), or None after answering 400 with every problem."""
        try:
            rest, palette_name = split_palette(query)
            params, impl = parse_render_query(rest)
        except InvalidParams as exc:
            body = json.dumps({"error": "bad request", "details": exc.errors}).encode() + b"\n"
            self._send(HTTPStatus.BAD_REQUEST, body, "application/json")
            return None
        return params, impl, palette_name

    def _render(self, query: str) -> None:
        parsed = self._parse(query)
        if parsed is not None:
            params, impl, palette_name = parsed
            counts = self.renderer.render(params, impl)
            self._send(HTTPStatus.OK, image.to_png(counts, params.max_iter, palette_name), "image/png")

    def _page(self, query: str) -> None:
        parsed = self._parse(PAGE_DEFAULTS + ("&" + query if query else ""))
        if parsed is not None:
            params, impl, palette_name = parsed
            png = image.to_png(self.renderer.render(params, impl), params.max_iter, palette_name)
            self._send(HTTPStatus.OK, page_html(params, impl, palette_name, png).encode(), "text/html; charset=utf-8",
                       (("Content-Security-Policy", PAGE_CSP), ("X-Content-Type-Options", "nosniff"),
                        ("X-Frame-Options", "DENY")))

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: tuple = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Mandelbrot-Version", __version__)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.info("%s %s", self.address_string(), format % args)


def make_server(host: str, port: int, processes: int | None = None) -> ThreadingHTTPServer:
    renderer = _Renderer(processes)
    handler = type("BoundHandler", (Handler,), {"renderer": renderer})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.renderer = renderer  # type: ignore[attr-defined]
    return httpd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mandelbrot-server", description="Serve Mandelbrot PNGs over HTTP.")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s)")
    p.add_argument("--processes", type=int, default=None, help="workers for impl=mp (default: CPU count)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} (palette {PALETTE})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    httpd = make_server(args.host, args.port, args.processes)

    def stop(signum: int, _frame) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        # shutdown() waits for serve_forever() to return, which runs in this (the main) thread.
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = httpd.server_address[:2]
    log.info("mandelbrot %s (palette %s) listening on http://%s:%d", __version__, PALETTE, host, port)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        httpd.renderer.close()  # type: ignore[attr-defined]
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
