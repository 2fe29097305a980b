"""The embedded supervisord's entry point: supervisord itself, answering XML-RPC in 64 KiB writes.

supervisord's HTTP channel writes 4 KiB per turn of its main loop (a choice made for `tail -f`, its
comment says "speculative"), and every turn also visits every process. An answer of n programs thus takes
O(n) turns of O(n) work: getAllProcessInfo of 200 programs (~140 KB) took ~35 turns and ~67 ms, most of
a 200-app no-op reconcile, growing with the square of the programs. With 64 KiB writes (medusa's own
default for its HTTP channel) it is two or three turns. Nothing else of supervisord changes.
"""

from __future__ import annotations

import sys

from supervisor import http
from supervisor.supervisord import main

http.deferring_http_channel.ac_out_buffer_size = 1 << 16

if __name__ == "__main__":
    sys.exit(main())
