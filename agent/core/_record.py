"""`@record`: the house's frozen dataclass, cheaper to create.

It is `@dataclass(frozen=True)`: the same fields, `__init__`, immutability, `fields()`/`replace()`, equality,
hash and repr (fields with `compare=False` or `repr=False` honoured, a class's own `__eq__`, `__hash__` or
`__repr__` kept). Only `__init__`, `__setattr__` and `__delattr__` are generated per class; equality, hash
and repr are three shared functions over the class's field names. Python 3.11 compiles each generated
method from source text as the class is created (one `exec` each, six per frozen dataclass): sharing three
of them takes a third of that cost off each class, which every `once` pays for the ~50 classes it imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import TypeVar

__all__ = ["record"]

T = TypeVar("T", bound=type)


def record(cls: T) -> T:
    """Make `cls` a frozen dataclass (see the module's docstring)."""
    own = cls.__dict__
    if cls.__doc__ is None:     # else dataclass writes one from inspect.signature: ~0.15 ms a class
        cls.__doc__ = f"{cls.__name__}({', '.join(own.get('__annotations__', ()))})"
    explicit_hash = "__hash__" in own and not (own["__hash__"] is None and "__eq__" in own)
    cls = dataclass(frozen=True, eq=False, repr=False)(cls)
    every = fields(cls)
    cls._record_key = staticmethod(_key(tuple(f.name for f in every if f.compare)))
    cls._record_shown = tuple(f.name for f in every if f.repr)
    if "__eq__" not in own:
        cls.__eq__ = _eq
    if not explicit_hash:
        cls.__hash__ = _hash
    if "__repr__" not in own:
        cls.__repr__ = _repr
    return cls


def _key(names: tuple[str, ...]) -> Callable[[object], tuple]:
    """The compared fields' values as a tuple, as dataclass's generated `__eq__` and `__hash__` build it."""
    if len(names) > 1:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return lambda obj: ()


def _eq(self, other) -> bool:
    if other.__class__ is self.__class__:
        key = self._record_key
        return key(self) == key(other)
    return NotImplemented


def _hash(self) -> int:
    return hash(self._record_key(self))


def _repr(self) -> str:
    shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._record_shown)
    return f"{self.__class__.__qualname__}({shown})"
