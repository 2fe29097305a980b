"""Decrypted secret files (DESIGN §3a "Secrets"): Docker's --env-file rule, every value byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.dotenv import DotenvProblem, parse_dotenv
from agent.core.errors import Permanent

SECRET = 'p%a,s"s= w\'rd'
FILE = "apps/shop/django.env.age"


def test_values_are_taken_literally():
    data = (
        "# a comment\n"
        "\n"
        "   \t\n"
        f"SECRET_KEY={SECRET}\n"
        "QUOTED=\"kept\"\n"
        "SINGLE='kept'\n"
        "SPACES=  both ends  \n"
        "EQUALS=a=b==c\n"
        "HASH=x # not a comment\n"
        "DOLLAR=$HOME ${PATH} $(id) `id`\n"
        "BACKSLASH=a\\nb\\\\c\\\n"
        "EMPTY=\n"
        "  INDENTED=yes\n"
        "\tTABBED=yes\n"
        "export EXPORTED=yes\n"
        "export\tEXPORTED_TAB=yes\n"
        "    # an indented comment\n"
        "UNICODE=päss 🔑 \u2028 \x0b\x0c\x1c\x85\n"
        "_UNDERSCORE_1=x"
    ).encode()
    assert parse_dotenv(data, FILE) == {
        "SECRET_KEY": SECRET,
        "QUOTED": '"kept"',
        "SINGLE": "'kept'",
        "SPACES": "  both ends  ",
        "EQUALS": "a=b==c",
        "HASH": "x # not a comment",
        "DOLLAR": "$HOME ${PATH} $(id) `id`",
        "BACKSLASH": "a\\nb\\\\c\\",
        "EMPTY": "",
        "INDENTED": "yes",
        "TABBED": "yes",
        "EXPORTED": "yes",
        "EXPORTED_TAB": "yes",
        "UNICODE": "päss 🔑 \u2028 \x0b\x0c\x1c\x85",
        "_UNDERSCORE_1": "x",
    }


def test_keys_keep_file_order():
    assert list(parse_dotenv(b"B=1\nA=2\nC=3\n", FILE)) == ["B", "A", "C"]


def test_crlf_line_ends_lose_only_the_final_cr():
    assert parse_dotenv(b"A=1\r\nB= x\r y \r\n\r\nC=\r\r\n", FILE) == {"A": "1", "B": " x\r y ", "C": "\r"}


def test_a_key_named_export_is_a_key():
    assert parse_dotenv(b"export=1\nexport_x=2\n", FILE) == {"export": "1", "export_x": "2"}


def test_utf8_bom_is_ignored_and_empty_files_are_empty():
    assert parse_dotenv("\ufeffA=1\n".encode(), FILE) == {"A": "1"}
    assert parse_dotenv(b"", FILE) == {}
    assert parse_dotenv(b"\n# only a comment\n", FILE) == {}


@pytest.mark.parametrize("data, line, words", [
    (b"A=1\n" + SECRET.replace("=", "").encode() + b"\n", 2, "no '='"),
    (b"A=1\n\n1KEY=" + SECRET.encode(), 3, "not a key"),
    (b"KEY NAME=" + SECRET.encode(), 1, "not a key"),
    (b"KEY =" + SECRET.encode(), 1, "not a key"),
    (b"=" + SECRET.encode(), 1, "not a key"),
    (b"K-Y=" + SECRET.encode(), 1, "not a key"),
    (b"export =" + SECRET.encode(), 1, "not a key"),
    ("KÉY=".encode() + SECRET.encode(), 1, "not a key"),
    (b"A=1\nB=2\nA=" + SECRET.encode(), 3, "A is given twice (first on line 1)"),
    (b"export A=1\nA=" + SECRET.encode(), 2, "A is given twice"),
    (b"A=1\nB=" + SECRET.encode() + b"\xff\n", 2, "not valid UTF-8"),
    (b"A=1\nB=\xc3", 2, "not valid UTF-8"),
    (b"A=1\n\nB=" + SECRET.encode() + b"\0x\n", 3, "NUL"),
    (b"# comment \0\nB=1", 1, "NUL"),
])
def test_problems_name_file_and_line_never_the_value(data, line, words):
    with pytest.raises(DotenvProblem) as info:
        parse_dotenv(data, FILE)
    problem = info.value
    assert isinstance(problem, Permanent) and isinstance(problem, ValueError)
    assert problem.line == line and problem.file == FILE
    assert words in problem.message
    assert str(problem).startswith(f"{FILE}:{line}: ")
    for text in (str(problem), repr(problem), problem.message):
        for part in (SECRET, SECRET.replace("=", ""), "p%a", "w'rd", "w\\'rd", "\\xff"):
            assert part not in text
    assert problem.__context__ is None or problem.__suppress_context__


KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True)
VALUES = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\n"), max_size=80,
).filter(lambda v: not v.endswith("\r"))


@given(st.dictionaries(KEYS, VALUES, max_size=12), st.sampled_from(["\n", "\r\n"]), st.booleans())
@settings(max_examples=150, deadline=None)
def test_round_trip(values, newline, final_newline):
    text = newline.join(f"{k}={v}" for k, v in values.items()) + (newline if final_newline else "")
    assert parse_dotenv(text.encode(), FILE) == values


@given(st.dictionaries(KEYS, VALUES, max_size=10))
@settings(max_examples=100, deadline=None)
def test_round_trip_with_export_indent_and_comments(values):
    lines = ["# written by a person", ""]
    for i, (k, v) in enumerate(values.items()):
        lines.append(("  export " if i % 2 else "\t") + f"{k}={v}")
        lines.append("   # " + v.replace("\r", ""))
    assert parse_dotenv("\n".join(lines).encode(), FILE) == values
