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
import torch.nn.functional as F

from moelink.moe.layer import ExpertParallel
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.dspark import DSparkConfig
from ...config.model import ModelConfig
from ...tp.group import TensorParallel
from ..layers import param
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


class MarkovHead(nn.Module):
    """DSpark's "vanilla" Markov head, every form's: bias(prev) = W2 W1[prev], a rank-Rk bigram correction of the
    base logits (SGLang's markov_w1 [V, Rk] embedding and markov_w2 [V, Rk] projection; DeepSeek's own inference
    code calls them markov_head.embed and markov_head.head)."""

    def __init__(self, vocab_size: int, rank: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.w1_VR = param(vocab_size, rank, dtype=dtype, device=device)
        self.w2_VR = param(vocab_size, rank, dtype=dtype, device=device)

    def forward(self, prev_R: torch.Tensor) -> torch.Tensor:
        return F.linear(F.embedding(prev_R, self.w1_VR), self.w2_VR).float()

    def weight_plan(self, prefix: str, names: Collection[str] = ()) -> WeightPlan:
        """`{prefix}markov_w1.weight` / `markov_w2.weight`, or DeepSeek's `embed.weight` / `head.weight` where the
        checkpoint's `names` hold those."""
        w1, w2 = ("embed", "head") if prefix + "embed.weight" in names else ("markov_w1", "markov_w2")
        return {f"{prefix}{w1}.weight": PlanEntry(self.w1_VR, ()), f"{prefix}{w2}.weight": PlanEntry(self.w2_VR, ())}


# builder(cfg, dspark, kernels, device, embed_tokens [V, D], lm_head [V, D], checkpoint names, ep, tp)
# -> DSparkStages; the tables whole on every rank (the drafter gathered them under TP).
DSparkBuilder = Callable[[ModelConfig, DSparkConfig, Any, torch.device, torch.Tensor, torch.Tensor, Collection[str],
                          ExpertParallel | None, TensorParallel | None], DSparkStages]

# Families whose config.json bundles DSpark stages register their builder under their architecture name.
DSPARK_STAGES: Registry[DSparkBuilder] = Registry("dspark stages")

__all__ = ["DSPARK_STAGES", "DSparkBuilder", "DSparkStages", "MarkovHead"]
