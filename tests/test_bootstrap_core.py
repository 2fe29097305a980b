"""agent.core.bootstrap: the pure part of `bootstrap` (probe parsing, target checks, rendered files), as
tables; the rendered systemd unit passes `systemd-analyze verify`, the supervisord config supervisord's own
parser, and the probe script runs under plain sh."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.assets import asset_text
from agent.core import bootstrap as core
from agent.drivers.ssh import SshAddress

PATHS = core.Paths("/opt/gitops-agent", "/var/lib/gitops-agent")
VENV = "/opt/gitops-agent/venvs/gitops-agent-1.2.3-abcdefabcdef"


@pytest.mark.parametrize("url, expected", [
    ("ssh://root@web-1", SshAddress("root", "web-1", None)),
    ("ssh://deploy@10.0.0.5:2222", SshAddress("deploy", "10.0.0.5", 2222)),
    ("ssh://web-1", SshAddress(None, "web-1", None)),
    ("ssh://ops@[2001:db8::1]:22", SshAddress("ops", "2001:db8::1", 22)),
])
def test_ssh_address(url, expected):
    assert SshAddress.parse(url) == expected


@pytest.mark.parametrize("url", ["web-1", "https://web-1/", "ssh://u:pw@web-1", "ssh://web-1/path", "ssh://h:99999",
                                 "ssh://"])
def test_ssh_address_refused(url):
    with pytest.raises(ValueError):
        SshAddress.parse(url)


def facts(text: str) -> core.TargetFacts:
    return core.parse_probe(text)


@pytest.mark.parametrize("probe, expected", [
    ("python=/usr/bin/python3 3.11 1", ("venv", "/usr/bin/python3")),
    ("python=/usr/bin/python3 3.9 1\npython=/usr/local/bin/python3.12 3.12 1", ("venv", "/usr/local/bin/python3.12")),
    ("python=/usr/bin/python3 3.11 0\nuv=/usr/local/bin/uv", ("uv", "/usr/local/bin/uv")),
    ("uv=/root/.local/bin/uv", ("uv", "/root/.local/bin/uv")),
    ("python=/opt/my python/bin/python3 3.10 1", ("venv", "/opt/my python/bin/python3")),
])
def test_choose_installer(probe, expected):
    assert core.choose_installer(facts(probe)) == expected


@pytest.mark.parametrize("probe, words", [
    ("path=/usr/bin", ["no python3", "apt install python3 python3-venv", "PATH (/usr/bin)"]),
    ("python=/usr/bin/python3 3.11 0", ["/usr/bin/python3 3.11 (no venv/ensurepip)", "apt install python3-venv"]),
    ("python=/usr/bin/python3 3.8 1", ["/usr/bin/python3 3.8", "Python >= 3.10"]),
])
def test_unfit_target_says_what_is_missing(probe, words):
    with pytest.raises(core.TargetUnfit) as err:
        core.choose_installer(facts(probe))
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("wanted, probe, init", [
    ("auto", "uid=0\nsystemd=1", "systemd"),
    ("auto", "uid=1000\nsystemd=1", "supervisord"),
    ("auto", "uid=0\nsystemd=0", "supervisord"),
    ("auto", 'uid=0\nsystemd=1\nstate={"init": "supervisord"}', "supervisord"),    # a rerun keeps its init
    ("supervisord", "uid=0\nsystemd=1", "supervisord"),
    ("systemd", "uid=0\nsystemd=1", "systemd"),
])
def test_choose_init(wanted, probe, init):
    assert core.choose_init(wanted, facts(probe)) == init


@pytest.mark.parametrize("wanted, probe, word", [
    ("systemd", "uid=0\nsystemd=0", "systemd is not running"),
    ("systemd", "uid=1000\nuser=ops\nsystemd=1", "log in as root"),
    ("systemd", 'uid=0\nsystemd=1\nstate={"init": "supervisord"}', "already installed there with --init supervisord"),
])
def test_choose_init_refused(wanted, probe, word):
    with pytest.raises(core.TargetUnfit, match=word):
        core.choose_init(wanted, facts(probe))


def test_probe_script_runs_under_sh(tmp_path):
    out = subprocess.run(["/bin/sh", "-c", core.PROBE_SCRIPT, "sh", str(tmp_path / "a" / "b"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    f = core.parse_probe(out)
    assert f.uid >= 0 and f.user and f.path
    assert not f.prefix_exists and f.prefix_writable and f.prefix_new == str(tmp_path / "a")
    assert f.root_exists and f.root_new == "" and f.state == {}
    assert any(p.version >= (3, 10) for p in f.pythons)


def test_settings_are_stable_yaml():
    a = core.render_settings({"root": "/var/lib/x", "repo": "https://git/x.git", "listen": "127.0.0.1:9400"})
    b = core.render_settings({"listen": "127.0.0.1:9400", "repo": "https://git/x.git", "root": "/var/lib/x"})
    assert a == b and yaml.safe_load(a) == {"root": "/var/lib/x", "repo": "https://git/x.git", "listen": "127.0.0.1:9400"}


def test_venv_name_changes_with_the_wheel():
    assert core.venv_name("1.2.3", "ab" * 32) != core.venv_name("1.2.3", "cd" * 32)
    assert core.venv_name("1.2.3+local/x", "ab" * 32).startswith("gitops-agent-1.2.3+local_x-")


def test_supervisord_config_parses(tmp_path):
    from supervisor.options import ServerOptions

    paths = core.Paths(str(tmp_path / "p"), str(tmp_path / "r"))
    for sub in ("logs", "supervisor"):
        (tmp_path / "p" / sub).mkdir(parents=True)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(core.render_supervisord(paths, VENV))
    opts = ServerOptions()
    opts.realize(args=["-c", str(conf)])
    (group,) = opts.process_group_configs
    (program,) = group.process_configs
    assert program.name == "gitops-agent" and program.command == f"{VENV}/bin/gitops-agent run --config {paths.settings}"
    assert program.stopsignal == 15 and not program.stopasgroup and program.autorestart
    assert opts.server_configs[0]["chmod"] == 0o700


def test_supervisord_config_refuses_what_ini_cannot_carry():
    with pytest.raises(core.TargetUnfit):
        core.render_supervisord(core.Paths("/opt/a;b", "/r"), VENV)


def test_systemd_unit_from_the_deploy_unit():
    unit = core.render_systemd_unit(asset_text("agent.deploy", "systemd/gitops-agent.service"), PATHS, VENV, "root")
    lines = unit.splitlines()
    assert f"ExecStart={VENV}/bin/gitops-agent run --config /opt/gitops-agent/etc/agent.yaml" in lines
    assert "User=root" in lines and not any(line.startswith("Group=") for line in lines)
    assert "KillMode=process" in lines and "Restart=always" in lines and "ProtectSystem=strict" in lines
    assert "StateDirectory=gitops-agent" in lines and "ReadWritePaths=/var/lib/gitops-agent" in lines
    elsewhere = core.render_systemd_unit(asset_text("agent.deploy", "systemd/gitops-agent.service"),
                                         core.Paths("/opt/a", "/srv/agent"), VENV, "ops").splitlines()
    assert "ReadWritePaths=/srv/agent" in elsewhere and "WorkingDirectory=/srv/agent" in elsewhere
    assert not any(line.startswith("StateDirectory") for line in elsewhere)
    assert "Environment=GITOPS_AGENT_ROOT=/srv/agent" in elsewhere


def test_systemd_unit_verifies(tmp_path):
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.skip("systemd-analyze not installed")
    venv = Path(sys.executable).resolve().parent.parent          # verify checks that ExecStart exists
    if not (venv / "bin" / "gitops-agent").exists():
        (tmp_path / "venv" / "bin").mkdir(parents=True)
        (tmp_path / "venv" / "bin" / "gitops-agent").symlink_to(sys.executable)
        venv = tmp_path / "venv"
    unit = tmp_path / "gitops-agent.service"
    unit.write_text(core.render_systemd_unit(asset_text("agent.deploy", "systemd/gitops-agent.service"),
                                             PATHS, str(venv), "root"))
    out = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True)
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if unit.name in line]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr


@pytest.mark.parametrize("listen, url", [
    ("127.0.0.1:9400", "http://127.0.0.1:9400"), ("0.0.0.0:9400", "http://127.0.0.1:9400"),
    (":9400", "http://127.0.0.1:9400"), ("[::]:9400", "http://[::1]:9400"), ("[::1]:9400", "http://[::1]:9400"),
    ("10.0.0.5:9400", "http://10.0.0.5:9400"),
])
def test_check_url(listen, url):
    assert core.check_url(listen) == url


def test_options_from_args_merge_a_local_config_under_the_flags(tmp_path):
    from agent.cli import _parser
    from agent.service.bootstrap import options_from_args

    cfg = tmp_path / "agent.yaml"
    cfg.write_text("health-wait: 5\nrepo: https://git.example/state.git\npoll-interval: 7\n")
    signers = tmp_path / "signers"
    signers.write_text("x ssh-ed25519 AAAA\n")
    args = _parser().parse_args(["bootstrap", "ssh://ops@web-1:2222", "--config", str(cfg), "--repo",
                                 "https://git.example/other.git", "--allowed-signers", str(signers),
                                 "--root", "/srv/agent"])
    opts = options_from_args(vars(args))
    assert opts.address == SshAddress("ops", "web-1", 2222)
    assert opts.settings == {"health_wait_s": 5, "poll_interval_s": 7, "repo": "https://git.example/other.git",
                             "root": "/srv/agent", "listen": "127.0.0.1:9400"}
    assert opts.files == {"allowed_signers": signers} and opts.init == "auto" and opts.wheel is None
    from agent import __version__

    assert opts.version == __version__            # from the index: gitops-agent==<this version>
