"""The expert-parallel plan: which rank holds which experts and which all-to-all moves the tokens, decided once.

The engine builds one `ExpertParallelPlan` from its config
(`plan_expert_parallel`) before any worker starts, so a placement or backend
that cannot work fails on the driver with one message. Every worker receives
the same plan and builds only its own share (`for_rank`: its all-to-all object
and device tables); the engine's expert-load report reads the same placement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moelink.comm.backends import AllToAllSpec, resolve_backend
from moelink.comm.ep_modes import TwoModeAllToAll
from moelink.comm.two_level import check_node_of_rank
from moelink.moe.layer import ExpertParallel
from moelink.moe.placement import ExpertPlacement

if TYPE_CHECKING:
    from ..config.engine_args import EngineConfig


@dataclass(frozen=True)
class ExpertParallelPlan:
    """The placement, the resolved all-to-all backend and, for fixed-capacity backends, the capacities.

    max_tokens_per_rank: the most tokens one rank dispatches per call, set
    exactly when `backend.needs_capacity` (None otherwise).
    decode_capacity: the low-latency mode's per-rank block (comm/ep_modes.py), set
    exactly when `backend.needs_capacity`: such a backend runs as a
    `TwoModeAllToAll`, its mode picked per step by the driver (engine/contract/ep_step.py).
    node_of_rank: the node (NVLink domain) number of each rank, for a
    node-aware backend (`backend.needs_node_map`) only. None there until the
    Ray executor fills it from its placement group (or the flags set it).
    """

    placement: ExpertPlacement
    backend: AllToAllSpec
    max_tokens_per_rank: int | None = None
    decode_capacity: int | None = None
    node_of_rank: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.placement, ExpertPlacement):
            raise ValueError(f"ExpertParallelPlan.placement must be an ExpertPlacement, got {self.placement!r}.")
        if not isinstance(self.backend, AllToAllSpec):
            raise ValueError(f"ExpertParallelPlan.backend must be an AllToAllSpec, got {self.backend!r}.")
        if not self.backend.accepts_world_size(self.world_size):
            raise ValueError(f"ExpertParallelPlan.backend {self.backend.name!r} runs at world size <= "
                             f"{self.backend.max_world_size}, but the placement has ep_size={self.world_size}.")
        cap = self.max_tokens_per_rank
        if self.backend.needs_capacity:
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise ValueError(f"ExpertParallelPlan.max_tokens_per_rank must be a positive integer for backend "
                                 f"{self.backend.name!r} (fixed per-rank buffers), got {cap!r}.")
        elif cap is not None:
            raise ValueError(f"ExpertParallelPlan.max_tokens_per_rank must be None for backend "
                             f"{self.backend.name!r} (it sizes its buffers per call), got {cap!r}.")
        if self.node_of_rank is not None:
            if not self.backend.needs_node_map:
                raise ValueError(f"ExpertParallelPlan.node_of_rank must be None for backend {self.backend.name!r} "
                                 f"(it is not node-aware), got {self.node_of_rank!r}.")
            object.__setattr__(self, "node_of_rank", check_node_of_rank(
                self.node_of_rank, self.world_size, "ExpertParallelPlan.node_of_rank"))
        dec = self.decode_capacity
        if dec is not None and (not self.backend.needs_capacity or isinstance(dec, bool) or not isinstance(dec, int)
                                or not 1 <= dec <= cap):
            raise ValueError(f"ExpertParallelPlan.decode_capacity must be None, or for a fixed-capacity backend an "
                             f"integer in [1, max_tokens_per_rank={cap}], got {dec!r} (backend {self.backend.name!r}).")

    @property
    def world_size(self) -> int:
        return self.placement.ep_size

    def for_rank(self, group, rank: int, device: torch.device) -> ExpertParallel:
        """This rank's share: its all-to-all (built collectively: every rank calls this together, since the
        nccl backend's communicator set-up blocks until all have joined) and the placement's tables on
        `device`."""
        options = {} if self.max_tokens_per_rank is None else {"max_tokens_per_rank": self.max_tokens_per_rank}
        if self.backend.needs_node_map:
            if self.node_of_rank is None and self.world_size > 1:
                raise ValueError(f"all-to-all backend {self.backend.name!r} needs the node of each rank: the Ray "
                                 "executor reads it from its placement group; elsewhere set ep_nvlink_domain_size "
                                 "or ep_node_ids.")
            options["node_of_rank"] = list(self.node_of_rank or (0,))
        a2a = self.backend.build(group, rank, self.world_size, device, **options)
        if self.decode_capacity is not None:
            a2a = TwoModeAllToAll(a2a, self.decode_capacity)
        return ExpertParallel(rank, self.world_size, self.placement, a2a, self.placement.to_tensors(device))


def plan_expert_parallel(config: EngineConfig) -> ExpertParallelPlan:
    """The one place the engine's placement, backend and capacity are decided, from its config."""
    par = config.parallel
    # The experts' world: every rank (EP), or one when a TP group splits each expert (ParallelConfig.experts_split_by_tp).
    world_size = getattr(par, "expert_world_size", par.world_size)
    backend = resolve_backend(par.all_to_all, world_size)
    # One rank holds every expert and never dispatches: redundant copies have nowhere to go (a rank never
    # holds two copies of one expert), so num_redundant_experts applies from two ranks on, as it always has.
    redundant = par.num_redundant_experts if world_size > 1 else 0
    placement = ExpertPlacement(num_experts=config.model.num_experts, ep_size=world_size, num_redundant=redundant)
    # Fixed-size buffers: a rank never holds more tokens than one step's budget; each step then uses only what
    # its mode needs (the decode capacity, or the step's largest tokens-per-rank).
    capacity = decode = None
    if backend.needs_capacity:
        capacity = config.scheduler.max_num_batched_tokens
        # Default: every sequence's decode, or its verify of k drafts with speculation (1 + k tokens each).
        per_seq = 1 + (config.speculative.num_speculative_tokens if config.speculative is not None else 0)
        decode = (par.ep_decode_capacity if par.ep_decode_capacity is not None
                  else config.scheduler.max_num_seqs * per_seq)
        if decode > capacity:
            if par.ep_decode_capacity is not None:
                raise ValueError(f"ep_decode_capacity={decode} is invalid: above max_num_batched_tokens={capacity}, "
                                 "no step holds that many tokens on a rank.")
            decode = capacity
    # The flags' node map, if any; otherwise the Ray executor fills it from its placement group.
    nodes = par.node_of_rank() if backend.needs_node_map else None
    return ExpertParallelPlan(placement, backend, capacity, decode_capacity=decode, node_of_rank=nodes)


__all__ = ["ExpertParallelPlan", "plan_expert_parallel"]
