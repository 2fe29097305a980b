"""agent/core/_record.py: `@record` behaves as `@dataclass(frozen=True)` in everything the agent relies on:
immutability, equality and hash over the compared fields, repr without `repr=False` fields (secrets), a
class's own methods kept, pickling (the desired-state cache), `replace` and `fields`. Each case is checked
against a real frozen dataclass of the same shape."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field

import pytest

from agent.core._record import record
from agent.core.model import SecretFile


@record
class Creds:
    """A login."""

    user: str
    password: str = field(default="", repr=False)
    seen: tuple[str, ...] = ()
    notes: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class CredsDC:
    """The same, as a stock frozen dataclass."""

    user: str
    password: str = field(default="", repr=False)
    seen: tuple[str, ...] = ()
    notes: dict = field(default_factory=dict, compare=False)


@record
class OwnEq:
    value: int

    def __eq__(self, other):
        return isinstance(other, OwnEq)


@record
class OwnRepr:
    value: int

    def __repr__(self) -> str:
        return "<own>"


@record
class Empty:
    pass


@record
class One:
    only: str


def test_frozen_like_a_dataclass():
    c = Creds("ann", "s3cret")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.user = "bob"
    with pytest.raises(dataclasses.FrozenInstanceError):
        del c.user
    assert dataclasses.is_dataclass(c)
    assert [f.name for f in dataclasses.fields(Creds)] == [f.name for f in dataclasses.fields(CredsDC)]
    assert Creds.__match_args__ == CredsDC.__match_args__


def test_equality_and_hash_over_the_compared_fields_as_a_dataclass():
    pairs = [(("ann", "x"), ("ann", "x")), (("ann", "x"), ("ann", "y")), (("ann",), ("bob",)),
             (("ann", "x", ("a",)), ("ann", "x", ("b",)))]
    for left, right in pairs:
        assert (Creds(*left) == Creds(*right)) == (CredsDC(*left) == CredsDC(*right))
        assert (hash(Creds(*left)) == hash(Creds(*right))) == (hash(CredsDC(*left)) == hash(CredsDC(*right)))
    assert Creds("ann", notes={"a": 1}) == Creds("ann", notes={"b": 2})       # compare=False, as a dataclass
    assert Creds("ann") != CredsDC("ann")                                     # another class is never equal
    assert Creds("ann").__eq__("ann") is NotImplemented
    assert One("a") == One("a") and One("a") != One("b") and hash(One("a")) == hash(One("a"))
    assert Empty() == Empty() and hash(Empty()) == hash(Empty())
    assert {Creds("ann"), Creds("ann"), Creds("bob")} == {Creds("ann"), Creds("bob")}


def test_repr_hides_repr_false_fields_as_a_dataclass():
    c = Creds("ann", "s3cret", ("a",))
    assert repr(c) == repr(CredsDC("ann", "s3cret", ("a",))).replace("CredsDC", "Creds")
    assert "s3cret" not in repr(c)
    assert "CIPHERTEXT" not in repr(SecretFile("db", "secrets/db.age", b"CIPHERTEXT"))   # the model's own


def test_a_class_keeps_its_own_methods():
    assert OwnEq(1) == OwnEq(2)
    assert hash(OwnEq(1)) == hash(OwnEq(1)) and hash(OwnEq(1)) != hash(OwnEq(2))     # as a dataclass: by fields
    assert repr(OwnRepr(3)) == "<own>"
    assert Creds.__doc__ == "A login."
    assert Empty.__doc__ and One.__doc__.startswith("One(")


def test_pickle_replace_and_asdict():
    c = Creds("ann", "s3cret", ("a",), {"k": 1})
    back = pickle.loads(pickle.dumps(c))
    assert back == c and back.password == "s3cret" and back.notes == {"k": 1}
    assert dataclasses.replace(c, user="bob") == Creds("bob", "s3cret", ("a",))
    assert dataclasses.asdict(c) == dataclasses.asdict(CredsDC("ann", "s3cret", ("a",), {"k": 1}))
