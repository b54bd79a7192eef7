"""Named block kinds, one registry per kind: the decoder looks a layer's parts up by the names its plan holds.

A family registers the kinds it adds from its own package (engine/models/deepseek_v4/__init__.py); the decoder
(engine/models/moe_decoder.py) never names a family. Registering a name twice is an error (two families fighting
over one name would otherwise be decided by import order).
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

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
        block = self._blocks.get(name)
        if block is None:
            raise ValueError(f"{self.kind} block {name!r} is not registered: choose from "
                             f"{', '.join(map(repr, sorted(self._blocks)))}.")
        return block

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._blocks))


__all__ = ["Registry"]
