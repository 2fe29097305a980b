"""Secret decryption with the real `age` CLI (DESIGN §3a "Secrets"): byte-exact, clear errors, no plaintext."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.core.errors import ConfigError, Permanent
from agent.drivers.age import AgeMissing, SecretUndecryptable, decrypt, public_recipient

pytestmark = pytest.mark.skipif(shutil.which("age") is None, reason="the age CLI is not installed")

WHAT = "apps/shop/django.env.age"
PLAINTEXT = b"SECRET_KEY=p%a,s\"s= w'rd\nDB_PASSWORD=hunter2-plaintext\n"
ALL_BYTES = bytes(range(256)) * 64


def keygen(path: Path) -> str:
    """A new identity file at `path`; returns its recipient as age-keygen announced it."""
    done = subprocess.run(["age-keygen", "-o", str(path)], capture_output=True, check=True, text=True)
    return done.stderr.strip().removeprefix("Public key: ")


def encrypt(plaintext: bytes, *recipients: str, armor: bool = False) -> bytes:
    argv = ["age", *(["-a"] if armor else [])]
    for r in recipients:
        argv += ["-r", r]
    return subprocess.run(argv, input=plaintext, capture_output=True, check=True).stdout


@pytest.fixture()
def keys(tmp_path):
    one, two = tmp_path / "host1.key", tmp_path / "host2.key"
    return {"one": one, "r1": keygen(one), "two": two, "r2": keygen(two)}


def failure(ciphertext: bytes, identities, what: str = WHAT) -> SecretUndecryptable:
    with pytest.raises(SecretUndecryptable) as info:
        decrypt(ciphertext, identities, what)
    error = info.value
    assert isinstance(error, Permanent) and isinstance(error, ValueError)
    assert error.what == what and str(error).startswith(f"{what}: cannot decrypt: ")
    for secret in (b"p%a,s", b"hunter2", b"SECRET_KEY", b"DB_PASSWORD"):
        assert secret.decode() not in str(error)
    assert len(error.reason) < 700
    return error


@pytest.mark.parametrize("armor", [False, True])
@pytest.mark.parametrize("plaintext", [PLAINTEXT, ALL_BYTES, b"", b"\0", ALL_BYTES * 20], ids=[
    "dotenv", "bytes-0-255", "empty", "nul", "multi-chunk"])
def test_round_trip_is_byte_exact(keys, armor, plaintext):
    ciphertext = encrypt(plaintext, keys["r1"], armor=armor)
    assert ciphertext.startswith(b"-----BEGIN AGE" if armor else b"age-encryption.org/v1\n")
    assert decrypt(ciphertext, [keys["one"]], WHAT) == plaintext


def test_armor_survives_crlf_and_a_leading_newline(keys):
    armored = encrypt(PLAINTEXT, keys["r1"], armor=True)
    assert decrypt(armored.replace(b"\n", b"\r\n"), [keys["one"]], WHAT) == PLAINTEXT
    assert decrypt(b"\n  " + armored, [keys["one"]], WHAT) == PLAINTEXT


def test_second_identity_matches(keys):
    ciphertext = encrypt(PLAINTEXT, keys["r2"])
    assert decrypt(ciphertext, [keys["one"], keys["two"]], WHAT) == PLAINTEXT


def test_any_recipient_of_several_decrypts(keys):
    ciphertext = encrypt(PLAINTEXT, keys["r1"], keys["r2"], armor=True)
    assert decrypt(ciphertext, [keys["one"]], WHAT) == PLAINTEXT
    assert decrypt(ciphertext, [keys["two"]], WHAT) == PLAINTEXT


def test_a_relative_identity_path_that_looks_like_an_option(keys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("-i.key").write_bytes(keys["one"].read_bytes())
    assert decrypt(encrypt(PLAINTEXT, keys["r1"]), [Path("-i.key")], WHAT) == PLAINTEXT
    assert public_recipient(Path("-i.key")) == keys["r1"]


def test_an_identity_file_with_two_keys(keys, tmp_path):
    both = tmp_path / "both.key"
    both.write_bytes(keys["one"].read_bytes() + keys["two"].read_bytes())
    assert decrypt(encrypt(PLAINTEXT, keys["r2"]), [both], WHAT) == PLAINTEXT


def test_wrong_key_says_not_a_recipient(keys):
    error = failure(encrypt(PLAINTEXT, keys["r1"]), [keys["two"]])
    assert "not a recipient" in error.reason and "age-keygen -y" in error.reason


def test_tampered_ciphertext(keys):
    ciphertext = bytearray(encrypt(PLAINTEXT, keys["r1"]))
    ciphertext[-3] ^= 0x01      # in the payload's last (only) chunk
    error = failure(bytes(ciphertext), [keys["one"]])
    assert "damaged" in error.reason


def test_tampered_header(keys):
    ciphertext = bytearray(encrypt(PLAINTEXT, keys["r1"]))
    mac_line = ciphertext.index(b"\n--- ") + 6
    ciphertext[mac_line + 2] = ord("A") if ciphertext[mac_line + 2] != ord("A") else ord("B")
    error = failure(bytes(ciphertext), [keys["one"]])
    assert "damaged" in error.reason


def test_tampered_armor(keys):
    armored = encrypt(PLAINTEXT, keys["r1"], armor=True)
    lines = armored.split(b"\n")
    body = bytearray(lines[-3])     # the last full base64 line before the footer
    body[5] = ord("A") if body[5] != ord("A") else ord("B")
    lines[-3] = bytes(body)
    error = failure(b"\n".join(lines), [keys["one"]])
    assert "damaged" in error.reason


def test_tampered_last_chunk_of_a_long_file_gives_no_partial_plaintext(keys):
    # age streams 64 KiB chunks: the first ones are written out before the bad last one is seen
    plaintext = b"".join(b"SECRET_KEY=line-%06d-plaintext\n" % i for i in range(10_000))
    ciphertext = bytearray(encrypt(plaintext, keys["r1"]))
    ciphertext[-3] ^= 0x01
    error = failure(bytes(ciphertext), [keys["one"]])
    assert "line-0" not in str(error) and "plaintext" not in error.reason.replace("could hold plaintext", "")


@pytest.mark.parametrize("cut", [1, 20, 200])
def test_truncated_ciphertext(keys, cut):
    ciphertext = encrypt(PLAINTEXT, keys["r1"])
    error = failure(ciphertext[:-cut], [keys["one"]])
    assert "damaged" in error.reason


def test_missing_identity_file_is_named(keys, tmp_path):
    missing = tmp_path / "no-such.key"
    error = failure(encrypt(PLAINTEXT, keys["r1"]), [keys["one"], missing])
    assert str(missing) in error.reason and "cannot be read" in error.reason


def test_identity_that_is_a_directory(keys, tmp_path):
    error = failure(encrypt(PLAINTEXT, keys["r1"]), [tmp_path])
    assert str(tmp_path) in error.reason and "directory" in error.reason


def test_identity_file_that_is_not_an_identity(keys, tmp_path):
    bogus = tmp_path / "bogus.key"
    bogus.write_text("hello, I am not a key\n")
    error = failure(encrypt(PLAINTEXT, keys["r1"]), [bogus])
    assert "not a usable age identity" in error.reason
    assert "I am not a key" not in error.reason


def test_no_identities_says_how_to_configure_one(keys):
    error = failure(encrypt(PLAINTEXT, keys["r1"]), [])
    assert "--age-identity FILE" in error.reason and "GITOPS_AGENT_AGE_IDENTITY" in error.reason


def test_a_file_committed_unencrypted_is_refused_without_quoting_it(keys):
    error = failure(PLAINTEXT, [keys["one"]])
    assert "not an age-encrypted file" in error.reason


def test_age_quoting_the_input_is_cut(keys):
    # a real age header followed by plaintext: age's message quotes the line it could not parse
    error = failure(b"age-encryption.org/v1\n" + PLAINTEXT, [keys["one"]])
    assert "damaged" in error.reason


def test_no_age_binary(keys, tmp_path, monkeypatch):
    ciphertext = encrypt(PLAINTEXT, keys["r1"])
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(AgeMissing, match="install the age package"):
        decrypt(ciphertext, [keys["one"]], WHAT)
    with pytest.raises(AgeMissing):
        public_recipient(keys["one"])


def test_public_recipient(keys, tmp_path):
    assert public_recipient(keys["one"]) == keys["r1"]
    assert public_recipient(keys["two"]).startswith("age1")
    bogus = tmp_path / "bogus.key"
    bogus.write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a usable age identity"):
        public_recipient(bogus)
    with pytest.raises(ConfigError):
        public_recipient(tmp_path / "missing.key")
