"""agent.service.desired_cache: the key covers every rule the loader applies; a bad cache file is set aside."""

from __future__ import annotations

import logging
import shutil

import pytest

from agent.core.model import DesiredState
from agent.service import desired_cache
from agent.service.desired_cache import DesiredCache


@pytest.fixture
def core_copy(tmp_path, monkeypatch):
    """A copy of agent/core the digest reads instead of the real one (the real package is never edited)."""
    copy = tmp_path / "core"
    shutil.copytree(desired_cache._CORE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(desired_cache, "_CORE", copy)
    monkeypatch.setattr(desired_cache, "_schema_dir", lambda: desired_cache.Path(__file__).parents[1] / "schemas")
    desired_cache._code_digest.cache_clear()
    yield copy
    desired_cache._code_digest.cache_clear()


@pytest.mark.parametrize("module", ["render/supervisor.py", "render/lb.py", "load/conflicts.py", "plan.py", "model.py"])
def test_a_change_to_any_core_module_changes_the_key(core_copy, module, tmp_path):
    """The key was a hand-kept list of five files that left out supervisor_conf.py, which decides whether a
    revision is accepted: a revision pickled under the old rules was trusted after an upgrade."""
    cache = DesiredCache(tmp_path / "cache")
    before = cache.key("a" * 40, "", "h1", ("pip",))
    with open(core_copy / module, "a") as fh:
        fh.write("\n# a tightened rule\n")
    desired_cache._code_digest.cache_clear()
    assert cache.key("a" * 40, "", "h1", ("pip",)) != before


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"not a pickle at all", b"\x80\x04K\x01."],
                         ids=["empty", "truncated", "text", "an int"])
def test_a_bad_cache_file_is_set_aside_and_missed(tmp_path, caplog, content):
    cache = DesiredCache(tmp_path / "cache")
    key = cache.key("b" * 40, "", "h1", ())
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{key}.pickle").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="gitops_agent.cache"):
        assert cache.get(key) is None
    assert "unreadable" in caplog.text
    assert not (tmp_path / "cache" / f"{key}.pickle").exists()
    assert (tmp_path / "cache" / f"{key}.bad").read_bytes() == content


def test_a_read_only_cache_reads_but_never_writes(tmp_path):
    writer = DesiredCache(tmp_path / "cache")
    state = DesiredState.of("h1", ())
    writer.put("k1", state)
    reader = DesiredCache(tmp_path / "cache", read_only=True)
    assert reader.get("k1") == state
    reader.put("k2", state)
    (tmp_path / "cache" / "k3.pickle").write_bytes(b"junk")
    assert reader.get("k3") is None
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k1.pickle", "k3.pickle"]
