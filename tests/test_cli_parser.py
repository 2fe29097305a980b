"""The command line builds only the named command's options (agent/cli.py `_parser`): the same parse as
the whole tree, for every command; help, --version and a typo still see every command."""

from __future__ import annotations

import pytest

from agent import cli

# one command line per command, with options of every kind it takes (common, its own, positional)
ARGV = {
    "once": ["once", "--repo", "file:///r", "--root", "/tmp/x", "--json", "--notify", "json://a", "--notify", "json://b"],
    "plan": ["plan", "--repo", "/r", "--ref", "v1", "--json", "--mode", "warn"],
    "validate": ["validate", "state", "--json", "--allow-chaos", "--repo-root", ".."],
    "status": ["status", "--root", "/tmp/x", "--json"],
    "facts": ["facts", "--root", "/tmp/x"],
    "run": ["run", "--repo", "/r", "--listen", "127.0.0.1:9", "--poll-interval", "2.5", "--ignore-windows"],
    "down": ["down", "--root", "/tmp/x"],
    "bootstrap": ["bootstrap", "ssh://u@h", "--wheel", "w.whl", "--init", "systemd", "--wait", "9",
                  "--age-identity", "k"],
    "suspend": ["suspend", "--app", "shop", "--reason", "incident 42"],
    "resume": ["resume", "--app", "shop"],
    "retry": ["retry"],
}


def test_every_command_has_a_sample():
    assert set(ARGV) == set(cli.COMMANDS) == set(cli._SUBCOMMANDS)


@pytest.mark.parametrize("command", sorted(ARGV))
def test_the_lean_parser_parses_as_the_whole_tree(command):
    argv = ARGV[command]
    lean = cli._parser(argv)
    whole = cli._parser([])                 # no command named: every command is built
    assert list(_choices(lean)) == [command]
    assert sorted(_choices(whole)) == sorted(cli.COMMANDS)
    assert vars(lean.parse_args(argv)) == vars(whole.parse_args(argv))


def test_a_bad_option_of_a_command_is_refused_by_it(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["once", "--no-such-option"])
    assert exc.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_a_mistyped_command_lists_them_all(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["oce"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'oce'" in err
    for command in cli.COMMANDS:
        assert repr(command) in err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in out


def _choices(parser):
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices
