"""DSpark draft stages as a seam any family can fill (engine/config/dspark.py says what DSpark computes).

The drafter (engine/spec/proposer/dspark.py) owns what every DSpark draft does alike: it captures the target's
states at the tap layers (the mean over hyper-connection streams where the target keeps several), keeps each
stage's context rows in a paged cache on the engine's block ids, gathers each request's context before its
anchor, builds the block [anchor, mask, ...] and runs the Markov head's left-to-right drafting. What a family
publishes differently is the stages themselves: DFlash-format checkpoints hold Qwen3 decoder layers (built by
engine/spec/heads/dspark.py), DeepSeek-V4 / V4.1 bundle blocks of their own (hyper-connections, their attention
with a sliding window and sinks, their MoE) under `mtp.{i}.*`. Such a family registers a builder here, by the
architecture name of its config.json, from its own package (its kinds.py), as it registers its block kinds.

Legend: T tokens of the step, R requests drafting, B block slots, C context entries gathered per request,
V vocabulary, X a stage's context row (its shape is the stage's: GQA's [2, K, H], an MQA latent's [H]).
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Protocol

import torch
from torch import nn

from moelink.moe.weight_plan import WeightPlan

from ...config.dspark import DSparkConfig
from ...config.model import ModelConfig
from .registry import Registry


class DSparkStages(Protocol):
    """A family's DSpark stages with their context projection, final head and Markov head, as the drafter runs
    them (module docstring)."""

    module: nn.Module  # every weight it holds (memory accounting)
    window: int | None  # context positions before the anchor a block query sees (None: all of them)
    has_experts: bool  # routed experts: under expert parallelism an idle rank must run `run_idle`

    def row_shapes(self) -> list[tuple[int, ...]]:
        """Per stage, the shape of one context token's cache row (X)."""

    def context_rows(self, taps_TD: list[torch.Tensor], positions_T: torch.Tensor) -> list[torch.Tensor]:
        """Per stage [T, *X]: the rows the step's tokens leave in that stage's cache, from the target's states at
        the tap layers (each [T, D], in target_layer_ids order) at `positions_T`."""

    def base_logits(self, ids_RB: torch.Tensor, positions_RB: torch.Tensor, ctx_RCX: list[torch.Tensor],
                    valid_RC: torch.Tensor) -> torch.Tensor:
        """float [R, B, V]: every slot's logits before the Markov head; `ctx_RCX` per stage, `valid_RC` which
        gathered entries exist (the rest are padding, masked out)."""

    def markov_bias(self, prev_R: torch.Tensor) -> torch.Tensor:
        """float [R, V]: the Markov head's bias for the slot after token `prev_R`."""

    def weight_plan(self) -> WeightPlan: ...

    def run_idle(self) -> None:
        """The stages' collectives alone (an expert-parallel rank with no rows); asked only when `has_experts`."""


# builder(cfg, dspark, kernels, device, embed_tokens [V, D], lm_head [V, D], checkpoint names) -> DSparkStages
DSparkBuilder = Callable[[ModelConfig, DSparkConfig, Any, torch.device, torch.Tensor, torch.Tensor, Collection[str]],
                         DSparkStages]

# Families whose config.json bundles DSpark stages register their builder under their architecture name.
DSPARK_STAGES: Registry[DSparkBuilder] = Registry("dspark stages")

__all__ = ["DSPARK_STAGES", "DSparkBuilder", "DSparkStages"]
