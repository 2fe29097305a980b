"""agent.service.store: a status file that cannot be read never stops the agent (issue 12 item 6)."""

from __future__ import annotations

import logging

import pytest

from agent.service.store import RevisionRecord, Status, load_status, save_status

BAD = {
    "truncated": b'{"version": 1, "host": "h1", "applied": {"sha": "ab',
    "empty": b"",
    "garbage": b"\x00\xff\xfe garbage \x80",
    "a list": b"[]",
    "a string": b'"status"',
    "wrong shape": b'{"applied": "not an object"}',
    "resources not an object": b'{"resources": [1, 2]}',
    "a resource not an object": b'{"resources": {"program:web": 3}}',
    "unknown record field": b'{"applied": {"sha": "x", "colour": "blue"}}',
}


@pytest.mark.parametrize("content", BAD.values(), ids=BAD.keys())
def test_a_corrupt_status_reads_as_empty_and_a_writer_sets_it_aside(tmp_path, caplog, content):
    path = tmp_path / "status.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="gitops_agent.store"):
        assert load_status(path) == Status()                 # a reader (status, plan): leaves the file
    assert path.read_bytes() == content
    assert "unreadable" in caplog.text

    assert load_status(path, set_aside=True) == Status()     # the agent holding the root lock
    assert not path.exists()
    aside = list(tmp_path.glob("status.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content


def test_a_good_status_round_trips(tmp_path):
    path = tmp_path / "status.json"
    status = Status(host="h1", applied=RevisionRecord("a" * 40, "main", 1.0, "first", 2.0), result="applied",
                    resources={"program:web": {"state": "ok", "message": "RUNNING", "at": 2.0}})
    save_status(path, status)
    assert load_status(path, set_aside=True) == status
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_missing_status_is_empty_and_says_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert load_status(tmp_path / "none.json", set_aside=True) == Status()
    assert caplog.text == ""


def test_the_status_file_is_the_json_of_to_json_one_entry_a_line(tmp_path):
    """save_status writes its own layout (the C encoder, one line per field and per entry) of exactly the
    data `to_json` gives; and to_json is a copy a caller may change."""
    import json
    from dataclasses import asdict

    status = Status(host="h1", applied=RevisionRecord("a" * 40, "main", 1.0, "first é", 2.0), result="applied",
                    resources={"program:web": {"state": "drift", "message": 'say "hi"\n', "at": 2.0, "since": 1.5},
                               "venv:main": {"state": "ok", "message": "", "at": 2.0}},
                    rollouts={"shop": {"id": "x", "step": 1, "weights": [1, 2]}},
                    apps={"shop": {"services": {"web": {"port": 8000, "health": None}}, "notes": []}},
                    events=[{"at": 1.0, "kind": "applied", "app": "", "message": "a b"}], deployed={})
    path = tmp_path / "status.json"
    save_status(path, status)
    text = path.read_text()
    assert status.to_json() == {"version": 1, **asdict(status)}        # what it was before it was hand-written
    assert json.loads(text) == json.loads(json.dumps(status.to_json()))
    assert text.endswith("}\n") and '\n    "program:web": {' in text and '\n    "venv:main": {' in text
    copy = status.to_json()
    copy["resources"]["program:web"]["state"] = "ok"
    copy["events"].append({})
    assert status.resources["program:web"]["state"] == "drift" and len(status.events) == 1


def test_a_write_that_only_moves_the_times_is_whole_but_not_made_durable(tmp_path, monkeypatch):
    """The daemon's no-op polls change only when things ran: the file is still replaced whole (its own fsync,
    then the rename), but without atomic_write's directory fsync; any other change goes through atomic_write."""
    import agent.service.store as store

    path = tmp_path / "status.json"
    status = Status(host="h1", attempted=RevisionRecord("a" * 40, "main", 1.0, "first", 2.0), result="converged",
                    resources={"program:web": {"state": "ok", "message": "RUNNING", "at": 2.0}}, last_reconcile_at=2.0)
    save_status(path, status)
    durable = []
    monkeypatch.setattr(store, "atomic_write", lambda *a, **kw: durable.append(a))

    loaded = load_status(path)
    previous = loaded.view()
    loaded.last_reconcile_at = 3.0
    loaded.attempted = RevisionRecord("a" * 40, "main", 1.0, "first", 3.0)
    loaded.resources = {"program:web": {"state": "ok", "message": "RUNNING", "at": 3.0}}
    save_status(path, loaded, previous)
    assert durable == [] and load_status(path) == loaded and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]          # no temp file left

    previous = loaded.view()
    loaded.resources = {"program:web": {"state": "drift", "message": "edited", "at": 4.0}}
    save_status(path, loaded, previous)
    assert len(durable) == 1
