"""The registry of all-to-all backends: the one list of names, what each needs, and how to build it.

Everything that chooses a backend goes through here: `resolve_backend(name,
world_size)` turns a configured name ("auto" included) into an `AllToAllSpec`
once, and the spec's `build` makes the strategy object on each rank. Config
validation and the CLI read `ALL_TO_ALL_NAMES`.

Imports: the backend modules import only comm/a2a_base.py, never this module,
so loading them here (nccl_all_to_all lazily) makes no import cycle.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .a2a_base import AllToAll
from .all_to_all import NoAllToAll, TorchAllToAll


def _make_padded(group, rank: int, world_size: int, device, **options) -> AllToAll:
    from .nccl_all_to_all import PaddedAllToAll

    return PaddedAllToAll(group, rank, world_size, device, **options)


def _make_two_level(group, rank: int, world_size: int, device, **options) -> AllToAll:
    from .two_level import TwoLevelAllToAll

    return TwoLevelAllToAll(group, rank, world_size, device, **options)


def _make_nccl(group, rank: int, world_size: int, device, **options) -> AllToAll:
    from .nccl_all_to_all import NcclAllToAll  # lazy: GPU-only, loads libnccl when built

    return NcclAllToAll(group, rank, world_size, device, **options)


@dataclass(frozen=True)
class AllToAllSpec:
    """One all-to-all backend, as known before any rank builds it.

    needs_capacity: the backend uses fixed per-rank buffers and must be built
        with `max_tokens_per_rank` (the most tokens one rank dispatches per call).
    graph_safe: dispatch and combine keep fixed shapes and never sync with the
        host, so a CUDA graph can capture them where their transport can be
        captured (direct NCCL is the one captured in tests). Fixed-capacity
        backends run in the engine as comm.ep_modes.TwoModeAllToAll, whose
        low-latency mode the runner captures in decode graphs under EP (nccl).
    max_world_size: the largest EP world size it runs at; None: any.
    factory: `(group, rank, world_size, device, **options) -> AllToAll`.
    needs_node_map: the backend is node-aware and must be built with `node_of_rank` (the node, i.e.
        NVLink domain, of each rank; the engine reads it from the Ray placement group or the flags).
    """

    name: str
    needs_capacity: bool
    graph_safe: bool
    max_world_size: int | None
    factory: Callable[..., AllToAll] = field(repr=False, compare=False)
    needs_node_map: bool = False

    def __post_init__(self) -> None:
        if self.max_world_size is not None and self.max_world_size < 1:
            raise ValueError(f"AllToAllSpec.max_world_size must be None or >= 1, got {self.max_world_size!r}.")

    def accepts_world_size(self, world_size: int) -> bool:
        return self.max_world_size is None or world_size <= self.max_world_size

    def build(self, group, rank: int, world_size: int, device: torch.device | str, **options) -> AllToAll:
        """The strategy object of one rank. Options: max_tokens_per_rank (required where needs_capacity),
        and backend-specific ones (nccl: library_path, self_copy; two_level: node_of_rank)."""
        if self.needs_capacity and options.get("max_tokens_per_rank") is None:
            raise ValueError(f"all-to-all backend {self.name!r} needs max_tokens_per_rank (its fixed per-rank "
                             f"capacity), got none.")
        if self.needs_node_map and options.get("node_of_rank") is None:
            raise ValueError(f"all-to-all backend {self.name!r} needs node_of_rank (the node of each of the "
                             f"{world_size} ranks), got none.")
        return self.factory(group, rank, world_size, device, **options)


# The one list of backends, in the order users see them.
BACKENDS: dict[str, AllToAllSpec] = {spec.name: spec for spec in (
    AllToAllSpec("none", needs_capacity=False, graph_safe=True, max_world_size=1, factory=NoAllToAll),
    AllToAllSpec("torch", needs_capacity=False, graph_safe=False, max_world_size=None, factory=TorchAllToAll),
    AllToAllSpec("torch_padded", needs_capacity=True, graph_safe=True, max_world_size=None, factory=_make_padded),
    AllToAllSpec("nccl", needs_capacity=True, graph_safe=True, max_world_size=None, factory=_make_nccl),
    AllToAllSpec("two_level", needs_capacity=False, graph_safe=False, max_world_size=None,
                 factory=_make_two_level, needs_node_map=True),
)}

# What a user may write: "auto" ("none" at world size 1, else "torch") and every backend.
ALL_TO_ALL_NAMES: tuple[str, ...] = ("auto", *BACKENDS)


def resolve_backend(name: str, world_size: int) -> AllToAllSpec:
    """The backend `name` means at `world_size` ranks; the one place "auto" is resolved.

    Raises ValueError naming `all_to_all`, the value and what is allowed for an
    unknown name or a backend that does not run at this world size.
    """
    if name == "auto":
        name = "none" if world_size == 1 else "torch"
    spec = BACKENDS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"all_to_all={name!r} is invalid: choose from {', '.join(ALL_TO_ALL_NAMES)}.")
    if not spec.accepts_world_size(world_size):
        fits = [n for n, s in BACKENDS.items() if s.accepts_world_size(world_size)]
        raise ValueError(f"all_to_all={name!r} is for world size {spec.max_world_size}, got world size "
                         f"{world_size}: use 'auto' or one of {', '.join(fits)}.")
    return spec


def make_all_to_all(name: str, group, rank: int, world_size: int, device: torch.device | str, **options) -> AllToAll:
    """Build the all-to-all strategy `name` ("auto" resolved by `resolve_backend`), once per process.

    Names: "none" (world size 1), "torch" (all_to_all_single, exact splits, one
    host sync per dispatch), "torch_padded" (fixed-capacity layout over
    all_to_all_single, no host sync; option max_tokens_per_rank), "nccl"
    (fixed-capacity layout over direct NCCL send/recv, CUDA only, CUDA-graph
    safe; option max_tokens_per_rank), "two_level" (node-aware: each token crosses the network once per
    destination node, then NVLink fan-out; option node_of_rank), "auto" ("none" at world size 1, else "torch").
    """
    return resolve_backend(name, world_size).build(group, rank, world_size, device, **options)


__all__ = ["ALL_TO_ALL_NAMES", "AllToAllSpec", "BACKENDS", "make_all_to_all", "resolve_backend"]
