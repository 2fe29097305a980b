"""A keep-alive HTTP backend answering "<name>\\n" on GET /, for load-balancer tests and bench/.

    python tests/lb_backend.py NAME PORT        (binds 127.0.0.1:PORT)

TCP_NODELAY matters: http.server writes the headers and the body separately, and with Nagle on, each
pooled LB->backend request waits ~40 ms for a delayed ACK.
"""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME, PORT = sys.argv[1], int(sys.argv[2])
BODY = (NAME + "\n").encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 128
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
