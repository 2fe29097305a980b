"""Settings: flag > GITOPS_AGENT_* variable > --config file > default, checked for type and range.

The inputs go through the CLI's own parser and `build_settings`, as `gitops-agent` does, so a flag
spelled differently from its setting (`--health-wait` -> health_wait_s) is covered too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings as hyp_settings, strategies as st

from agent.cli import _parser, main
from agent.core.errors import ConfigError
from agent.settings import ENV_PREFIX, Settings, build_settings


def settings(tmp_path: Path, *flags: str, env: dict[str, str] | None = None, config: str | None = None) -> Settings:
    """What `gitops-agent once FLAGS` would run with, given these variables and this config file text."""
    argv = ["once", *flags]
    if config is not None:
        path = tmp_path / "agent.yaml"
        path.write_text(config)
        argv += ["--config", str(path)]
    return build_settings(vars(_parser().parse_args(argv)), env or {})


# ----- precedence: one row per setting type -----

# setting, config-file line, variable value, flags, and the value each layer gives
PRECEDENCE = [
    ("ref", "ref: from-file", "from-env", ["--ref", "from-flag"], ("main", "from-file", "from-env", "from-flag")),
    ("retention", "retention: 4", "5", ["--retention", "6"], (3, 4, 5, 6)),
    ("health_wait_s", "health_wait_s: 7.5", "8.5", ["--health-wait", "9.5"], (30.0, 7.5, 8.5, 9.5)),
    ("allow_chaos", "allow_chaos: true", "false", ["--allow-chaos"], (False, True, False, True)),
    ("root", "root: /srv/file-root", "/srv/env-root", ["--root", "/srv/flag-root"],
     (Path("/var/lib/gitops-agent"), Path("/srv/file-root"), Path("/srv/env-root"), Path("/srv/flag-root"))),
    ("mode", "mode: warn", "enforce", ["--mode", "warn"], ("enforce", "warn", "enforce", "warn")),
    ("log_format", "log_format: json", "text", ["--log-format", "json"], ("text", "json", "text", "json")),
]


@pytest.mark.parametrize("name, line, env_value, flags, expected", PRECEDENCE, ids=[row[0] for row in PRECEDENCE])
def test_flag_beats_variable_beats_config_file_beats_default(tmp_path, name, line, env_value, flags, expected):
    env = {ENV_PREFIX + name.upper(): env_value}
    layers = [
        settings(tmp_path),                                        # default
        settings(tmp_path, config=line + "\n"),                    # config file
        settings(tmp_path, env=env, config=line + "\n"),           # variable over the file
        settings(tmp_path, *flags, env=env, config=line + "\n"),   # flag over both
    ]
    assert tuple(getattr(s, name) for s in layers) == expected


def test_the_config_file_may_come_from_the_environment(tmp_path):
    conf = tmp_path / "from-env.yaml"
    conf.write_text("retention: 7\nlog-level: debug\n")            # option spelling (dashes) is fine in a file
    s = settings(tmp_path, env={ENV_PREFIX + "CONFIG": str(conf)})
    assert s.retention == 7 and s.log_level == "debug"


def test_options_named_unlike_their_setting_work_in_every_source(tmp_path):
    """--health-wait / --poll-interval: GITOPS_AGENT_HEALTH_WAIT used to be ignored without a word."""
    assert settings(tmp_path, env={ENV_PREFIX + "HEALTH_WAIT": "12"}).health_wait_s == 12.0
    assert settings(tmp_path, env={ENV_PREFIX + "POLL_INTERVAL_S": "20"}).poll_interval_s == 20.0
    assert settings(tmp_path, config="health-wait: 11\npoll_interval: 25\n").health_wait_s == 11.0
    with pytest.raises(ConfigError, match="keep one"):
        settings(tmp_path, env={ENV_PREFIX + "HEALTH_WAIT": "12", ENV_PREFIX + "HEALTH_WAIT_S": "13"})
    with pytest.raises(ConfigError, match="keep one"):
        settings(tmp_path, config="health-wait: 11\nhealth_wait_s: 12\n")


def test_defaults_need_nothing(tmp_path):
    s = settings(tmp_path)
    assert (s.ref, s.retention, s.health_wait_s, s.poll_interval_s, s.splay, s.mode) == ("main", 3, 30.0, 15.0, 0.0, "enforce")


# ----- clear errors: unknown keys, wrong types -----

def test_unknown_key_in_the_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) helth_wait, retension \(known: .*health_wait"):
        settings(tmp_path, config="retension: 3\nhelth-wait: 5\n")


@pytest.mark.parametrize("config, message", [
    ("retention: [1, 2]\n", r"retention in config file .*: \[1, 2\] is not a whole number"),
    ("retention: 2.5\n", r"retention in config file .*: 2.5 is not a whole number"),
    ("retention: true\n", r"retention .*True is not a whole number"),
    ("health_wait_s: fast\n", r"health_wait_s in config file .*'fast' is not a number"),
    ("allow_chaos: maybe\n", r"allow_chaos .*'maybe' is not a yes/no value"),
    ("allow_chaos: [true]\n", r"allow_chaos .*is not a yes/no value"),
    ("ref: 1.10\n", r"ref .*1.1 is not a string but YAML read it as float: quote it"),
    ("repo: {url: x}\n", r"repo .*is not a string"),
    ("root: 5\n", r"root .*5 is not a path"),
], ids=["list-for-int", "float-for-int", "bool-for-int", "word-for-float", "word-for-bool", "list-for-bool",
        "float-for-str", "mapping-for-str", "int-for-path"])
def test_a_value_of_the_wrong_type_in_the_config_file(tmp_path, config, message):
    with pytest.raises(ConfigError, match=message):
        settings(tmp_path, config=config)


@pytest.mark.parametrize("variable, value, message", [
    ("RETENTION", "three", r"GITOPS_AGENT_RETENTION: 'three' is not a whole number"),
    ("HEALTH_WAIT", "30s", r"GITOPS_AGENT_HEALTH_WAIT: '30s' is not a number"),
    ("VERIFY_SIGNATURES", "sure", r"GITOPS_AGENT_VERIFY_SIGNATURES: 'sure' is not a yes/no value"),
])
def test_a_bad_variable_names_the_variable(tmp_path, variable, value, message):
    with pytest.raises(ConfigError, match=message):
        settings(tmp_path, env={ENV_PREFIX + variable: value})


def test_a_config_file_that_is_not_a_mapping_or_not_there(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        settings(tmp_path, config="- retention: 3\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        settings(tmp_path, "--config", str(tmp_path / "missing.yaml"))


# ----- ranges -----

@pytest.mark.parametrize("flags, message", [
    (["--health-wait", "0"], r"--health-wait: 0 is out of range: it must be more than 0 and at most 3600 seconds"),
    (["--health-wait", "-5"], r"--health-wait: -5 is out of range"),
    (["--health-wait", "nan"], r"--health-wait: nan is out of range"),
    (["--health-wait", "86400"], r"--health-wait: 86400 is out of range"),
    (["--retention", "0"], r"--retention: 0 is out of range: it must be at least 1 and at most 100 venvs"),
    (["--retention", "1000"], r"--retention: 1000 is out of range"),
    (["--mode", "warn", "--log-level", "loud"], r"--log-level: must be DEBUG or INFO or WARNING or ERROR or CRITICAL"),
    (["--supervisor", "tcp://x"], r"--supervisor: must be 'embedded' or unix://"),
    (["--path", "../up"], r"--path: '../up' must be a relative subdirectory"),
], ids=["health-wait-0", "health-wait-negative", "health-wait-nan", "health-wait-a-day", "retention-0",
        "retention-1000", "log-level", "supervisor", "path"])
def test_out_of_range_flags_are_refused_with_the_allowed_range(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        settings(tmp_path, *flags)


def test_daemon_numbers_are_checked_too(tmp_path):
    def run_settings(*flags: str, env: dict[str, str] | None = None) -> Settings:
        return build_settings(vars(_parser().parse_args(["run", *flags])), env or {})

    with pytest.raises(ConfigError, match=r"--poll-interval: 0 is out of range: it must be more than 0 and at most 86400"):
        run_settings("--poll-interval", "0")
    with pytest.raises(ConfigError, match=r"--splay: -1 is out of range"):
        run_settings("--splay", "-1")
    with pytest.raises(ConfigError, match=r"--listen: must be HOST:PORT with a port from 1 to 65535, not '127.0.0.1:70000'"):
        run_settings("--listen", "127.0.0.1:70000")
    with pytest.raises(ConfigError, match=r"GITOPS_AGENT_POLL_INTERVAL_S: inf is out of range"):
        run_settings(env={ENV_PREFIX + "POLL_INTERVAL_S": "inf"})
    s = run_settings("--poll-interval", "1", "--splay", "0", "--listen", "[::1]:9400")
    assert (s.poll_interval_s, s.splay, s.listen) == (1.0, 0.0, "[::1]:9400")


def test_every_bad_value_is_reported_at_once_and_says_where_it_came_from(tmp_path):
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, "--retention", "0", env={ENV_PREFIX + "HEALTH_WAIT_S": "0"}, config="mode: lazy\n")
    text = str(info.value)
    assert "--retention: 0 is out of range" in text
    assert "GITOPS_AGENT_HEALTH_WAIT_S: 0 is out of range" in text
    assert "mode in config file" in text and "'lazy'" in text


def test_the_cli_refuses_health_wait_0_before_doing_anything(tmp_path, capsys):
    root = tmp_path / "root"
    code = main(["once", "--repo", f"file://{tmp_path}/nowhere", "--root", str(root), "--health-wait", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "--health-wait: 0 is out of range: it must be more than 0 and at most 3600 seconds" in err
    assert "Traceback" not in err and not root.exists()   # refused at start: nothing written under --root


# ----- precedence as a property: any subset of sources, the highest given one wins -----

_layer = st.one_of(st.none(), st.integers(1, 100))


@hyp_settings(max_examples=60, deadline=None)
@given(file_value=_layer, env_value=_layer, flag_value=_layer)
def test_the_highest_source_given_wins(tmp_path_factory, file_value, env_value, flag_value):
    tmp = tmp_path_factory.mktemp("prop")
    flags = ["--retention", str(flag_value)] if flag_value is not None else []
    env = {ENV_PREFIX + "RETENTION": str(env_value)} if env_value is not None else {}
    config = f"retention: {file_value}\n" if file_value is not None else None
    expected = next((v for v in (flag_value, env_value, file_value) if v is not None), 3)
    assert settings(tmp, *flags, env=env, config=config).retention == expected
