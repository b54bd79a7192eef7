"""Named block kinds, one registry per kind: the decoder looks a layer's parts up by the names its plan holds.

A family registers the kinds it adds from its own package (engine/models/<family>/kinds.py, e.g. deepseek_v4's);
the decoder (engine/models/moe_decoder.py) never names a family: the first lookup of any kind imports the kinds
module of every family of engine/config/families.py that has one. Registering a name twice is an error (two
families fighting over one name would otherwise be decided by import order).
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from ...config.families import FAMILIES, family_module, has_part

T = TypeVar("T")


class Registry(Generic[T]):
    """The blocks of one kind ("attention", "ffn", ...), by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._blocks: dict[str, T] = {}

    def add(self, name: str, block: T) -> T:
        if name in self._blocks:
            raise ValueError(f"{self.kind} block {name!r} is registered twice.")
        self._blocks[name] = block
        return block

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`."""
        return lambda block: self.add(name, block)

    def get(self, name: str) -> T:
        load_families()
        block = self._blocks.get(name)
        if block is None:
            raise ValueError(f"{self.kind} block {name!r} is not registered: choose from "
                             f"{', '.join(map(repr, sorted(self._blocks)))}.")
        return block

    def names(self) -> tuple[str, ...]:
        load_families()
        return tuple(sorted(self._blocks))


_loaded: list[str] = []  # the families whose kinds are registered


def load_families() -> None:
    """Register every family's block kinds (its kinds.py), once. Lazy, at the first lookup, so that importing a
    family's config modules (engine/config) never imports a model: the families list is configuration."""
    for family in FAMILIES:
        if family in _loaded:
            continue
        _loaded.append(family)  # first: a kinds module that looks a kind up while it registers must not recurse
        if has_part(family, "kinds"):
            importlib.import_module(family_module(family, "kinds"))


__all__ = ["Registry", "load_families"]
