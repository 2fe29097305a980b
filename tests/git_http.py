"""Smart HTTP for tests: git's own CGI program (`git http-backend`) behind a small stdlib HTTP handler.

Subclass it per test (each subclass gets its own `project_root`); override `authorized` to demand
credentials. Used by the HTTPS source tests and the read-only source tests."""

from __future__ import annotations

import os
import subprocess
from http.server import BaseHTTPRequestHandler

__all__ = ["BACKEND", "GitCGIHandler"]

BACKEND = "/usr/lib/git-core/git-http-backend"


class GitCGIHandler(BaseHTTPRequestHandler):
    project_root = ""
    remote_user = ""                     # what the CGI sees as REMOTE_USER once `authorized` accepted

    def authorized(self) -> bool:
        return True

    def _serve(self) -> None:
        if not self.authorized():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {**os.environ, "GIT_PROJECT_ROOT": self.project_root, "GIT_HTTP_EXPORT_ALL": "1",
               "REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
               "REMOTE_USER": self.remote_user, "GIT_PROTOCOL": self.headers.get("Git-Protocol", "")}
        out = subprocess.run([BACKEND], input=body, capture_output=True, env=env, timeout=60).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode().split("\r\n"):
            key, _, value = line.partition(":")
            if key.lower() == "status":
                status = int(value.strip().split()[0])
            elif key:
                headers.append((key, value.strip()))
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _serve

    def log_message(self, *args) -> None:
        pass
