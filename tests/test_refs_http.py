"""Issue 17: polling a static ref advertisement (git update-server-info) served by a real nginx, with
If-None-Match: an unchanged ref is a 304 (no git process on the server), a moved one is fetched with the
smart protocol from --repo; an unreachable advertisement falls back to `git ls-remote`."""

from __future__ import annotations

import os
from pathlib import Path

import shutil
import subprocess
import time
import urllib.request

import pytest

from agent.drivers.git import GitSource
from agent.drivers.refs_http import RefsPoller, parse_refs
from conftest import StateRepo, free_port, git, stop_process

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx (Debian package) is not installed")

NGINX_CONF = """\
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fcgi;
  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""


@pytest.fixture
def served(request, tmp_path):
    """(work repo, bare repo, refs URL): the bare repo's info/refs served by nginx on loopback."""
    work = StateRepo(tmp_path / "work")
    work.write("fleet.yaml", "hosts: {}\n")
    work.commit("one")
    bare = tmp_path / "srv" / "state.git"
    git(tmp_path, "clone", "-q", "--bare", str(work.path), str(bare))
    git(bare, "update-server-info")
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp_path, port=port, root=tmp_path / "srv"))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.DEVNULL)
    request.addfinalizer(lambda: stop_process(proc))
    url = f"http://127.0.0.1:{port}/state.git/info/refs"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)
    return work, bare, url


def test_an_unchanged_ref_is_a_304_and_a_moved_one_is_fetched(served, tmp_path):
    work, bare, url = served
    refs = Path(bare) / "info" / "refs"
    settle = lambda: os.utime(refs, (time.time() - 10, time.time() - 10))  # noqa: E731 (an ETag the poller trusts)
    settle()
    src = GitSource(f"file://{bare}", "main", tmp_path / "cache", refs_url=url)
    first = src.resolve()
    assert first.sha == git(work.path, "rev-parse", "HEAD")
    assert src.resolve().sha == first.sha
    assert src._refs_poller.not_modified == 1            # nginx answered 304 to the ETag

    work.write("fleet.yaml", "hosts: {h1: {}}\n")
    work.commit("two")
    git(work.path, "push", "-q", str(bare), "HEAD:main")
    git(bare, "update-server-info")                      # what the server's post-update hook runs
    moved = src.resolve()             # info/refs was just rewritten, maybe in the same second with the same size
    assert moved.sha == git(work.path, "rev-parse", "HEAD") != first.sha
    settle()
    assert src.resolve().sha == moved.sha and src.resolve().sha == moved.sha
    assert src._refs_poller.not_modified == 2
    src.close()


def test_an_unreachable_advertisement_falls_back_to_ls_remote(served, tmp_path):
    work, bare, _url = served
    src = GitSource(f"file://{bare}", "main", tmp_path / "cache",
                    refs_url=f"http://127.0.0.1:{free_port()}/state.git/info/refs")
    assert src.resolve().sha == git(work.path, "rev-parse", "HEAD")
    src.close()


def test_parse_refs_skips_peeled_tags():
    text = "a" * 40 + "\trefs/heads/main\n" + "b" * 40 + "\trefs/tags/v1\n" + "c" * 40 + "\trefs/tags/v1^{}\n"
    assert parse_refs(text) == {"refs/heads/main": "a" * 40, "refs/tags/v1": "b" * 40}


def test_the_poller_sends_the_etag_it_got(served):
    _work, bare, url = served
    poller = RefsPoller(url)
    refs = poller.poll()
    assert poller.etag is None and "refs/heads/main" in refs      # info/refs just written: its ETag not trusted yet
    os.utime(Path(bare) / "info" / "refs", (time.time() - 10, time.time() - 10))
    assert poller.poll() == refs and poller.etag and poller.not_modified == 0
    assert poller.poll() == refs and poller.not_modified == 1
