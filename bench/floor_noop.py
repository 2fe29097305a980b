"""The floor under a `once` no-op on this machine: a Python process that does only the I/O a no-op must do,
with none of the agent imported (bench section 2 times it beside `once`).

    python bench/floor_noop.py ROOT REPO_URL REF

Parses its options (argparse, as the CLI does), sets up logging, asks the remote where REF points
(`git ls-remote`), asks the root's supervisord for every process and its pending config changes (XML-RPC
getAllProcessInfo and reloadConfig, over its unix socket, as raw HTTP), asks HAProxy's runtime API for its
servers' state, reads the venv markers, the program files and status.json, and writes a status file
(temp file and rename, into a scratch name). No YAML, no validation, no model, no plan: what is left of a
no-op once all of that is free. Prints the number of processes, the commit and the bytes HAProxy sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _xmlrpc(path: str, method: str) -> bytes:
    body = (f"<?xml version='1.0'?><methodCall><methodName>{method}</methodName>"
            "<params></params></methodCall>").encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(b"POST /RPC2 HTTP/1.0\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        return _read_all(sock)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("repo")
    ap.add_argument("ref")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    root = args.root
    sha = subprocess.run(["git", "ls-remote", args.repo, args.ref], capture_output=True, text=True,
                         check=True).stdout.split()[0]
    sock = os.path.join(root, "supervisor", "supervisor.sock")
    processes = _xmlrpc(sock, "supervisor.getAllProcessInfo").count(b"<name>statename</name>")
    _xmlrpc(sock, "supervisor.reloadConfig")
    with socket.socket(socket.AF_UNIX) as lb:
        lb.connect(os.path.join(root, "lb", "haproxy.sock"))
        lb.sendall(b"show servers state\n")
        served = len(_read_all(lb))
    seen = 0
    for directory in ("venvs", os.path.join("supervisor", "programs")):
        for entry in os.scandir(os.path.join(root, directory)):
            name = os.path.join(entry.path, ".gitops-agent.json") if entry.is_dir() else entry.path
            try:
                with open(name, "rb") as fh:
                    seen += len(fh.read())
            except OSError:
                pass
    with open(os.path.join(root, "state", "status.json")) as fh:
        status = json.load(fh)
    scratch = os.path.join(root, "state", "floor-status.json")
    with open(scratch + ".tmp", "w") as fh:
        json.dump(status, fh)
    os.replace(scratch + ".tmp", scratch)
    os.unlink(scratch)
    print(processes, sha, served, seen)


if __name__ == "__main__":
    main()
