"""agent.core.render.lb: pure renderers. Table-driven cases, a Hypothesis property against injection, and the
real `haproxy -c` / `nginx -t` (when installed) accepting what we render."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.drivers.haproxy import weights_of
from agent.drivers.nginx import parse_weights
from agent.core.render.lb import (
    NAME_RE,
    VERSION_PATH,
    ABSplit,
    Backend,
    Frontend,
    InvalidLBConfig,
    haproxy_topology,
    nginx_version,
    render_haproxy,
    render_nginx,
)

SOCK = "/run/agent/lb/haproxy.sock"
PREFIX = "/run/agent/lb/nginx"


def fe(*weights: int, name: str = "app", listen: str = "127.0.0.1:8100", ab: ABSplit | None = None) -> Frontend:
    names = ("blue", "green", "red")
    return Frontend(name, listen, tuple(Backend(names[i], f"127.0.0.1:{8101 + i}", w) for i, w in enumerate(weights)), ab)


# --- HAProxy --------------------------------------------------------------------------------------


def test_haproxy_renders_admin_socket_and_one_server_per_backend():
    text = render_haproxy([fe(90, 10)], stats_socket=SOCK, pid_file="/run/agent/lb/haproxy.pid")
    assert f"stats socket {SOCK} mode 600 level admin" in text
    assert "pidfile /run/agent/lb/haproxy.pid" in text
    assert "frontend app\n    bind 127.0.0.1:8100\n" in text
    assert "server blue 127.0.0.1:8101 weight 90 check\n" in text
    assert "server green 127.0.0.1:8102 weight 10 check\n" in text
    assert text == render_haproxy([fe(90, 10)], stats_socket=SOCK, pid_file="/run/agent/lb/haproxy.pid")


def test_haproxy_allows_weight_zero():
    assert "server green 127.0.0.1:8102 weight 0 check" in render_haproxy([fe(1, 0)], stats_socket=SOCK)


def test_haproxy_topology_ignores_weights_only():
    base = haproxy_topology([fe(90, 10)], stats_socket=SOCK)
    assert haproxy_topology([fe(0, 256)], stats_socket=SOCK) == base
    assert haproxy_topology([fe(90, 10, listen="127.0.0.1:9000")], stats_socket=SOCK) != base
    assert haproxy_topology([fe(90, 10, 1)], stats_socket=SOCK) != base
    assert haproxy_topology([fe(1, 0, ab=ABSplit("green", 5))], stats_socket=SOCK) != \
        haproxy_topology([fe(1, 0, ab=ABSplit("green", 25))], stats_socket=SOCK)
    assert f"setenv GITOPS_AGENT_TOPOLOGY {base}\n" in render_haproxy([fe(90, 10)], stats_socket=SOCK)


def test_haproxy_ab_override_comes_before_the_bucket():
    text = render_haproxy([fe(1, 0, ab=ABSplit("green", 20))], stats_socket=SOCK)
    rules = [line.strip() for line in text.splitlines() if line.strip().startswith("use-server")]
    assert rules == [
        "use-server blue if { req.hdr(X-Variant) -m str blue }",
        "use-server green if { req.hdr(X-Variant) -m str green }",
        "use-server green if { var(txn.gitops_ab) -m int lt 20 } !{ req.hdr(X-Variant) -m found }",
    ]
    assert 'set-var-fmt(txn.gitops_ab_key) "%[req.cook(uid)]%[src]"' in text
    no_bucket = render_haproxy([fe(1, 0, ab=ABSplit("green", 0))], stats_socket=SOCK)
    assert "var(txn.gitops_ab) -m int lt" not in no_bucket


# --- nginx ----------------------------------------------------------------------------------------


def test_nginx_is_a_complete_foreground_config_under_the_prefix():
    text = render_nginx([fe(90, 10)], prefix=PREFIX, version="v1")
    assert "daemon off;\n" in text
    assert f"pid {PREFIX}/nginx.pid;" in text and f"error_log {PREFIX}/logs/error.log" in text
    assert all(f"{PREFIX}/tmp/" in line for line in text.splitlines() if "_temp_path" in line)
    assert "        server 127.0.0.1:8101 weight=90 max_fails=0;  # backend=blue\n" in text
    assert "        server 127.0.0.1:8102 weight=10 max_fails=0;  # backend=green\n" in text
    assert f"listen unix:{PREFIX}/control.sock;" in text
    assert text.count(f'location = {VERSION_PATH} {{ default_type text/plain; return 200 "v1\\n"; }}') == 2
    assert parse_weights(text) == {"app": {"blue": 90, "green": 10}}


@pytest.mark.parametrize("weights, expected_lines, absent", [
    ((5, 0), ["server 127.0.0.1:8102 down;  # backend=green", "proxy_pass http://gitops__app;"], ["weight=0"]),
    ((0, 0), ["location / { return 503; }", "# backend=blue weight=0", "# backend=green weight=0"],
     ["upstream gitops__app", "weight=0;"]),
    ((256, 1), ["weight=256 max_fails=0;", "weight=1 max_fails=0;"], ["down;"]),
])
def test_nginx_weight_zero(weights, expected_lines, absent):
    text = render_nginx([fe(*weights)], prefix=PREFIX, version="v")
    for line in expected_lines:
        assert line in text
    for line in absent:
        assert line not in text
    assert parse_weights(text) == {"app": dict(zip(("blue", "green"), weights))}


@pytest.mark.parametrize("percent, split_lines", [
    (20, ["20% gitops__app__b1;", "* gitops__app;"]),
    (0, ["* gitops__app;"]),
    (100, ["* gitops__app__b1;"]),
])
def test_nginx_ab_split_clients_and_header_map(percent, split_lines):
    text = render_nginx([fe(1, 0, ab=ABSplit("green", percent))], prefix=PREFIX, version="v")
    body = re.search(r'split_clients "\$\{cookie_uid\}\$\{remote_addr\}" \$gitops_ab_0 \{\n(.*?)\n    \}', text, re.S)
    assert body and [line.strip() for line in body.group(1).splitlines()] == split_lines
    assert "map $http_x_variant $gitops_route_0 {" in text
    assert '"green" gitops__app__b1;' in text and "default $gitops_ab_0;" in text
    assert parse_weights(text) == {"app": {"blue": 1, "green": 0}}


def test_nginx_ab_with_no_control_weight_answers_503_for_the_control_bucket():
    text = render_nginx([fe(0, 0, ab=ABSplit("green", 30))], prefix=PREFIX, version="v")
    assert '* "";' in text and 'if ($gitops_route_0 = "") { return 503; }' in text


def test_nginx_version_is_a_hash_of_the_config_and_follows_weights():
    a = nginx_version([fe(90, 10)], prefix=PREFIX)
    assert re.fullmatch(r"[0-9a-f]{16}", a)
    assert a == nginx_version([fe(90, 10)], prefix=PREFIX)
    assert a != nginx_version([fe(10, 90)], prefix=PREFIX)
    assert a != nginx_version([fe(90, 10)], prefix="/other")


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("frontends, field", [
    ([Frontend("my app", "127.0.0.1:8100", ())], "frontends[0].name"),
    ([Frontend("app\nlisten", "127.0.0.1:8100", ())], "frontends[0].name"),
    ([Frontend("", "127.0.0.1:8100", ())], "frontends[0].name"),
    ([Frontend("app#x", "127.0.0.1:8100", ())], "frontends[0].name"),
    ([Frontend("app", "127.0.0.1", ())], "frontend app.listen"),
    ([Frontend("app", "127.0.0.1:0", ())], "frontend app.listen"),
    ([Frontend("app", "127.0.0.1:70000", ())], "frontend app.listen"),
    ([Frontend("app", "999.1.1.1:80", ())], "frontend app.listen"),
    ([Frontend("app", "[::1]:80", ())], "frontend app.listen"),
    ([Frontend("app", "127.0.0.1:80;", ())], "frontend app.listen"),
    ([Frontend("app", "127.0.0.1:8100", (Backend("b c", "127.0.0.1:1", 1),))], "frontend app.backends[0].name"),
    ([Frontend("app", "127.0.0.1:8100", (Backend("b", "h:1 backup", 1),))], "frontend app.backends[0].address"),
    ([Frontend("app", "127.0.0.1:8100", (Backend("b", "127.0.0.1:1", 257),))], "frontend app.backends[0].weight"),
    ([Frontend("app", "127.0.0.1:8100", (Backend("b", "127.0.0.1:1", -1),))], "frontend app.backends[0].weight"),
    ([Frontend("app", "127.0.0.1:8100", (Backend("b", "127.0.0.1:1", True),))], "frontend app.backends[0].weight"),
    ([Frontend("app", "127.0.0.1:8100", (Backend("b", "127.0.0.1:1", 1.5),))], "frontend app.backends[0].weight"),
    ([Frontend("app", "127.0.0.1:8100", (Backend("b", "127.0.0.1:1", 1), Backend("b", "127.0.0.1:2", 1)))],
     "frontend app.backends[1].name"),
    ([fe(1), fe(1, name="other")], "frontend other.listen"),
    ([fe(1), fe(1, listen="127.0.0.1:9")], "frontends[1].name"),
    ([fe(1, 0, ab=ABSplit("purple", 10))], "frontend app.ab.variant"),
    ([fe(1, 5, ab=ABSplit("green", 10))], "frontend app.ab.variant"),
    ([fe(1, 0, ab=ABSplit("green", 101))], "frontend app.ab.percent"),
    ([fe(1, 0, ab=ABSplit("green", 10, cookie="my-uid"))], "frontend app.ab.cookie"),
    ([fe(1, 0, ab=ABSplit("green", 10, header="X Variant"))], "frontend app.ab.header"),
])
def test_invalid_input_names_the_field(frontends, field):
    for render in (lambda: render_haproxy(frontends, stats_socket=SOCK),
                   lambda: render_nginx(frontends, prefix=PREFIX, version="v")):
        with pytest.raises(InvalidLBConfig) as info:
            render()
        assert field in info.value.fields, info.value.problems
        assert isinstance(info.value, ValueError)


def test_validation_reports_every_problem_at_once():
    bad = Frontend("a b", "nowhere", (Backend("x\ny", "127.0.0.1:1", 999),))
    with pytest.raises(InvalidLBConfig) as info:
        render_haproxy([bad], stats_socket=SOCK)
    assert len(info.value.problems) == 4, info.value.problems


@pytest.mark.parametrize("kwargs", [{"stats_socket": "relative.sock"}, {"stats_socket": "/a b"},
                                    {"stats_socket": SOCK, "pid_file": "/x\n/y"}])
def test_haproxy_paths_are_validated(kwargs):
    with pytest.raises(InvalidLBConfig):
        render_haproxy([fe(1)], **kwargs)


@pytest.mark.parametrize("kwargs", [{"prefix": "/a;b", "version": "v"}, {"prefix": PREFIX, "version": 'v"; x'}])
def test_nginx_prefix_and_version_are_validated(kwargs):
    with pytest.raises(InvalidLBConfig):
        render_nginx([fe(1)], **kwargs)


# --- property: any input either raises or renders exactly the given backends, nothing injected ----

_valid_names = st.from_regex(NAME_RE, fullmatch=True)
_bad_names = st.one_of(st.text(max_size=12), st.sampled_from(["a\nb", "a b", "a#b", "a;b", "a{b", 'a"b', "a}b", "-a"]))
_names = st.one_of(_valid_names, _valid_names, _valid_names, _valid_names, _bad_names)
_hosts = st.sampled_from(["127.0.0.1", "localhost", "10.0.0.1", "host.example", "a-b.c"])
_valid_addresses = st.builds(lambda h, p: f"{h}:{p}", _hosts, st.integers(1, 65535))
_bad_addresses = st.one_of(st.builds(lambda h, p: f"{h}:{p}", st.one_of(_hosts, st.text(max_size=10)),
                                     st.one_of(st.integers(-1, 70000).map(str), st.text(max_size=6))),
                           st.text(max_size=20))
_addresses = st.one_of(_valid_addresses, _valid_addresses, _valid_addresses, _valid_addresses, _bad_addresses)
_weights = st.one_of(st.integers(0, 256), st.integers(0, 256), st.integers(0, 256), st.integers(-2, 300))
_backends = st.lists(st.builds(Backend, _names, _addresses, _weights), max_size=3).map(tuple)
_frontends = st.lists(st.builds(Frontend, _names, _addresses, _backends), min_size=1, max_size=2)
# Valid only (unique names and listens), so that the rendering half of the property is exercised a lot.
_valid_backends = st.lists(st.builds(Backend, _valid_names, _valid_addresses, st.integers(0, 256)),
                           max_size=4, unique_by=lambda b: b.name).map(tuple)
_valid_frontends = st.lists(st.builds(Frontend, _valid_names, _valid_addresses, _valid_backends), min_size=1,
                            max_size=3, unique_by=(lambda f: f.name, lambda f: f.listen))


def _shape(text: str) -> list[tuple]:
    """Per line: token count, first token and the count of every character that ends or opens a directive."""
    return [(len(line.split()), (line.split() or [""])[0], *(line.count(c) for c in ';{}#"\'\\'))
            for line in text.splitlines()]


def _canonical(frontends: list[Frontend]) -> list[Frontend]:
    """The same structure with names and addresses we know are safe."""
    return [Frontend(f"f{i}", f"127.0.0.1:{1000 + i}",
                     tuple(Backend(f"b{j}", f"127.0.0.1:{2000 + j}", b.weight) for j, b in enumerate(f.backends)))
            for i, f in enumerate(frontends)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_frontends)
def test_property_render_or_raise_and_never_inject(frontends):
    try:
        render_haproxy(frontends, stats_socket=SOCK)
    except InvalidLBConfig:
        with pytest.raises(InvalidLBConfig):
            render_nginx(frontends, prefix=PREFIX, version="v")
        return
    _check_exact(frontends)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_frontends)
def test_property_valid_input_renders_exactly_the_given_backends(frontends):
    _check_exact(frontends)


def _check_exact(frontends):
    hap = render_haproxy(frontends, stats_socket=SOCK)
    nginx = render_nginx(frontends, prefix=PREFIX, version="v")
    servers = re.findall(r"^    server (\S+) (\S+) weight (\d+) check$", hap, re.M)
    assert servers == [(b.name, b.address, str(b.weight)) for f in frontends for b in f.backends]
    assert parse_weights(nginx) == weights_of(frontends)
    canonical = _canonical(frontends)
    assert _shape(hap) == _shape(render_haproxy(canonical, stats_socket=SOCK))
    assert _shape(nginx) == _shape(render_nginx(canonical, prefix=PREFIX, version="v"))


# --- the real binaries accept what we render ---------------------------------------------------------

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
_ALL = [fe(90, 10), fe(0, 0, name="zero", listen="127.0.0.1:8200"),
        fe(1, 0, name="ab", listen="127.0.0.1:8300", ab=ABSplit("green", 20)),
        fe(0, 0, name="ab0", listen="127.0.0.1:8400", ab=ABSplit("green", 100))]


@pytest.mark.skipif(HAPROXY is None, reason="haproxy binary not installed")
def test_haproxy_accepts_the_rendered_config(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render_haproxy(_ALL, stats_socket=str(tmp_path / "s.sock"), pid_file=str(tmp_path / "p")))
    done = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(NGINX is None, reason="nginx binary not installed")
def test_nginx_accepts_the_rendered_config(tmp_path):
    for sub in ("logs", "tmp"):
        (tmp_path / sub).mkdir()
    cfg = tmp_path / "nginx.conf"
    cfg.write_text(render_nginx(_ALL, prefix=str(tmp_path), version=nginx_version(_ALL, prefix=str(tmp_path))))
    done = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(cfg), "-e", "stderr"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
